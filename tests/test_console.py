"""The web console: GET / for a browser, driven end to end in headless Chromium (Debian's chromium and
chromedriver, which .ci/run installs): the page lists the models and makes a prediction."""

import os
import shutil

import pandas as pd
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from conftest import IRIS_FEATURES, write_artifact

CHROME = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROME and DRIVER) and not os.environ.get("CI"),
                                   reason="chromium and chromedriver are not installed (.ci/run installs them)")


@pytest.fixture(scope="module")
def console_store(tmp_path_factory):
    data = load_iris()
    frame = pd.DataFrame(data.data, columns=IRIS_FEATURES)
    model = LogisticRegression(max_iter=1000).fit(frame, data.target_names[data.target])
    root = tmp_path_factory.mktemp("console") / "store"
    write_artifact(root / "iris" / "1" / "model.joblib", model, "joblib")
    write_artifact(root / "plain.joblib", LogisticRegression(max_iter=1000).fit(data.data, data.target), "joblib")
    return root, model


def test_a_browser_gets_the_page_and_a_client_gets_json(console_store, make_client):
    client = make_client(console_store[0])
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.content_type == "text/html" and "<title>model-service</title>" in page.text
    assert "<script src" not in page.text and "<link" not in page.text and "://" not in page.text, \
        "self-contained: nothing loaded from elsewhere"
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


def wait_for(driver, condition, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda _: condition())


@needs_browser
def test_the_console_lists_models_and_makes_a_prediction_in_chromium(console_store, serve_store, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root, model = console_store
    with serve_store(root) as base:
        browser.get(base + "/")
        wait_for(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")) == 2)
        table = browser.find_element(By.ID, "models").text
        assert "iris" in table and "plain" in table
        Select(browser.find_element(By.ID, "model")).select_by_value("iris")
        wait_for(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#features input")) == 4)
        Select(browser.find_element(By.ID, "method")).select_by_value("predict_proba")
        row = [6.7, 3.0, 5.2, 2.3]
        for name, value in zip(IRIS_FEATURES, row):
            browser.find_element(By.CSS_SELECTOR, f'#features input[data-feature="{name}"]').send_keys(str(value))
        browser.find_element(By.ID, "send").click()
        wait_for(browser, lambda: browser.find_element(By.ID, "status").text.startswith("200"))
        shown = browser.find_element(By.ID, "result").text
        expected = model.predict_proba(pd.DataFrame([row], columns=IRIS_FEATURES))[0]
        assert '"method": "predict_proba"' in shown and '"virginica"' in shown
        assert repr(float(expected[2])) in shown

        # an error is shown as the service's message, not a crash of the page
        browser.find_element(By.ID, "raw").send_keys("[[1, 2, 3]]")
        browser.find_element(By.ID, "send").click()
        wait_for(browser, lambda: browser.find_element(By.ID, "status").text.startswith("400"))
        assert "expected 4 features, got 3" in browser.find_element(By.ID, "status").text
