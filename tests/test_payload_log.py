"""The payload log: one JSON line per sampled prediction request, written off the request
path, redacted, rotated and drained at shutdown.

Real models from scikit-learn's bundled data in tmp_path stores; the shutdown drain runs a real server.
"""

import concurrent.futures
import glob
import json
import os
import threading

import pytest
import requests
import webtest

import service
from support import IRIS_FEATURES, ROWS, metric_value, strict_json, versioned_store, wait_until


def log_lines(folder):
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "payload-*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            lines += [strict_json(line) for line in handle]
    return lines


def records_written(app):
    return metric_value(app.registry.metrics.render(), "model_service_payload_log_records_total")


def test_every_protocol_is_logged_and_sigterm_drains_the_log(tmp_path, iris_classifier, serve_store):
    store = versioned_store(tmp_path / "store", [iris_classifier] * 2,
                            {"version_policy": "all", "traffic": {"1": 1, "2": 1}})
    folder = tmp_path / "log"
    with serve_store(store, "--payload-log", str(folder)) as server, requests.Session() as session:
        base = server.base
        native = session.post(base + "/models/m/predict", json={"instances": ROWS, "method": "predict_proba"},
                              headers={"X-Request-ID": "req-native"}, timeout=10)
        v2 = session.post(base + "/v2/models/m/versions/2/infer", headers={"X-Request-ID": "req-v2"}, timeout=10,
                          json={"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]})
        refused = session.post(base + "/models/m/predict", json={"instances": [[1, 2]]},
                               headers={"X-Request-ID": "req-bad"}, timeout=10)
        session.get(base + "/models/m", timeout=10)                      # not a prediction: not logged
        assert (native.status_code, v2.status_code, refused.status_code) == (200, 200, 400)
    assert server.returncode == 0 and "were not written" not in server.output(), server.output()
    lines = {line["request_id"]: line for line in log_lines(folder)}
    assert set(lines) == {"req-native", "req-v2", "req-bad"}
    first = lines["req-native"]
    assert first["model"] == "m" and first["version"] == strict_json(native)["version"]
    assert first["method"] == "predict_proba" and first["protocol"] == "native" and first["status"] == 200
    assert first["inputs"] == ROWS and first["features"] is None and first["redacted"] is None
    assert first["outputs"] == {"predict_proba": strict_json(native)["predictions"]}
    assert first["latency_ms"] > 0 and first["time"].endswith("Z")
    second = lines["req-v2"]
    assert (second["protocol"], second["version"], second["inputs"]) == ("v2", "2", [ROWS[0]])
    assert second["outputs"]["predict"] == iris_classifier.predict([ROWS[0]]).tolist()
    bad = lines["req-bad"]
    assert bad["status"] == 400 and "inputs" not in bad and "outputs" not in bad


@pytest.mark.slow
def test_gunicorn_workers_drain_their_logs_at_sigterm(tmp_path, iris_classifier, serve_store):
    """Each worker writes its own file and, on the way out, everything it accepted (its atexit drain):
    large requests, stopped right after the last answer, leave records queued at the signal."""
    store = versioned_store(tmp_path / "store", [iris_classifier])
    folder = tmp_path / "log"
    rows = ROWS * 1500

    def predict(number):                                     # a new connection each: both workers answer
        return requests.post(base + "/models/m/predict", json={"instances": rows}, timeout=60,
                             headers={"X-Request-ID": f"req-{number}", "Connection": "close"}).status_code

    with serve_store(store, "--payload-log", str(folder), "--workers", "2") as server:
        base = server.base
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(predict, range(40))) == {200}
    assert server.returncode == 0 and "were not written" not in server.output(), server.output()
    assert sorted(line["request_id"] for line in log_lines(folder)) == sorted(f"req-{n}" for n in range(40))


@pytest.mark.parametrize("redact, expected", [
    (["petal_width", "sepal_length"], [[None, 3.5, 1.4, None]]),
    (["ssn"], None),                                       # a name the model lacks: every input withheld
])
def test_redacted_features_never_reach_the_log(tmp_path, named_iris_classifier, make_app, redact, expected):
    store = versioned_store(tmp_path / "store", [named_iris_classifier], {"redact": redact})
    app = make_app(store=store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    row = dict(zip(IRIS_FEATURES, ROWS[0]))
    client.post_json("/models/m/predict", {"instances": [row]})
    wait_until(lambda: records_written(app) == 1, what="the record")
    assert app.payload_log.drain(5)
    line, = log_lines(tmp_path / "log")
    assert line["inputs"] == expected and line["features"] == IRIS_FEATURES
    assert line["redacted"] == (sorted(redact) if expected else "all")
    assert "0.2" not in json.dumps(line["inputs"])


def test_files_rotate_by_size_and_only_the_newest_stay(tmp_path, iris_classifier, make_app, monkeypatch):
    monkeypatch.setattr(service.PayloadLog, "FILE_BYTES", 1000)
    monkeypatch.setattr(service.PayloadLog, "FILES", 3)
    store = versioned_store(tmp_path / "store", [iris_classifier])
    app = make_app(store=store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    for number in range(40):
        client.post_json("/models/m/predict", {"instances": ROWS}, headers={"X-Request-ID": f"r{number}"})
    assert app.payload_log.drain(10)
    files = glob.glob(str(tmp_path / "log" / "payload-*.jsonl"))
    assert len(files) == 3 and all(os.path.getsize(path) <= 1000 for path in files)
    ids = [line["request_id"] for line in log_lines(tmp_path / "log")]
    assert ids == [f"r{number}" for number in range(40 - len(ids), 40)]     # the newest, in order, none torn


def test_sampling_logs_a_share_of_requests(tmp_path, iris_classifier, make_app):
    store = versioned_store(tmp_path / "store", [iris_classifier])
    app = make_app(store=store, payload_log=str(tmp_path / "log"), payload_log_sample=0.5)
    client = webtest.TestApp(app)
    for _ in range(400):
        client.post_json("/models/m/predict", {"instances": ROWS[:1]})
    assert app.payload_log.drain(10)
    assert 150 <= len(log_lines(tmp_path / "log")) <= 250           # 5 standard deviations either side


def test_a_failing_log_counts_its_drops_logs_once_and_never_fails_a_request(tmp_path, iris_classifier, make_app,
                                                                           caplog):
    store = versioned_store(tmp_path / "store", [iris_classifier])
    (tmp_path / "not-a-folder").write_text("")
    app = make_app(store=store, payload_log=str(tmp_path / "not-a-folder"))
    client = webtest.TestApp(app)
    for _ in range(5):
        assert strict_json(client.post_json("/models/m/predict", {"instances": ROWS}))["version"] == "1"
    assert app.payload_log.drain(10)
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "model_service_payload_log_dropped_total") == 5
    assert sum("payload log: cannot write" in record.getMessage() for record in caplog.records) == 1


def test_waiting_records_hold_a_bounded_share_of_memory(tmp_path, iris_classifier, make_app, monkeypatch):
    """Records wait with their requests' inputs: past Backlog.BYTES of bodies waiting, new ones are dropped."""
    monkeypatch.setattr(service.Backlog, "BYTES", 3000)
    writing, release = [], threading.Event()
    original = service.PayloadLog._write

    def slow_write(log, line):              # the writer stalls on its first record: later ones must wait
        writing.append(line)
        release.wait(30)
        original(log, line)
    monkeypatch.setattr(service.PayloadLog, "_write", slow_write)
    store = versioned_store(tmp_path / "store", [iris_classifier])
    app = make_app(store=store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    big = {"instances": ROWS * 20}          # about 1.6 KB of body each
    client.post_json("/models/m/predict", big)
    wait_until(lambda: writing)             # the first is being written; the next waits in the queue
    for _ in range(5):
        client.post_json("/models/m/predict", big)
    release.set()
    assert app.payload_log.drain(10)
    metrics = client.get("/metrics").text
    written = len(log_lines(tmp_path / "log"))
    assert written == 2 and metric_value(metrics, "model_service_payload_log_dropped_total") == 4, (written, metrics)
