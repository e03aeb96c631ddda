"""Drift (issue 25, item 2): `python service.py drift` compares a payload log's rows with the training data,
feature by feature, and `profile` stores that data's summary beside the model.

Most tests run the commands in-process (service.main, as the command line does) on payload logs written
in the payload log's own format; one drives a real server to write the log, and the HTML report is opened
in headless Chromium."""

import json
import os
import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
import requests
import webtest
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

import service
from support import IRIS_FEATURES, ROOT, wait_until
from test_console import CHROME, DRIVER, needs_browser


@pytest.fixture(scope="module")
def training():
    """The iris rows as a DataFrame with a text column, and a model of them that one-hot encodes it."""
    x, y = load_iris(return_X_y=True)
    frame = pd.DataFrame(x, columns=IRIS_FEATURES)
    frame["colour"] = np.array(["red", "green", "blue"], dtype=object)[np.arange(len(frame)) % 3]
    model = make_pipeline(ColumnTransformer([("colour", OneHotEncoder(), ["colour"])], remainder="passthrough"),
                          LogisticRegression(max_iter=2000)).fit(frame, y)
    return frame, y, model


@pytest.fixture
def drift_store(tmp_path, training):
    frame, y, model = training
    (tmp_path / "store" / "iris" / "1").mkdir(parents=True)
    joblib.dump(model, tmp_path / "store" / "iris" / "1" / "model.joblib")
    frame.assign(species=y).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path


def write_log(path, model, frames, version="1", start_minute=0, redact=()):
    """Payload log lines as the service writes them: one request per frame, answered 200 with `predict`, the
    `redact` features nulled as the model's "redact" setting does."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for number, frame in enumerate(frames):
            logged = frame.astype(object).assign(**{feature: None for feature in redact})
            handle.write(json.dumps({
                "time": f"2026-12-05T12:{start_minute + number:02d}:00.000Z", "request_id": f"r{number}",
                "model": "iris", "version": version, "method": "predict", "protocol": "native", "status": 200,
                "latency_ms": 1.0, "features": list(frame.columns), "inputs": logged.values.tolist(),
                "redacted": sorted(redact) or None, "outputs": {"predict": model.predict(frame).tolist()}}) + "\n")


def batches(frame, count=30, size=5, seed=0):
    rng = np.random.default_rng(seed)
    return [frame.iloc[rng.choice(len(frame), size, replace=False)].reset_index(drop=True) for _ in range(count)]


def drift(capsys, *arguments):
    code = service.main(["drift", *map(str, arguments)])
    out, err = capsys.readouterr()
    return code, out, err


def verdicts(report):
    """{feature: "yes" | "no"} from the report's lines."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("feature"))
    return {line.split()[0]: line.split()[-1] for line in lines[start + 1:]
            if line.split() and line.split()[-1] in ("yes", "no")}


def shifted(frame, feature, by):
    out = frame.copy()
    out[feature] = out[feature] + by
    return out


def test_an_unshifted_log_is_quiet_and_a_shifted_feature_is_found(capsys, drift_store, training):
    frame, _, model = training
    log = drift_store / "log" / "payload-20261205T120000-1-000001.jsonl"
    write_log(log, model, batches(frame))
    code, out, err = drift(capsys, log, "--model", "iris", "--store", drift_store / "store",
                           "--reference", drift_store / "train.csv")
    assert code == 0, err
    assert set(verdicts(out).values()) == {"no"} and set(verdicts(out)) == {*IRIS_FEATURES, "colour", "prediction"}
    assert "no drift (p < 0.05 / 6 test(s)" in out and "150 logged row(s)" in out

    write_log(log, model, [shifted(rows, "petal_length", 2.5) for rows in batches(frame, seed=1)], start_minute=30)
    code, out, err = drift(capsys, log.parent, "--model", "iris", "--store", drift_store / "store",
                           "--reference", drift_store / "train.csv")
    assert code == 1, err
    found = verdicts(out)
    assert found["petal_length"] == "yes" and all(found[f] == "no" for f in IRIS_FEATURES if f != "petal_length")
    assert "drift found in" in out and "petal_length" in out.splitlines()[-1]
    assert drift(capsys, log, "--model", "iris", "--store", drift_store / "store", "--reference",
                 drift_store / "train.csv", "--fail-on", "never")[0] == 0
    quiet = drift(capsys, log, "--model", "iris", "--store", drift_store / "store", "--reference",
                  drift_store / "train.csv", "--until", "2026-12-05T12:30")
    assert quiet[0] == 0 and "skipped: 30 outside --since/--until" in quiet[1]


def test_a_categorical_feature_is_tested_by_chi_squared(capsys, drift_store, training):
    frame, _, model = training
    reds = [rows.assign(colour="red") for rows in batches(frame)]
    write_log(drift_store / "log.jsonl", model, reds)
    code, out, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                         "--reference", drift_store / "train.csv")
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("colour"))
    expected = stats.chi2_contingency([[50, 50, 50], [0, 0, 150]])          # blue, green, red
    assert line.split()[1] == "chi2" and f"{expected[0]:.4f}" in line and "jensen-shannon" in line
    assert verdicts(out)["colour"] == "yes"


def test_a_stored_profile_stands_in_for_the_training_data(capsys, drift_store, training, caplog):
    frame, _, model = training
    assert service.main(["profile", str(drift_store / "train.csv"), "--model", "iris",
                         "--store", str(drift_store / "store")]) == 0
    profile_path = drift_store / "store" / "iris" / service.PROFILE_FILE
    assert "wrote" in capsys.readouterr().out and profile_path.exists()
    profile = json.loads(profile_path.read_text())
    assert [column["name"] for column in profile["features"]] == [*IRIS_FEATURES, "colour"]
    assert profile["prediction"]["kind"] == "categorical" and profile["rows"] == 150
    assert profile["features"][0]["values"] == sorted(frame["sepal_length"].tolist())
    write_log(drift_store / "log.jsonl", model, [shifted(rows, "sepal_width", -1.5) for rows in batches(frame)])
    code, out, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store")
    assert code == 1 and verdicts(out)["sepal_width"] == "yes" and service.PROFILE_FILE in out
    with caplog.at_level("INFO"):
        service.ModelStore(drift_store / "store").scan()
    assert service.PROFILE_FILE not in caplog.text, "the store takes the profile as the model folder's own file"


def test_a_profile_keeps_at_most_its_sample_of_quantiles(monkeypatch):
    monkeypatch.setattr(service, "PROFILE_SAMPLE", 5)
    column = service.profile_column(list(range(101)) + [None, float("nan")])
    assert column == {"kind": "numeric", "count": 103, "missing": 2, "values": [0.0, 25.0, 50.0, 75.0, 100.0]}


def test_a_model_without_its_own_folder_needs_an_output_for_its_profile(capsys, tmp_path, iris, iris_classifier):
    features, target = iris
    (tmp_path / "store").mkdir()
    joblib.dump(iris_classifier, tmp_path / "store" / "flat.joblib")
    pd.DataFrame(features).to_csv(tmp_path / "train.csv", index=False)
    code = service.main(["profile", str(tmp_path / "train.csv"), "--model", "flat", "--store", str(tmp_path / "store")])
    assert code == 2 and "give --output FILE, or move it to flat/1/" in capsys.readouterr().err
    output = tmp_path / "flat-profile.json"
    assert service.main(["profile", str(tmp_path / "train.csv"), "--model", "flat", "--store",
                         str(tmp_path / "store"), "--output", str(output)]) == 0
    assert [column["name"] for column in json.loads(output.read_text())["features"]] == ["x0", "x1", "x2", "x3"]


def test_redacted_features_count_as_missing(capsys, drift_store, training):
    frame, _, model = training
    write_log(drift_store / "log.jsonl", model, batches(frame), redact=["sepal_length"])
    code, out, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                         "--reference", drift_store / "train.csv")
    line = next(line for line in out.splitlines() if line.startswith("sepal_length"))
    assert code == 0 and "no values on one side" in line and line.split()[-2] == "150"


def test_json_lines_and_parquet_references(capsys, drift_store, training):
    frame, y, model = training
    with open(drift_store / "train.jsonl", "w") as handle:
        for record in frame.to_dict(orient="records"):
            handle.write(json.dumps(record) + "\n")
    write_log(drift_store / "log.jsonl", model, batches(frame))
    code, out, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                         "--reference", drift_store / "train.jsonl")
    assert code == 0 and "train.jsonl (150 rows)" in out
    try:
        frame.to_parquet(drift_store / "train.parquet")
    except ImportError:                     # no pyarrow here: the command says what it needs, in one line
        (drift_store / "train.parquet").write_bytes(b"PAR1")
        code, _, err = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                             "--reference", drift_store / "train.parquet")
        assert code == 2 and "reading Parquet needs pandas and pyarrow (pip install pandas pyarrow)" in err
        assert len(err.strip().splitlines()) == 1
        return
    code, out, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                         "--reference", drift_store / "train.parquet")
    assert code == 0 and "train.parquet (150 rows)" in out


@pytest.mark.parametrize("case", ["no log", "no rows", "garbage reference", "reference without a column",
                                  "bad profile", "no profile", "unknown model", "bad time", "text in numbers",
                                  "rows of another width"])
def test_whatever_it_is_given_it_answers_one_line_and_status_2(capsys, drift_store, training, case):
    frame, _, model = training
    store, log, reference = drift_store / "store", drift_store / "log.jsonl", drift_store / "train.csv"
    write_log(log, model, batches(frame, count=3))
    extra = []
    if case == "no log":
        log = drift_store / "absent.jsonl"
    elif case == "no rows":
        log.write_text("nonsense\n{\"model\": \"other\"}\n[1, 2]\n")
    elif case == "garbage reference":
        reference.write_bytes(b"\xff\xfe\x00garbage")
    elif case == "reference without a column":
        frame.drop(columns="colour").to_csv(reference, index=False)
    elif case == "bad profile":
        reference = drift_store / "profile.json"
        reference.write_text('{"features": [{"name": "a", "kind": "numeric", "values": ["x"]}]}')
    elif case == "no profile":
        reference = None
    elif case == "unknown model":
        extra = ["--model", "absent"]
    elif case == "bad time":
        extra = ["--since", "yesterday"]
    else:                               # a line no service writes, but one a log can hold
        inputs = [["big", 3.0, 1.0, 0.2, "red"]] if case == "text in numbers" else [[1.0, 2.0]]
        with open(log, "a" if case == "text in numbers" else "w") as handle:
            handle.write(json.dumps({"time": "2026-12-05T13:00:00Z", "model": "iris", "status": 200,
                                     "inputs": inputs, "outputs": {}}) + "\n")
    arguments = [log, "--model", "iris", "--store", store] + (["--reference", reference] if reference else []) + extra
    with pytest.raises(SystemExit) if case == "bad time" else _nothing() as exit_info:
        code, _, err = drift(capsys, *arguments)
    if case == "bad time":
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip() and "error: " in err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_served_rows_beyond_the_bound_are_a_uniform_sample(monkeypatch, tmp_path, training):
    frame, _, model = training
    write_log(tmp_path / "log.jsonl", model, batches(frame, count=20))
    monkeypatch.setattr(service, "DRIFT_MAX_ROWS", 30)
    report = service.DriftReport("iris", None, "test", 0.05)
    names, columns, predictions = service._served([str(tmp_path / "log.jsonl")], "iris", None, None, None, report)
    assert report.logged_rows == 100 and len(columns[0]) == 30 and len(predictions) == 30
    assert names == [*IRIS_FEATURES, "colour"]


@needs_browser
def test_the_html_report_shows_one_histogram_per_feature_in_a_browser(capsys, drift_store, training):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    frame, _, model = training
    write_log(drift_store / "log.jsonl", model, [shifted(rows, "petal_length", 2.5) for rows in batches(frame)])
    report = drift_store / "report.html"
    code, _, _ = drift(capsys, drift_store / "log.jsonl", "--model", "iris", "--store", drift_store / "store",
                       "--reference", drift_store / "train.csv", "--html", report)
    assert code == 1
    text = report.read_text()
    assert "<script" not in text and "://" not in text.replace("http://www.w3.org/2000/svg", ""), "self-contained"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROME
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(report.as_uri())
        shown = browser.execute_script("""
            const charts = [...document.querySelectorAll("figure")];
            return {title: document.title, summary: document.querySelector(".summary").textContent,
                    charts: charts.map((f) => [f.querySelector("b").textContent, f.className,
                                               f.querySelector("svg.histogram").getBoundingClientRect().width,
                                               f.querySelectorAll("svg rect").length])};""")
    finally:
        browser.quit()
    assert shown["title"] == "Drift of iris" and "petal_length" in shown["summary"]
    assert [name for name, *_ in shown["charts"]] == [*IRIS_FEATURES, "colour", "prediction"]
    assert all(width > 300 and bars > 0 for _, _, width, bars in shown["charts"])
    assert dict((name, kind) for name, kind, *_ in shown["charts"])["petal_length"] == "drift"


@pytest.mark.slow
def test_a_real_servers_payload_log_end_to_end(tmp_path, drift_store, training, serve_store):
    frame, _, model = training
    store = drift_store / "store"
    with serve_store(store, "--payload-log", str(tmp_path / "log")) as server, requests.Session() as session:
        base = server.base
        for rows in [shifted(rows, "petal_width", 1.5) for rows in batches(frame, count=20)]:
            answer = session.post(base + "/models/iris/predict",
                                  json={"instances": rows.astype(object).to_dict(orient="records")}, timeout=10)
            assert answer.status_code == 200, answer.text
    assert server.returncode == 0, server.output()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "drift", str(tmp_path / "log"),
                             "--model", "iris", "--store", str(store), "--reference", str(drift_store / "train.csv")],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert verdicts(result.stdout)["petal_width"] == "yes" and "100 logged row(s)" in result.stdout


###############################################################################
# Live drift (item 3): /metrics scores the newest served rows against the stored profile
###############################################################################


def gauge(text, name, **labels):
    """A gauge's value in a scrape (NaN stays NaN), or None when the series is not there."""
    wanted = {key: str(value) for key, value in labels.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return sample.value
    return None


@pytest.fixture
def live_store(drift_store):
    """drift_store with the training data's profile stored beside the model, and a second model without one."""
    store = drift_store / "store"
    assert service.main(["profile", str(drift_store / "train.csv"), "--model", "iris", "--store", str(store)]) == 0
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), store / "plain.joblib")
    return store


def records(frame):
    return frame.astype(object).to_dict(orient="records")


def test_metrics_score_each_feature_of_the_served_rows_against_the_profile(tmp_path, live_store, training,
                                                                           make_app):
    frame, _, _ = training
    app = make_app(store=live_store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    served = pd.concat([shifted(rows, "petal_width", 1.5) for rows in batches(frame, count=8)], ignore_index=True)
    for start in range(0, len(served), 10):
        client.post_json("/models/iris/predict", {"instances": records(served.iloc[start:start + 10])})
    client.post_json("/models/plain/predict", {"instances": frame[IRIS_FEATURES].iloc[:3].values.tolist()})
    wait_until(lambda: gauge(client.get("/metrics").text, "model_service_drift_window_rows", model="iris") == 40,
               what="the 40 served rows scored")
    text = client.get("/metrics").text
    profile = json.loads((live_store / "iris" / service.PROFILE_FILE).read_text())
    for number, feature in enumerate(IRIS_FEATURES):
        expected = stats.ks_2samp(profile["features"][number]["values"], served[feature].to_numpy()).pvalue
        assert gauge(text, "model_service_drift_p_value", model="iris", feature=feature) == pytest.approx(
            expected, rel=1e-12), feature
    assert gauge(text, "model_service_drift_p_value", model="iris", feature="petal_width") < 0.05 / 5
    assert gauge(text, "model_service_drift_p_value", model="iris", feature="sepal_length") > 0.05 / 5
    assert gauge(text, "model_service_drift_p_value", model="iris", feature="colour") > 0.05 / 5     # chi-squared
    assert gauge(text, "model_service_drift_psi", model="iris", feature="petal_width") > 0.2
    # labels: the features of the models with a profile, no others
    assert {(sample.labels["model"], sample.labels["feature"]) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "model_service_drift_p_value"} == {
        ("iris", feature) for feature in [*IRIS_FEATURES, "colour"]}


def test_the_window_keeps_the_newest_rows_and_a_removed_profile_drops_the_series(tmp_path, live_store, training,
                                                                                 make_app, monkeypatch):
    monkeypatch.setattr(service, "DRIFT_WINDOW_ROWS", 10)
    frame, _, _ = training
    app = make_app(store=live_store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    for rows in batches(frame, count=4):
        client.post_json("/models/iris/predict", {"instances": records(rows)})
    wait_until(lambda: gauge(client.get("/metrics").text, "model_service_drift_window_rows", model="iris") == 10,
               what="a window of the 10 newest rows")
    os.remove(live_store / "iris" / service.PROFILE_FILE)
    client.post_json("/models/iris/predict", {"instances": records(frame.iloc[:1])})
    wait_until(lambda: "model_service_drift_p_value{" not in client.get("/metrics").text,
               what="the series of a model without a profile gone")
    assert gauge(client.get("/metrics").text, "model_service_drift_window_rows", model="iris") is None


def test_without_a_payload_log_there_are_no_drift_series(live_store, training, make_app):
    frame, _, _ = training
    client = webtest.TestApp(make_app(store=live_store))
    client.post_json("/models/iris/predict", {"instances": records(frame.iloc[:5])})
    text = client.get("/metrics").text
    assert gauge(text, "model_service_drift_window_rows", model="iris") is None
    assert gauge(text, "model_service_drift_p_value", model="iris", feature="petal_width") is None


@pytest.mark.slow
def test_under_workers_each_process_scores_its_share_and_a_scrape_combines_them(tmp_path, live_store, training,
                                                                                serve_store):
    frame, _, _ = training
    served = pd.concat([shifted(rows, "petal_width", 1.5) for rows in batches(frame, count=12)], ignore_index=True)
    with serve_store(live_store, "--payload-log", str(tmp_path / "log"), "--workers", "2") as server, \
            requests.Session() as session:
        for start in range(0, len(served), 5):
            answer = session.post(server.base + "/models/iris/predict",
                                  json={"instances": records(served.iloc[start:start + 5])}, timeout=10)
            assert answer.status_code == 200, answer.text
        scrape = lambda: session.get(server.base + "/metrics", timeout=10).text
        wait_until(lambda: gauge(scrape(), "model_service_drift_window_rows", model="iris") == len(served),
                   what="every served row scored by the worker that answered it")
        text = scrape()
    assert gauge(text, "model_service_drift_p_value", model="iris", feature="petal_width") < 0.05 / 5
    assert gauge(text, "model_service_drift_psi", model="iris", feature="petal_width") > 0.2
