"""The web console: GET / for a browser, driven end to end in headless Chromium (Debian's chromium and
chromedriver, which .ci/run installs) over a real server and a store of two models that take different
inputs: a regressor on 10 unnamed features, listed first, and a classifier on 4 named ones."""

import os
import shutil

import pandas as pd
import pytest
import requests
from sklearn.linear_model import LinearRegression, LogisticRegression

from support import IRIS_FEATURES, publish, wait_until, write_artifact

CHROME = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
MISSING = [package for package, found in (("chromium", CHROME), ("chromium-driver", DRIVER)) if not found]
# In CI a missing browser fails the test rather than skip it: .ci/run installs both.
needs_browser = pytest.mark.skipif(
    bool(MISSING) and not os.environ.get("CI"),
    reason=f"the console test needs headless Chromium and its driver: apt-get install {' '.join(MISSING)} "
           "(chromedriver on PATH; .ci/run installs them)")
TOKEN = "console-test-secret-token"

# The page as a user sees it, read in one script so that no element goes stale between two reads.
PAGE = """
const $ = (id) => document.getElementById(id), all = (css) => [...document.querySelectorAll(css)];
const active = document.activeElement;
return {methods: all("#method option").map((o) => o.value), method: $("method").value,
        features: all("#features input").map((i) => i.dataset.feature),
        labels: all("#features label").map((l) => l.textContent),
        placeholder: $("raw").placeholder, example: $("example").textContent, described: $("described").textContent,
        status: $("status").textContent, listing: $("listing").textContent, result: $("result").textContent,
        table: all("#models tbody tr").map((r) => [...r.cells].map((c) => c.textContent)),
        invalid: all("[aria-invalid=true].invalid").map((e) => e.dataset.feature || e.id),
        focused: active ? active.dataset.feature || active.id : null};
"""


# Feature names are the store's, not the service's: shown as text, sent as keys, whatever they hold.
ODD_FEATURES = ['<img id="injected" src="x">', "__proto__"]


@pytest.fixture(scope="module")
def odd_regressor():
    frame = pd.DataFrame([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], columns=ODD_FEATURES)
    return LinearRegression().fit(frame, [1.0, 2.0, 4.0])


@pytest.fixture
def console_store(tmp_path, named_iris_classifier, diabetes_regressor, odd_regressor):
    root = tmp_path / "store"
    write_artifact(root / "diabetes.joblib", diabetes_regressor, "joblib")
    write_artifact(root / "iris" / "1" / "model.joblib", named_iris_classifier, "joblib")
    write_artifact(root / "odd.joblib", odd_regressor, "joblib")
    return root


def test_a_browser_gets_the_page_and_a_client_gets_json(console_store, make_client):
    client = make_client(console_store)
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.content_type == "text/html" and "<title>model-service</title>" in page.text
    assert "<script src" not in page.text and "<link" not in page.text and "://" not in page.text, \
        "self-contained: nothing loaded from elsewhere"
    assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text, \
        "what the service sends is shown as text, never parsed as markup"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "connect-src 'self'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/").json["status"] == "alive"          # KServe V1 liveness and API clients still get JSON


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROME
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def page(browser):
    return browser.execute_script(PAGE)


def wait_for(browser, condition, timeout=30, script=PAGE):
    """The page's state (as `script` reads it) once condition(state) holds; on time out, the last state in the
    failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout).until(
            lambda _: (lambda state: condition(state) and state)(browser.execute_script(script)))
    except TimeoutException:
        raise AssertionError(f"the console never got there; it shows {browser.execute_script(script)}") from None


def choose(browser, select, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, select)).select_by_value(value)


def type_into(browser, feature, text):
    from selenium.webdriver.common.by import By

    field, = [f for f in browser.find_elements(By.CSS_SELECTOR, "#features input")
              if f.get_attribute("data-feature") == feature]       # any name: no selector to escape
    field.clear()
    field.send_keys(text)


def predict(browser, raw=None):
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "raw")
    box.clear()
    if raw:
        box.send_keys(raw)
    browser.find_element(By.ID, "send").click()


DIABETES_FIELDS = [f"feature {i}" for i in range(10)]


@needs_browser
def test_the_first_paint_shows_the_first_models_methods_fields_and_example_and_a_switch_changes_them(
        console_store, serve_store, browser):
    with serve_store(console_store) as server:
        base = server.base
        browser.get(base + "/")
        # diabetes, listed first, is chosen: its own inputs, not iris's, without a click
        shown = wait_for(browser, lambda state: state["features"] == DIABETES_FIELDS)
        assert shown["methods"] == ["predict"] and shown["labels"] == DIABETES_FIELDS
        assert shown["placeholder"] == "[[" + ",".join(["0"] * 10) + "]]"
        assert shown["example"] == 'POST /models/diabetes/predict {"instances":[[' + ",".join(["0"] * 10) + \
            ']],"method":"predict"}'
        assert [row[0] for row in shown["table"]] == ["diabetes", "iris", "odd"]

        choose(browser, "model", "iris")
        shown = wait_for(browser, lambda state: state["features"] == IRIS_FEATURES)
        listed = requests.get(base + "/models/iris").json()["versions"][0]["methods"]
        assert shown["methods"] == listed and "predict_proba" in listed and shown["method"] == "predict"
        assert shown["placeholder"] == '[{"sepal_length":0,"sepal_width":0,"petal_length":0,"petal_width":0}]'
        assert shown["example"].startswith('POST /models/iris/predict {"instances":[{"sepal_length":0,')

        choose(browser, "method", "predict_proba")
        assert page(browser)["example"].endswith('"method":"predict_proba"}')
        choose(browser, "model", "diabetes")
        wait_for(browser, lambda state: state["features"] == DIABETES_FIELDS and state["methods"] == ["predict"])


@needs_browser
def test_feature_names_are_shown_as_text_and_sent_as_keys(console_store, serve_store, browser, odd_regressor):
    from selenium.webdriver.common.by import By

    with serve_store(console_store) as server:
        base = server.base
        browser.get(base + "/")
        wait_for(browser, lambda state: state["features"] == DIABETES_FIELDS)
        choose(browser, "model", "odd")
        shown = wait_for(browser, lambda state: state["features"] == ODD_FEATURES)
        assert shown["labels"] == ODD_FEATURES and not browser.find_elements(By.ID, "injected")
        for name, value in zip(ODD_FEATURES, ("1.5", "-2")):
            type_into(browser, name, value)
        predict(browser)
        shown = wait_for(browser, lambda state: state["status"].startswith("200"))
        expected = odd_regressor.predict(pd.DataFrame([[1.5, -2.0]], columns=ODD_FEATURES))[0]
        assert f'"predictions": [\n    {float(expected)!r}\n  ]' in shown["result"]


@needs_browser
def test_a_bad_field_is_named_and_marked_a_prediction_refreshes_the_states_and_errors_show_status_and_message(
        console_store, serve_store, browser, named_iris_classifier):
    with serve_store(console_store, "--poll-interval", "0.2") as server:
        base = server.base
        browser.get(base + "/")
        choose(browser, "model", "iris")
        wait_for(browser, lambda state: state["features"] == IRIS_FEATURES)
        row = [6.7, 3.0, 5.2, 2.3]
        for name, value in zip(IRIS_FEATURES, row):
            type_into(browser, name, str(value))

        type_into(browser, "sepal_width", "3,0")
        predict(browser)
        shown = wait_for(browser, lambda state: state["invalid"])
        assert shown["status"] == 'Input error: feature "sepal_width" is not a number: "3,0"'
        assert shown["invalid"] == ["sepal_width"] and shown["focused"] == "sepal_width"
        type_into(browser, "sepal_width", "3.0")
        type_into(browser, "petal_width", "")
        predict(browser)
        shown = wait_for(browser, lambda state: state["invalid"] == ["petal_width"])
        assert shown["status"] == 'Input error: feature "petal_width" is empty' and shown["focused"] == "petal_width"

        type_into(browser, "petal_width", "2.3")
        choose(browser, "method", "predict_proba")
        predict(browser)
        shown = wait_for(browser, lambda state: state["status"].startswith("200"))
        assert shown["invalid"] == [], "a corrected field is no longer marked"
        expected = named_iris_classifier.predict_proba(pd.DataFrame([row], columns=IRIS_FEATURES))[0]
        assert '"method": "predict_proba"' in shown["result"] and repr(float(expected[2])) in shown["result"]

        # a new version the service has taken up shows in the table after the next prediction
        publish(console_store / "iris" / "2" / "model.joblib",
                LogisticRegression(C=0.1, max_iter=1000).fit(pd.DataFrame([row, [5.1, 3.5, 1.4, 0.2]],
                                                                          columns=IRIS_FEATURES), ["b", "a"]))
        wait_until(lambda: requests.get(base + "/models/iris").json()["latest_version"] == "2",
                   what="the service takes up version 2")
        before = page(browser)["table"]
        assert before[1][1] == "1" and "2:" not in before[1][4], "the table changes only when the page acts"
        predict(browser)
        shown = wait_for(browser, lambda state: "2: AVAILABLE" in state["table"][1][4])
        assert shown["table"][1][1] == "2", "the latest version is shown once it answers"

        # a refusal shows its status and the service's own message
        predict(browser, raw="[[1, 2, 3]]")
        shown = wait_for(browser, lambda state: state["status"].startswith("400"))
        assert shown["status"].startswith("400 Bad Request: ") and "expected 4 features, got 3" in shown["status"]
        assert '"error"' in shown["result"]


@needs_browser
def test_the_console_asks_for_the_token_and_sends_it(console_store, serve_store, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with serve_store(console_store, env={"MODEL_SERVICE_AUTH_TOKENS": TOKEN}) as server:
        base = server.base
        browser.get(base + "/")
        shown = wait_for(browser, lambda state: state["listing"])
        assert shown["listing"].startswith("Cannot list the models: 401 Unauthorized: ") and \
            "valid token" in shown["listing"] and shown["focused"] == "token"
        browser.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
        wait_for(browser, lambda state: state["features"] == DIABETES_FIELDS and not state["listing"])
        predict(browser, raw="[" + ",".join(["[0,0,0,0,0,0,0,0,0,0]"] * 2) + "]")
        shown = wait_for(browser, lambda state: state["status"].startswith("200"))
        assert '"predictions"' in shown["result"]


@needs_browser
def test_at_1280_by_900_the_first_view_holds_the_predict_button_and_nothing_looks_like_a_value(
        console_store, serve_store, browser):
    """A placeholder is a word, not a grey "0"; the Predict button is on the first screen;
    the token form keeps its distance from the table; a version not loaded yet says when it will be."""
    before = browser.get_window_size()
    browser.set_window_size(1280, 900)
    try:
        with serve_store(console_store) as server:
            browser.get(server.base + "/")
            shown = wait_for(browser, lambda state: state["features"] == DIABETES_FIELDS)
            layout = browser.execute_script("""
                const box = (id) => document.getElementById(id).getBoundingClientRect();
                return {height: window.innerHeight, send: box("send").bottom, token: box("auth").bottom,
                        table: box("models").top,
                        placeholders: [...document.querySelectorAll("#features input")].map((i) => i.placeholder)};""")
    finally:
        browser.set_window_size(before["width"], before["height"])
    assert layout["send"] <= layout["height"], layout
    assert layout["table"] - layout["token"] >= 8, layout
    assert set(layout["placeholders"]) == {"number"}
    states = {row[0]: row[4] for row in shown["table"]}
    assert states["iris"] == "1: loads on first request" and states["diabetes"] == "1: AVAILABLE"


# The explanation's chart as a user sees it: each bar's feature, colour class and length, and its caption.
CHART = """
const $ = (id) => document.getElementById(id), all = (css) => [...document.querySelectorAll(css)];
return {hidden: $("why").hidden, title: $("why-title").textContent, explained: $("explained").textContent,
        status: $("status").textContent, features: all("#features input").map((i) => i.dataset.feature),
        bars: all("#chart rect").map((r) => [r.dataset.feature, r.getAttribute("class"), +r.getAttribute("width")]),
        names: all("#chart text[text-anchor=end]").map((t) => t.textContent)};
"""


@needs_browser
def test_a_prediction_shows_its_top_contributions_as_bars_when_the_model_can_explain(tmp_path, serve_store, browser,
                                                                                   named_iris_classifier):
    from sklearn.svm import SVC

    store = tmp_path / "store"
    write_artifact(store / "iris.joblib", named_iris_classifier, "joblib")
    write_artifact(store / "svc.joblib", SVC().fit([[0, 0], [1, 1], [0, 1], [1, 0]], [0, 1, 1, 0]), "joblib")
    row = [6.7, 3.0, 5.2, 2.3]
    with serve_store(store) as server:
        browser.get(server.base + "/")
        wait_for(browser, lambda state: state["features"] == IRIS_FEATURES)
        for name, value in zip(IRIS_FEATURES, row):
            type_into(browser, name, str(value))
        predict(browser)
        shown = wait_for(browser, lambda state: not state["hidden"], script=CHART)
        explained = requests.post(server.base + "/models/iris/explain",
                                  json={"instances": [dict(zip(IRIS_FEATURES, row))]}, timeout=30).json()
        explanations = explained["explanations"]
        output = explanations["output_names"].index("virginica")      # the class predicted
        assert named_iris_classifier.predict(pd.DataFrame([row], columns=IRIS_FEATURES))[0] == "virginica"
        contributions = {name: values[output] for name, values in zip(explanations["feature_names"],
                                                                      explanations["contributions"][0])}
        largest = max(map(abs, contributions.values()))
        assert [feature for feature, _, _ in shown["bars"]] == sorted(contributions, key=lambda f: -abs(contributions[f]))
        assert shown["names"] == [feature for feature, _, _ in shown["bars"]]
        for feature, colour, width in shown["bars"]:
            assert colour == ("up" if contributions[feature] > 0 else "down")
            assert width == pytest.approx(max(170 * abs(contributions[feature]) / largest, 1), rel=1e-9)
        assert "virginica" in shown["title"] and explanations["method"] in shown["title"]

        choose(browser, "model", "svc")
        wait_for(browser, lambda state: state["features"] == ["feature 0", "feature 1"])
        type_into(browser, "feature 0", "1")
        type_into(browser, "feature 1", "0")
        predict(browser)
        shown = wait_for(browser, lambda state: state["explained"], script=CHART)
        assert shown["status"].startswith("200") and shown["hidden"]
        assert shown["explained"].startswith("No explanation: 501 Not Implemented: model 'svc' cannot be explained")
