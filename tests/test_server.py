"""The real server over loopback: `python service.py`, the WSGI hosts embedding service:app,
bad artifacts, concurrency and the repository's demo store.  Every process binds 127.0.0.1."""

import concurrent.futures
import gc
import http.client
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import weakref

import joblib
import numpy as np
import pandas
import pytest
import requests
from sklearn.datasets import load_diabetes

import service
import support
from support import (IRIS_FEATURES, ROOT, TIMEOUT, LiveServer, assert_error, free_port, gunicorn_command,
                     service_command, wait_until, write_artifact)

BIN = os.path.dirname(sys.executable)
DEMO_STORE = os.path.join(ROOT, "model_store")


def post(base, path, payload, **kwargs):
    return requests.post(base + path, json=payload, timeout=TIMEOUT, **kwargs)


def joblib_store(root, **models):
    """A single-format store: name=estimator -> <root>/<name>.joblib."""
    for name, estimator in models.items():
        write_artifact(os.path.join(root, f"{name}.joblib"), estimator, "joblib")
    return root


###############################################################################
# One shared server: routes, errors, limits
###############################################################################


@pytest.fixture(scope="module")
def server(tmp_path_factory, iris_classifier, named_iris_classifier, diabetes_regressor):
    """`python service.py` over a joblib store, --max-body-bytes 1000; yields (base URL, port)."""
    root = tmp_path_factory.mktemp("shared") / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / "flowers" / "1" / "model.joblib", named_iris_classifier, "joblib")
    write_artifact(root / "diabetes" / "1" / "model.joblib", diabetes_regressor, "joblib")
    write_artifact(root / "diabetes" / "2" / "model.joblib", diabetes_regressor, "joblib")
    port = free_port()
    with LiveServer(service_command(root, port, "--max-body-bytes", "1000", "--threads", "8"), port) as live:
        yield live.base, port


def test_healthz_readyz_and_index_answer_json(server):
    base, _ = server
    health = requests.get(base + "/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json() == {"status": "alive"}
    assert health.headers["Content-Type"].startswith("application/json")
    ready = requests.get(base + "/readyz", timeout=TIMEOUT)
    assert ready.status_code == 200 and ready.json() == {"ready": True, "models": 3, "loaded": 0}
    index = requests.get(base + "/", timeout=TIMEOUT).json()
    assert index["name"] == "model-service" and index["version"] == service.__version__
    assert index["models"] == ["diabetes", "flowers", "iris"]


def test_models_lists_every_model_with_its_versions_newest_first(server):
    base, _ = server
    response = requests.get(base + "/models", timeout=TIMEOUT)
    assert response.status_code == 200
    models = {model["name"]: model for model in response.json()["models"]}
    assert sorted(models) == ["diabetes", "flowers", "iris"]
    assert models["diabetes"]["latest_version"] == "2"
    assert [v["version"] for v in models["diabetes"]["versions"]] == ["2", "1"]
    assert models["iris"]["versions"][0]["format"] == "joblib"


def test_post_predict_matches_the_estimators_own_predict(server, iris, iris_classifier):
    base, _ = server
    features = iris[0][::10]
    response = post(base, "/models/iris/predict", {"instances": features.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "iris" and body["version"] == "1" and body["method"] == "predict"
    assert body["predictions"] == iris_classifier.predict(features).tolist()


def test_post_predict_proba_returns_probabilities_and_classes(server, iris, iris_classifier):
    base, _ = server
    features = iris[0][:3]
    body = post(base, "/models/iris/predict", {"instances": features.tolist(), "method": "predict_proba"}).json()
    assert body["classes"] == iris_classifier.classes_.tolist()
    np.testing.assert_allclose(body["predictions"], iris_classifier.predict_proba(features), rtol=1e-12)


def test_get_predict_with_instances_query_matches_the_estimator(server, iris, iris_classifier):
    base, _ = server
    features = iris[0][[0, 60, 120]]
    response = requests.get(base + "/models/iris/predict", params={"instances": json.dumps(features.tolist())},
                            timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == iris_classifier.predict(features).tolist()


def test_named_feature_rows_reach_a_model_fitted_on_a_dataframe(server, named_iris_classifier):
    base, _ = server
    rows = [dict(zip(IRIS_FEATURES, [5.1, 3.5, 1.4, 0.2])), dict(zip(IRIS_FEATURES, [6.7, 3.0, 5.2, 2.3]))]
    expected = named_iris_classifier.predict(pandas.DataFrame(rows, columns=IRIS_FEATURES)).tolist()
    assert post(base, "/models/flowers/predict", {"instances": rows}).json()["predictions"] == expected


def test_unknown_model_answers_404_json(server):
    base, _ = server
    body = assert_error(post(base, "/models/nosuch/predict", {"instances": [[1, 2, 3, 4]]}), 404, code="not_found")
    assert body["models"] == ["diabetes", "flowers", "iris"]
    assert_error(requests.get(base + "/models/nosuch", timeout=TIMEOUT), 404, code="not_found")


def test_malformed_json_answers_400_json(server):
    base, _ = server
    response = requests.post(base + "/models/iris/predict", data=b'{"instances": [[1, 2, 3, 4]',
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    body = assert_error(response, 400, code="bad_request")
    assert "not valid JSON" in body["error"]


def test_body_over_max_body_bytes_answers_413_json(server):
    base, _ = server
    response = requests.post(base + "/models/iris/predict", data=b" " * 1500,
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    body = assert_error(response, 413, code="payload_too_large")
    assert "1000" in body["error"]


def test_chunked_body_over_max_body_bytes_answers_413_json(server):
    base, _ = server
    chunks = (b" " * 100 for _ in range(15))        # a generator: sent with Transfer-Encoding: chunked
    response = requests.post(base + "/models/iris/predict", data=chunks,
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert_error(response, 413, code="payload_too_large")


def test_body_at_max_body_bytes_is_accepted(server, iris_classifier):
    base, _ = server
    payload = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
    payload += b" " * (1000 - len(payload))
    response = requests.post(base + "/models/iris/predict", data=payload,
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == iris_classifier.predict([[5.1, 3.5, 1.4, 0.2]]).tolist()


def test_body_over_twice_max_body_bytes_is_cut_off_by_waitress_with_413(server):
    """As README says: waitress itself refuses bodies over twice the limit (in plain text) before buffering them."""
    base, _ = server
    response = requests.post(base + "/models/iris/predict", data=b" " * 5000,
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 413 and "Traceback" not in response.text


def test_unknown_route_answers_404_json(server):
    base, _ = server
    body = assert_error(requests.get(base + "/no/such/route", timeout=TIMEOUT), 404, code="not_found")
    assert "/no/such/route" in body["error"]


def test_put_answers_405_json_with_allow_header(server):
    base, _ = server
    response = requests.put(base + "/models/iris/predict", json={"instances": [[1, 2, 3, 4]]}, timeout=TIMEOUT)
    assert_error(response, 405, code="method_not_allowed")
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert_error(requests.put(base + "/models", timeout=TIMEOUT), 405, code="method_not_allowed")


def test_malformed_request_does_not_disturb_a_concurrent_good_one(server, iris, iris_classifier):
    base, port = server
    features = iris[0][:5]
    expected = iris_classifier.predict(features).tolist()
    bad_body = b'{"instances": [[1, 2, 3, 4]], oops}'
    head = (b"POST /models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(bad_body))
    # A malformed request is half sent and left pending while a good one is answered ...
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as pending:
        pending.sendall(head + bad_body[:10])
        good = post(base, "/models/iris/predict", {"instances": features.tolist()})
        assert good.status_code == 200 and good.json()["predictions"] == expected
        # ... and when it completes it gets its own 400.
        pending.sendall(bad_body[10:])
        answer = http.client.HTTPResponse(pending)
        answer.begin()
        assert answer.status == 400 and answer.getheader("Content-Type").startswith("application/json")
        assert json.loads(answer.read())["code"] == "bad_request"

    # Side by side, many times: every good request is right, every bad one is a 400.
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait(TIMEOUT)
        if i % 2:
            return requests.post(base + "/models/iris/predict", data=bad_body,
                                 headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        return post(base, "/models/iris/predict", {"instances": features.tolist()})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    for i, response in enumerate(responses):
        if i % 2:
            assert_error(response, 400, code="bad_request")
        else:
            assert response.status_code == 200 and response.json()["predictions"] == expected


###############################################################################
# Artifact formats
###############################################################################


@pytest.mark.slow
def test_each_artifact_format_serves_predictions_over_http(store_in_each_format, artifact_format, serve_store, iris,
                                                           iris_classifier, named_iris_classifier,
                                                           diabetes_regressor):
    features = iris[0][::25]
    diabetes = load_diabetes().data[:4]
    with serve_store(store_in_each_format) as server:
        base = server.base
        models = {m["name"]: m for m in requests.get(base + "/models", timeout=TIMEOUT).json()["models"]}
        assert {v["format"] for m in models.values() for v in m["versions"]} == {artifact_format}

        iris_body = post(base, "/models/iris/predict", {"instances": features.tolist()}).json()
        assert iris_body["predictions"] == iris_classifier.predict(features).tolist()

        for path, version in [("/models/diabetes/predict", "2"), ("/models/diabetes/versions/1/predict", "1")]:
            body = post(base, path, {"instances": diabetes.tolist()}).json()
            assert body["version"] == version
            assert body["predictions"] == pytest.approx(diabetes_regressor.predict(diabetes).tolist(), rel=1e-12)

        rows = [dict(zip(IRIS_FEATURES, row)) for row in features.tolist()]
        expected = named_iris_classifier.predict(pandas.DataFrame(features, columns=IRIS_FEATURES)).tolist()
        assert post(base, "/models/flowers/predict", {"instances": rows}).json()["predictions"] == expected
    assert "Traceback" not in server.output()


###############################################################################
# Binding and configuration
###############################################################################


@pytest.mark.slow
def test_binds_127_0_0_1_by_default(serve_store, tmp_path):
    (tmp_path / "empty").mkdir()
    with serve_store(tmp_path / "empty") as server:
        base = server.base
        port = int(base.rsplit(":", 1)[1])
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT).status_code == 200
    assert f"Serving on http://127.0.0.1:{port}" in server.output()
    assert "reachable from other machines" not in server.output()


@pytest.mark.slow
def test_store_and_port_come_from_the_environment_without_flags(tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    port = free_port()
    env = {"MODEL_SERVICE_STORE": str(root), "MODEL_SERVICE_PORT": str(port)}
    with LiveServer([sys.executable, os.path.join(ROOT, "service.py")], port, env=env) as server:
        base = server.base
        body = post(base, "/models/iris/predict", {"instances": iris[0][:3].tolist()}).json()
        assert body["predictions"] == iris_classifier.predict(iris[0][:3]).tolist()
    assert f"Serving on http://127.0.0.1:{port}" in server.output()


@pytest.mark.slow
def test_port_flag_beats_the_environment(tmp_path):
    (tmp_path / "empty").mkdir()
    env_port = free_port()
    flag_port = free_port()
    while flag_port == env_port:
        flag_port = free_port()
    with LiveServer(service_command(tmp_path / "empty", flag_port), flag_port,
                    env={"MODEL_SERVICE_PORT": str(env_port)}) as server:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{env_port}/healthz", timeout=5)
    assert f"Serving on http://127.0.0.1:{flag_port}" in server.output()


def test_a_port_already_in_use_exits_1_with_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "--store",
                                 str(tmp_path / "empty"), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_wsgiref_server_serves_predictions(serve_store, tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    with serve_store(root, "--server", "wsgiref") as server:
        base = server.base
        response = post(base, "/models/iris/predict", {"instances": iris[0][:4].tolist()})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == iris_classifier.predict(iris[0][:4]).tolist()
        assert_error(requests.get(base + "/nope", timeout=TIMEOUT), 404, code="not_found")
    assert "Traceback" not in server.output()


###############################################################################
# Embedding service:app in WSGI hosts
###############################################################################


def check_embedded(command, port, root, iris, iris_classifier, env=None):
    """The host serves service:app configured from MODEL_SERVICE_*, and prints the service's INFO lines once."""
    with LiveServer(command, port, env={"MODEL_SERVICE_STORE": str(root), **(env or {})}) as server:
        base = server.base
        assert requests.get(base + "/readyz", timeout=TIMEOUT).json() == {"ready": True, "models": 1, "loaded": 0}
        response = post(base, "/models/iris/predict", {"instances": iris[0][::30].tolist()},
                        headers={"X-Request-ID": "embedded-1"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == iris_classifier.predict(iris[0][::30]).tolist()
    assert "Traceback" not in server.output()
    assert server.output().count(f"model store {root}: 1 model(s): iris") == 1, server.output()
    assert server.output().count("loaded model 'iris' version 1 (joblib, ") == 1, server.output()
    return server.output()


@pytest.mark.slow
def test_waitress_serve_embeds_service_app(tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    port = free_port()
    command = [os.path.join(BIN, "waitress-serve"), f"--listen=127.0.0.1:{port}", "service:app"]
    check_embedded(command, port, root, iris, iris_classifier)


@pytest.mark.slow
def test_waitress_serve_call_create_app(tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    port = free_port()
    command = [os.path.join(BIN, "waitress-serve"), f"--listen=127.0.0.1:{port}", "--call", "service:create_app"]
    check_embedded(command, port, root, iris, iris_classifier)


@pytest.mark.slow
def test_gunicorn_embeds_service_app(tmp_path, iris, iris_classifier):
    """gunicorn configures no handler the service's lines reach: the service gives its logger one."""
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    port = free_port()
    output = check_embedded(gunicorn_command(port, "-w", "1", "-k", "sync"), port, root, iris, iris_classifier)
    assert re.search(r"INFO service\[\d+\]: loaded model 'iris' version 1 ", output), output


@pytest.mark.slow
def test_a_host_that_configured_logging_gets_the_lines_in_its_format_once(tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    settings = tmp_path / "gunicorn_conf.py"
    settings.write_text("import logging\nlogging.basicConfig(level=logging.INFO, format='HOST %(name)s %(message)s')\n")
    port = free_port()
    command = gunicorn_command(port, "-w", "1", "-k", "sync", "-c", str(settings))
    output = check_embedded(command, port, root, iris, iris_classifier)
    assert "HOST service loaded model 'iris' version 1 (joblib, " in output, "the host's handler, not a second one"


@pytest.mark.slow
def test_log_format_json_prints_one_object_per_line_with_what_it_concerns(tmp_path, iris, iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    port = free_port()
    output = check_embedded(gunicorn_command(port, "-w", "1", "-k", "sync"), port, root, iris, iris_classifier,
                            env={"MODEL_SERVICE_LOG_FORMAT": "json", "MODEL_SERVICE_ACCESS_LOG": "yes"})
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    service_lines = [line for line in lines if line["logger"].startswith("service")]
    assert all({"time", "level", "logger", "pid", "message"} <= set(line) for line in service_lines)
    scan, = [line for line in service_lines if line["message"].startswith("model store ")]
    assert scan["level"] == "INFO" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", scan["time"])
    load, = [line for line in service_lines if line["message"].startswith("loaded model 'iris' version 1 ")]
    assert (load["model"], load["version"], load["request_id"]) == ("iris", "1", "embedded-1"), \
        "loaded on demand, for the request that asked"
    access = [line for line in service_lines if line["logger"] == "service.access" and "/predict" in line["message"]]
    assert [line["request_id"] for line in access] == ["embedded-1"]


###############################################################################
# Failures and concurrency
###############################################################################


@pytest.mark.slow
def test_bad_artifact_answers_503_while_the_good_model_keeps_serving(serve_store, tmp_path, iris,
                                                                    iris_classifier):
    root = joblib_store(tmp_path / "store", good=iris_classifier)
    (root / "bad.joblib").write_bytes(b"this is not a joblib file")
    features = iris[0][:3].tolist()
    with serve_store(root) as server:
        base = server.base
        for _ in range(2):                                  # the first load and the remembered failure
            response = post(base, "/models/bad/predict", {"instances": features})
            body = assert_error(response, 503, code="model_unavailable")
            assert "bad.joblib" in body["error"] and "cannot load" in body["error"]
            assert body["model"] == "bad" and body["version"] == "1"
            assert int(response.headers["Retry-After"]) > 0
        status = requests.get(base + "/models/bad", timeout=TIMEOUT).json()["versions"][0]
        assert status["state"] == "FAILED" and "bad.joblib" in status["last_error"]

        good = post(base, "/models/good/predict", {"instances": features})
        assert good.status_code == 200 and good.json()["predictions"] == iris_classifier.predict(features).tolist()
        assert requests.get(base + "/healthz", timeout=TIMEOUT).status_code == 200
        assert requests.get(base + "/readyz", timeout=TIMEOUT).json() == {"ready": True, "models": 2, "loaded": 1}
    assert "model 'bad' version 1 failed to load" in server.output()
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_concurrent_first_requests_all_succeed_and_load_the_model_once(serve_store, tmp_path, iris,
                                                                      iris_classifier):
    root = joblib_store(tmp_path / "store", iris=iris_classifier)
    features = iris[0]
    threads = 16
    with serve_store(root, "--threads", str(threads)) as server:
        base = server.base
        barrier = threading.Barrier(threads)

        def first_request(_):
            barrier.wait(TIMEOUT)
            return post(base, "/models/iris/predict", {"instances": features.tolist()})

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            responses = list(pool.map(first_request, range(threads)))
        assert [r.status_code for r in responses] == [200] * threads
        assert len({r.text for r in responses}) == 1
        assert responses[0].json()["predictions"] == iris_classifier.predict(features).tolist()

        version = requests.get(base + "/models/iris", timeout=TIMEOUT).json()["versions"][0]
        assert version["state"] == "AVAILABLE" and version["loads"] == 1
    assert server.output().count("loaded model 'iris' version 1") == 1


###############################################################################
# The repository's demo store
###############################################################################


def demo_expectations():
    """(path, payload, expected predictions) for every model and version of model_store/."""
    iris_rows = [[5.1, 3.5, 1.4, 0.2], [6.0, 2.9, 4.5, 1.5], [6.7, 3.0, 5.2, 2.3]]
    diabetes = load_diabetes(as_frame=True).data.iloc[:3]
    texts = ["a wonderful film with brilliant acting", "boring and awful, a waste of time"]
    iris_frame = pandas.DataFrame(iris_rows, columns=IRIS_FEATURES)
    cases = []
    for version in ("1", "2"):
        model = joblib.load(os.path.join(DEMO_STORE, "iris", version, "model.joblib"))
        cases.append((f"/models/iris/versions/{version}/predict", {"instances": iris_rows},
                      model.predict(iris_frame).tolist()))
    cases.append(("/models/iris/predict", {"instances": iris_frame.to_dict("records")}, cases[-1][2]))
    regressor = service.load_json_model(os.path.join(DEMO_STORE, "diabetes.json"))
    cases.append(("/models/diabetes/predict", {"instances": diabetes.to_dict("records")},
                  regressor.predict(diabetes).tolist()))
    with open(os.path.join(DEMO_STORE, "sentiment.pkl"), "rb") as handle:
        sentiment = pickle.load(handle)
    cases.append(("/models/sentiment/predict", {"instances": texts}, sentiment.predict(texts).tolist()))
    cases.append(("/models/sentiment/predict", {"instances": texts, "method": "predict_proba"},
                  sentiment.predict_proba(texts).tolist()))
    return cases


@pytest.mark.slow
def test_demo_store_serves_every_model_without_warnings_or_tracebacks(serve_store):
    cases = demo_expectations()
    with serve_store(DEMO_STORE) as server:
        base = server.base
        models = requests.get(base + "/models", timeout=TIMEOUT).json()["models"]
        assert [m["name"] for m in models] == ["diabetes", "iris", "sentiment"]
        for path, payload, expected in cases:
            response = post(base, path, payload)
            assert response.status_code == 200, (path, response.text)
            predictions = response.json()["predictions"]
            if isinstance(expected[0], str):
                assert predictions == expected, path
            else:
                np.testing.assert_allclose(predictions, expected, rtol=1e-9, err_msg=path)
        states = {(m["name"], v["version"]): v["state"]
                  for m in requests.get(base + "/models", timeout=TIMEOUT).json()["models"] for v in m["versions"]}
        assert set(states.values()) == {"AVAILABLE"}, states
    output = server.output()
    assert "WARNING" not in output
    assert re.search(r"warning", output, re.IGNORECASE) is None, output     # nor Python warnings
    assert "Traceback" not in output and "ERROR" not in output, output


@pytest.mark.slow
def test_demo_text_model_answers_400_for_instances_that_are_not_text(serve_store):
    with serve_store(DEMO_STORE) as server:
        base = server.base
        for instances in ([1, 2], [None], [{"text": "good"}]):
            response = post(base, "/models/sentiment/predict", {"instances": instances})
            assert response.status_code == 400, (instances, response.status_code, response.text)
            assert response.json()["code"] == "bad_request"
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_python_m_service_on_all_interfaces_warns_and_stops_cleanly_on_sigterm(tmp_path, iris_classifier):
    """`python -m service` works like `python service.py`; a non-loopback --host is warned about; SIGTERM exits 0."""
    root = joblib_store(tmp_path / "store", good=iris_classifier)
    port = free_port()
    command = [sys.executable, "-m", "service", "--store", str(root), "--port", str(port), "--host", "0.0.0.0"]
    with LiveServer(command, port) as server:
        base = server.base
        assert requests.get(base + "/readyz", timeout=TIMEOUT).status_code == 200
    assert server.returncode == 0
    assert "binding 0.0.0.0: the service is reachable from other machines" in server.output()
    assert "SIGTERM" in server.output() and "Traceback" not in server.output()


def serve_here(app, config, check):
    """serve(app, config) in this process's main thread while `check()` runs in another, which stops it (SIGTERM)
    once done; check's failure, if any, is raised here after serve() returned."""
    failures, before = [], signal.getsignal(signal.SIGTERM)

    def run():
        try:
            wait_until(lambda: signal.getsignal(signal.SIGTERM) is not before, timeout=TIMEOUT, what="serve()")
            check()
        except BaseException as failure:
            failures.append(failure)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    checker = threading.Thread(target=run)
    checker.start()
    try:
        service.serve(app, config)
        checker.join()
    finally:
        app.registry.stop_watching()
    if failures:
        raise failures[0]


@pytest.mark.slow
def test_the_server_freezes_its_heap_as_models_load_and_frees_the_versions_it_retires(tmp_path, iris_classifier):
    """serve() settles the heap (a full collection, then gc.freeze) when it starts and whenever a model enters or
    leaves memory: a model once loaded is skipped by later collections (a full one walked every object the
    process holds, stopping every thread, and was the tail under load), and a version taken out of service is
    freed although it was frozen (batching gives it a reference cycle, which only a collection frees).  Slow: in
    this process's heap (pytest's) a collection takes long, and settling waits 19 times as long after each."""
    store = tmp_path / "store"
    support.publish(str(store / "iris" / "1" / "model.joblib"), iris_classifier)
    port = free_port()
    config = service.Config(store=str(store), port=port, poll_interval=0.05, shutdown_timeout=1.0, max_batch_size=4)
    app = service.create_app(config=config)
    settling = 90                   # seconds: a few settles of a heap this large, each rate-limited

    def tracked(thing):
        return any(candidate is thing for candidate in gc.get_objects())

    def check():
        answer = post(f"http://127.0.0.1:{port}", "/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200, answer.text
        model = app.registry.slot("iris", 1).model
        assert model.batcher.model is model                 # the cycle a retired version must not keep
        wait_until(lambda: not tracked(model), timeout=settling, what="the loaded model frozen", interval=0.2)
        retired = weakref.ref(model)
        del model
        support.publish(str(store / "iris" / "2" / "model.joblib"), iris_classifier)
        wait_until(lambda: retired() is None, timeout=settling, what="version 1 freed once version 2 serves")
        wait_until(lambda: not tracked(app.registry.slot("iris", 2).model), timeout=settling,
                   what="version 2 frozen in its turn", interval=0.2)

    serve_here(app, config, check)
    assert gc.get_freeze_count() == 0            # serve() unfreezes when it returns: the caller's heap again


@pytest.mark.parametrize("server", ["waitress", "wsgiref"])
def test_serve_gives_sigterm_and_sigint_their_handlers_back_when_it_returns(tmp_path, server):
    """serve() in this process's main thread: it takes SIGTERM and SIGINT while it runs (SIGTERM stops it) and
    leaves them as they were, whichever server it ran."""
    def mine(signum, frame):
        raise AssertionError("serve() had not taken SIGTERM")

    config = service.Config(store=str(tmp_path), server=server, port=0, shutdown_timeout=1.0)
    app = service.create_app(config=config)
    before = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        serve_here(app, config, lambda: None)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (mine, before[1])
    finally:
        signal.signal(signal.SIGTERM, before[0])
