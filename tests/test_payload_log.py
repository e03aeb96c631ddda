"""The payload log: one JSON line per sampled prediction request, written off the request
path, redacted, rotated and drained at shutdown.

Real models from scikit-learn's bundled data in tmp_path stores; the shutdown drain runs a real server.
"""

import concurrent.futures
import glob
import json
import logging
import os
import re
import threading
import urllib.parse

import numpy as np
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


def post_chunked(app, path, body):
    """POST `body` to the WSGI app as a chunked request arrives from waitress or gunicorn: decoded, with no
    Content-Length, Transfer-Encoding: chunked and wsgi.input_terminated."""
    request = webtest.TestRequest.blank(path, method="POST", body=body, content_type="application/json")
    environ = request.environ
    del environ["CONTENT_LENGTH"]
    environ.update({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    return request.get_response(app)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_waiting_records_hold_a_bounded_share_of_memory(tmp_path, iris_classifier, make_app, monkeypatch, framing):
    """Records wait with their requests' inputs and outputs: past Backlog.BYTES of them waiting, measured in
    memory whatever the headers said, new ones are dropped and counted.  (Sized by Content-Length, a chunked
    body, which has none, counted 4 KB: under --workers, 2 MB chunked bodies grew RSS from 469 to 1,431 MiB.)"""
    rows = ROWS * 300                       # about 30 KB of inputs and outputs in memory, 23 KB of JSON
    held = service.held_bytes(np.asarray(rows, dtype=float), iris_classifier.predict(rows))
    monkeypatch.setattr(service.Backlog, "BYTES", int(2.5 * (held + service.Backlog.ITEM_BYTES)))    # room for 2
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
    body = json.dumps({"instances": rows}).encode()

    def predict():
        response = client.post("/models/m/predict", body, content_type="application/json") \
            if framing == "content-length" else post_chunked(app, "/models/m/predict", body)
        assert response.status_int == 200 and len(strict_json(response.text)["predictions"]) == len(rows)
    predict()
    wait_until(lambda: writing)             # the first is being written; the next waits in the queue
    for _ in range(5):
        predict()
    release.set()
    assert app.payload_log.drain(10)
    metrics = client.get("/metrics").text
    written = len(log_lines(tmp_path / "log"))
    assert written == 2 and metric_value(metrics, "model_service_payload_log_dropped_total") == 4, (written, metrics)


def memory_mib(pid, field):
    """VmRSS or VmHWM (the peak of VmRSS) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith(field + ":"))


@pytest.mark.slow
def test_workers_hold_a_bounded_backlog_of_chunked_bodies_and_count_what_they_drop(tmp_path, iris_classifier,
                                                                                    serve_store):
    """Under --workers 2, 2 MB chunked bodies (no Content-Length) for a model whose shadow is slower than the
    traffic: once the first wave has filled each worker's shadow backlog, a larger second wave leaves each
    worker's peak memory within noise of where it was (kept whole, it would add about 120 MiB each), and what
    did not fit is dropped and counted: every request is compared or dropped.  Sized by Content-Length, each
    waiting item had counted 4 KB, and memory grew with every request.  (One thread per worker: the peak of a
    request in flight is then the same in both waves.)"""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    slow = RandomForestClassifier(n_estimators=20, random_state=0).fit(*load_iris(return_X_y=True))
    store = versioned_store(tmp_path / "store", [iris_classifier, slow],
                            {"version_policy": "all", "labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 1},
                             "shadow": "canary"})
    rows = np.round(np.random.default_rng(0).uniform(0, 8, (55_000, 4)), 6).tolist()
    body = json.dumps({"instances": rows}).encode()
    assert len(body) > 2_000_000
    expected = iris_classifier.predict(rows[:5]).tolist()
    held = (np.asarray(rows).nbytes + iris_classifier.predict(rows).nbytes) / 2 ** 20      # an item's arrays, MiB
    first, second = 80, 120

    def predict(_):
        chunks = (body[start:start + 65536] for start in range(0, len(body), 65536))      # no Content-Length
        with requests.post(base + "/models/m/predict", data=chunks, timeout=120,
                           headers={"Content-Type": "application/json"}) as response:
            assert response.status_code == 200, response.text
            return response.json()["predictions"][:5] == expected

    def counted():
        metrics = requests.get(base + "/metrics", timeout=30).text
        return [metric_value(metrics, f"model_service_shadow_{name}_total", model="m", version="2") or 0
                for name in ("compared", "dropped", "errors")]

    with serve_store(store, "--workers", "2", "--threads", "1", "--preload", "--poll-interval", "0") as server:
        base = server.base
        wait_until(lambda: len(re.findall(r"Booting worker with pid: (\d+)", server.output())) == 2, timeout=60,
                   what="both workers")
        workers = re.findall(r"Booting worker with pid: (\d+)", server.output())
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert all(pool.map(predict, range(first)))
            filled = {pid: memory_mib(pid, "VmHWM") for pid in workers}
            assert all(pool.map(predict, range(second)))
            peak = {pid: memory_mib(pid, "VmHWM") for pid in workers}
        assert all(peak[pid] - filled[pid] < second / 2 * held / 2 for pid in workers), (filled, peak, held)
        wait_until(lambda: sum(counted()) == first + second, timeout=120, what="every request compared or dropped")
        compared, dropped, errors = counted()
        assert dropped > 0 and errors == 0, counted()


# -- redaction in every log: one rule -----------------------------------------------------------------------

SECRET = 7.123456789                        # a redacted feature's value: it must appear in no log line


@pytest.mark.parametrize("redact", [["petal_width"], []])
def test_the_access_log_writes_a_redacting_models_path_as_its_route(tmp_path, named_iris_classifier, caplog,
                                                                    make_app, redact):
    """GET /predict/<sentence> carries the features in its path: the access line of a model that redacts one
    writes the route instead; others keep their paths (the names in them are no inputs)."""
    store = versioned_store(tmp_path / "store", [named_iris_classifier], {"redact": redact})
    client = webtest.TestApp(make_app(store=store, access_log=True, default_model="m"))
    row = dict(zip(IRIS_FEATURES, ROWS[0][:3] + [SECRET]))
    with caplog.at_level(logging.INFO, logger="service.access"):
        assert client.get("/predict/" + urllib.parse.quote(json.dumps([row]))).status_int == 200
        refused = client.get("/predict/" + urllib.parse.quote(json.dumps([{**row, "sepal_length": "x"}])),
                             expect_errors=True)
        assert refused.status_int == 400
        assert client.post_json("/models/m/versions/1/predict", {"instances": [row]}).status_int == 200
    lines = [record.getMessage() for record in caplog.records if record.name == "service.access"]
    assert len(lines) == 3
    if redact:
        assert all(str(SECRET) not in line for line in lines), lines
        assert " GET /predict/{sentence} 200 " in lines[0] and " GET /predict/{sentence} 400 " in lines[1]
    else:
        assert str(SECRET) in urllib.parse.unquote(lines[0])
    assert " POST /models/m/versions/1/predict 200 " in lines[2]


@pytest.mark.parametrize("redact", [["text"], []])
def test_error_logs_of_a_redacting_model_give_the_kind_of_error_not_its_message(tmp_path, iris_classifier, caplog,
                                                                              make_app, monkeypatch, redact):
    """A shadow that refuses the inputs, and a fault of the service's own, are logged: scikit-learn's and our
    messages quote the input ("could not convert string to float: 'secret-...'"), so for a model that redacts
    features they are written as their kind."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["good day", "bad day", "good", "bad"],
                                                                       [1, 0, 1, 0])
    store = versioned_store(tmp_path / "store", [texts, iris_classifier],
                            {"version_policy": "all", "labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 1},
                             "shadow": "canary", "redact": redact})
    app = make_app(store=store)
    client = webtest.TestApp(app)
    with caplog.at_level(logging.WARNING, logger="service"):
        assert client.post_json("/models/m/predict", {"instances": ["secret-078-05-1120"]}).status_int == 200
        wait_until(lambda: "shadow version 2" in caplog.text, what="the shadow's failure")
        real_call = service.LoadedModel.call

        def faulty(model, method, inputs):          # a fault of ours whose message quotes the inputs
            raise RuntimeError(f"cannot handle {inputs!r}")
        monkeypatch.setattr(service.LoadedModel, "call", faulty)
        assert client.post_json("/models/m/predict", {"instances": ["secret-078-05-1120"]},
                                expect_errors=True).status_int == 500
        monkeypatch.setattr(service.LoadedModel, "call", real_call)
    assert "internal error" in caplog.text and "RuntimeError" in caplog.text
    assert ("secret-078-05-1120" in caplog.text) == (not redact), caplog.text
    if redact:
        assert "message withheld: the model redacts features" in caplog.text
