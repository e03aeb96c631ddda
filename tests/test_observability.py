"""Metrics (/metrics, parsed with prometheus_client's parser), X-Request-ID and the access log, adaptive
batching (identical answers, bad requests failing alone, off where rows are not independent), and
--workers N (gunicorn processes serving the same store, their metrics summed in one scrape)."""

import concurrent.futures
import json
import logging
import os
import signal

import numpy as np
import pytest
import requests
import webtest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

import service
from support import (ROW, LiveServer, free_port, gunicorn_command, metric_value, service_command, versioned_store,
                     wait_until, write_artifact)


@pytest.fixture
def app(tmp_path, iris_classifier, make_client):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    (tmp_path / "broken.joblib").write_bytes(b"not a model")
    return make_client(tmp_path, poll_interval=0)


def families(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(family, suffix="", **labels):
    for item in family.samples:
        if item.name == family.name + suffix and all(item.labels.get(k) == v for k, v in labels.items()):
            return item.value
    return None


def test_metrics_count_requests_latency_loads_and_gauges(app):
    for _ in range(3):
        app.post_json("/models/iris/predict", {"instances": ROW})
    app.post_json("/models/iris/predict", {"instances": [[1, 2]]}, status=400)
    app.post_json("/models/broken/predict", {"instances": ROW}, status=503)
    response = app.get("/metrics")
    assert response.content_type == "text/plain"
    parsed = families(response.text)
    requests_ = parsed["model_service_requests"]
    assert sample(requests_, "_total", model="iris", version="1", method="predict", status="200") == 3
    assert sample(requests_, "_total", model="iris", version="1", status="400") == 1
    assert sample(requests_, "_total", model="broken", status="503") == 1
    latency = parsed["model_service_request_duration_seconds"]
    assert sample(latency, "_count", model="iris", method="predict") == 3
    assert sample(latency, "_bucket", model="iris", method="predict", le="+Inf") == 3
    loads = parsed["model_service_model_loads"]
    assert sample(loads, "_total", model="iris", outcome="success") == 1
    assert sample(loads, "_total", model="broken", outcome="failure") == 1
    assert sample(parsed["model_service_model_load_duration_seconds"], "_count", model="iris") == 1
    assert sample(parsed["model_service_models_loaded"]) == 1
    assert sample(parsed["model_service_requests_in_flight"]) == 0


def test_the_series_of_a_version_that_left_the_store_end_so_metrics_stay_bounded(tmp_path, iris_classifier,
                                                                                  make_client):
    """A store that keeps publishing versions must not grow /metrics forever."""
    import shutil

    for version in (1, 2):
        write_artifact(tmp_path / "iris" / str(version) / "model.joblib", iris_classifier, "joblib")
    (tmp_path / "iris" / "model-settings.json").write_text(json.dumps({"version_policy": "all"}))
    app = make_client(tmp_path, poll_interval=0, admin_token="admin-token-0123456789")
    for version in (1, 2):
        app.post_json(f"/models/iris/versions/{version}/predict", {"instances": ROW})

    def versions_in_metrics():
        return {item.labels.get("version") for family in families(app.get("/metrics").text).values()
                for item in family.samples if item.labels.get("model") == "iris"} - {None}
    assert versions_in_metrics() == {"1", "2"}
    shutil.rmtree(tmp_path / "iris" / "1")
    app.post("/admin/rescan", headers={"Authorization": "Bearer admin-token-0123456789"})
    assert versions_in_metrics() == {"2"}


def test_every_response_carries_a_request_id_the_access_log_shows(tmp_path, iris_classifier, caplog, make_client):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    app = make_client(tmp_path, poll_interval=0, access_log=True)
    caplog.set_level(logging.INFO, logger="service.access")
    given = app.post_json("/models/iris/predict", {"instances": ROW}, headers={"X-Request-ID": "trace-42.a"})
    assert given.headers["X-Request-ID"] == "trace-42.a"
    made = app.get("/no/such/route", status=404)
    assert len(made.headers["X-Request-ID"]) == 32
    unsafe = app.get("/models", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-ID"] != "bad id\twith spaces"
    log = caplog.text
    assert "POST /models/iris/predict 200" in log and "id=trace-42.a" in log
    assert "GET /no/such/route 404" in log and made.headers["X-Request-ID"] in log


def test_the_access_log_is_off_by_default_and_the_id_still_on_every_answer(tmp_path, iris_classifier, caplog,
                                                                           make_client):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path)
    caplog.set_level(logging.INFO, logger="service.access")
    assert len(client.get("/models").headers["X-Request-ID"]) == 32
    assert "GET /models" not in caplog.text


# -- batching --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def forest():
    x, y = make_classification(400, 20, random_state=0)
    return RandomForestClassifier(n_estimators=30, max_depth=8, random_state=0).fit(x, y), x


def hammer(client, path, bodies, threads=12):
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda body: client.post(path, json=body, timeout=60), bodies))


@pytest.mark.slow
def test_batched_answers_equal_unbatched_ones_and_batches_form(tmp_path, serve_store, forest):
    model, x = forest
    write_artifact(tmp_path / "store" / "rf.joblib", model, "joblib")
    with serve_store(tmp_path / "store", "--max-batch-size", "16", "--max-latency-ms", "5",
                     "--threads", "12") as server:
        base = server.base
        session = requests.Session()
        bodies = [{"instances": x[i:i + 1 + i % 3].tolist(), "method": "predict_proba"} for i in range(300)]
        answers = hammer(session, base + "/models/rf/predict", bodies)
        for body, answer in zip(bodies, answers):
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"] == model.predict_proba(np.array(body["instances"])).tolist()
        sizes = families(session.get(base + "/metrics", timeout=30).text)["model_service_batch_size"]
        calls, stacked = sample(sizes, "_count", model="rf"), sample(sizes, "_sum", model="rf")
        assert stacked == 300 and calls < 300, "concurrent requests were stacked into fewer predict calls"


@pytest.mark.slow
def test_one_bad_request_fails_alone_never_its_batch_mates(tmp_path, serve_store, forest):
    model, x = forest
    write_artifact(tmp_path / "store" / "rf.joblib", model, "joblib")
    with serve_store(tmp_path / "store", "--max-batch-size", "16", "--max-latency-ms", "5",
                     "--threads", "12") as server:
        base = server.base
        bodies = [{"instances": [[1.0, 2.0]] if i % 7 == 0 else x[i:i + 1].tolist()} for i in range(140)]
        answers = hammer(requests.Session(), base + "/models/rf/predict", bodies)
    for i, answer in enumerate(answers):
        if i % 7 == 0:
            assert answer.status_code == 400 and "expected 20 features" in answer.json()["error"]
        else:
            assert answer.status_code == 200 and answer.json()["predictions"] == model.predict(x[i:i + 1]).tolist()


def test_one_stacked_call_runs_at_a_time_and_the_next_batch_gathers_meanwhile(tmp_path, forest):
    """Two stacked calls at once would only fight over the GIL: while one runs, the next batch waits and grows."""
    import threading
    import time

    model, x = forest
    write_artifact(tmp_path / "rf.joblib", model, "joblib")
    registry = service.ModelRegistry(service.Config(store=str(tmp_path), max_batch_size=64, max_latency_ms=1),
                                     watch=False)
    registry.refresh()
    loaded = registry.get("rf")
    running, overlap, sizes, lock = [0], [0], [], threading.Lock()
    real_call = loaded.call

    def watched_call(method, inputs):      # the real call, observed: how many run at once, and their sizes
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
            sizes.append(len(inputs))
        try:
            time.sleep(0.02)               # a slow model: requests pile up behind the running batch
            return real_call(method, inputs)
        finally:
            with lock:
                running[0] -= 1

    loaded.call = watched_call

    def request(i):
        model_in_use = registry.acquire("rf")
        try:
            return model_in_use.predict("predict", x[i:i + 1])
        finally:
            registry.release(model_in_use)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(request, range(240)))
    assert [a.tolist() for a in answers] == [model.predict(x[i:i + 1]).tolist() for i in range(240)]
    assert overlap[0] == 1, "stacked calls of one model never run at once"
    assert sum(sizes) == 240 and max(sizes) > 8, f"batches gathered while another ran: {sizes}"


def test_float_inputs_are_checked_once_by_the_service_and_scikit_learn_skips_its_own_check(tmp_path,
                                                                                        iris_classifier, make_app):
    """assume_finite, applied knowingly: only for the plain estimators whose own check the service's
    NaN/infinity check is exactly (tests/test_prechecks.py proves it), and never left set in the thread."""
    import sklearn
    from sklearn.datasets import load_iris
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_iris()
    with_nan = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(data.data, data.target)
    scaled = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(data.data, data.target)
    for name, estimator in (("plain", iris_classifier), ("hgb", with_nan), ("scaled", scaled)):
        write_artifact(tmp_path / f"{name}.joblib", estimator, "joblib")
    registry = service.ModelRegistry(service.Config(store=str(tmp_path)), watch=False)
    registry.refresh()
    assert registry.get("plain").checked_call is not None
    assert registry.get("scaled").checked_call is None, "a pipeline's later steps keep their own checks"
    assert registry.get("hgb").checked_call is None, "histogram boosting checks in its own way (it takes infinity)"
    client = webtest.TestApp(make_app(registry=registry, config=registry.config))

    rows = data.data[:20].tolist()
    for name, estimator in (("plain", iris_classifier), ("hgb", with_nan), ("scaled", scaled)):
        answer = client.post_json(f"/models/{name}/predict", {"instances": rows, "method": "predict_proba"})
        assert answer.json["predictions"] == estimator.predict_proba(np.array(rows)).tolist()
    assert sklearn.get_config()["assume_finite"] is False, "the thread's scikit-learn config is restored"

    missing = [[None, 3.5, 1.4, 0.2]]
    for name in ("plain", "scaled"):      # no missing values here, whoever checks
        answer = client.post_json(f"/models/{name}/predict", {"instances": missing}, expect_errors=True)
        assert answer.status_int == 400 and "NaN" in answer.json["error"]
    answer = client.post_json("/models/hgb/predict", {"instances": missing})     # the forest takes them
    assert answer.json["predictions"] == with_nan.predict(np.array(missing, dtype=float)).tolist()
    model = registry.get("plain")
    for value in (np.inf, -np.inf):
        with pytest.raises(service.BadRequest, match="infinity"):
            model.call("predict", np.array([[value, 3.5, 1.4, 0.2]]))
    assert sklearn.get_config()["assume_finite"] is False


def test_batching_follows_model_settings_and_skips_non_tabular_models(tmp_path, iris_classifier, forest):
    write_artifact(tmp_path / "off" / "1" / "model.joblib", iris_classifier, "joblib")
    (tmp_path / "off" / "model-settings.json").write_text(json.dumps({"batching": False}))
    write_artifact(tmp_path / "tuned" / "1" / "model.joblib", iris_classifier, "joblib")
    (tmp_path / "tuned" / "model-settings.json").write_text(
        json.dumps({"batching": {"max_batch_size": 4, "max_latency_ms": 1}}))
    write_artifact(tmp_path / "default.joblib", iris_classifier, "joblib")
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    text = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["good film", "bad film"] * 3, [1, 0] * 3)
    write_artifact(tmp_path / "text.joblib", text, "joblib")
    registry = service.ModelRegistry(service.Config(store=str(tmp_path), max_batch_size=8), watch=False)
    registry.refresh()
    assert registry.get("off").batcher is None
    assert registry.get("tuned").batcher.max_size == 4 and registry.get("tuned").batcher.max_latency == 0.001
    assert registry.get("default").batcher.max_size == 8
    assert registry.get("text").batcher is None, "rows of a non-tabular model may not be independent"
    unbatched = service.ModelRegistry(service.Config(store=str(tmp_path)), watch=False)
    unbatched.refresh()
    assert unbatched.get("default").batcher is None, "off unless asked for"


@pytest.mark.parametrize("batching", [{"max_batch_size": 0}, {"max_latency_ms": 2}, {"size": 3}, "yes", 4])
def test_bad_batching_settings_are_refused(batching):
    with pytest.raises(ValueError, match="batching"):
        service.ModelSettings.parse({"batching": batching})


# -- several processes -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_workers_2_share_the_model_the_parent_loaded_before_forking(tmp_path, iris_classifier):
    """--preload under --workers: the model loads once, in gunicorn's parent before it boots a worker,
    and both workers answer with that copy, loading nothing themselves (lines carry their pid)."""
    import re
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port = free_port()
    server = LiveServer(service_command(tmp_path, port, "--workers", "2", "--preload", "--access-log"), port)

    def answering():
        return set(re.findall(r"service\.access\[(\d+)\]: \S+ POST /models/iris/predict 200 ", server.output()))
    with server:
        def predict():
            answer = requests.post(server.base + "/models/iris/predict", json={"instances": ROW}, timeout=30,
                                   headers={"Connection": "close"})
            assert answer.status_code == 200 and answer.json()["predictions"] == iris_classifier.predict(ROW).tolist()
            return len(answering()) == 2
        wait_until(predict, 60, "both workers to answer")
    assert server.returncode == 0
    output = server.output()
    parent, = re.findall(r"gunicorn\.error\[(\d+)\]: Listening at: ", output)
    workers = set(re.findall(r"Booting worker with pid: (\d+)", output))
    assert len(workers) == 2 and answering() == workers and parent not in workers
    loads = re.findall(r"service\[(\d+)\]: loaded model '(\w+)' version (\d+)", output)
    assert loads == [(parent, "iris", "1")], output
    assert output.index("loaded model 'iris' version 1") < output.index("Booting worker"), output


@pytest.mark.slow
def test_workers_2_preloaded_count_their_versions_from_the_start_as_readme_says(tmp_path, iris_classifier):
    """README: models_loaded sums each live worker's versions from the moment it starts.  Forked with the
    parent's 3 preloaded versions, each worker held 3 but wrote its gauge only at its first request: a scrape
    showed 0, then 3 once one worker had answered, 6 only once both had."""
    store = versioned_store(tmp_path, [iris_classifier] * 3, {"version_policy": "all"})
    port = free_port()
    command = service_command(store, port, "--workers", "2", "--preload", "--poll-interval", "0")
    with LiveServer(command, port, timeout=60) as server:
        base = server.base
        wait_until(lambda: scrape(base, "model_service_models_loaded") == 6, timeout=30,
                   what="both workers counting their 3 versions before any prediction")
        assert summed(requests.get(base + "/metrics", timeout=30).text, "model_service_requests_total") == 0
        for _ in range(10):
            assert requests.post(base + "/models/m/predict", json={"instances": ROW}, timeout=30).status_code == 200
        for _ in range(4):                  # whichever worker answers the scrape
            assert scrape(base, "model_service_models_loaded") == 6
    assert server.returncode == 0


def summed(text, name):
    """The sum of every sample `name` in a /metrics text, whatever its labels."""
    return sum(item.value for family in text_string_to_metric_families(text) for item in family.samples
               if item.name == name)


def scrape(base, name, **labels):
    return metric_value(requests.get(base + "/metrics", timeout=30).text, name, **labels)


def predict_until_both_workers_answered(base, count, path="/models/iris/predict"):
    """`count` predictions, each on a new connection, then more until each of the 2 workers has answered
    one (each loads the model at its first request: 2 versions in memory over the workers); returns how many
    were sent."""
    sent = 0

    def predict():
        nonlocal sent
        answer = requests.post(base + path, json={"instances": ROW}, timeout=30)
        assert answer.status_code == 200, answer.text
        sent += 1

    for _ in range(count):
        predict()
    wait_until(lambda: scrape(base, "model_service_models_loaded") == 2 or predict(), timeout=60,
               what="a request answered by each worker")
    return sent


def assert_one_scrape_counts(base, sent, loaded, model="iris", version="1"):
    text = requests.get(base + "/metrics", timeout=30).text
    assert summed(text, "model_service_requests_total") == sent, text
    assert summed(text, "model_service_request_duration_seconds_count") == sent
    assert metric_value(text, "model_service_request_duration_seconds_bucket", model=model, method="predict",
                        le="+Inf") == sent
    assert summed(text, "model_service_predict_calls_total") == sent
    assert metric_value(text, "model_service_model_loads_total", model=model, version=version, outcome="success") == 2
    assert metric_value(text, "model_service_models_loaded") == loaded
    assert metric_value(text, "model_service_requests_in_flight") == 0


def children(pid):
    """The process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue                        # gone meanwhile
    return found


@pytest.mark.slow
def test_workers_2_one_scrape_sums_the_counts_of_both_workers(tmp_path, iris_classifier):
    """Whichever worker answers the scrape, it reports every request both answered; a worker that dies takes
    its gauges with it and leaves its counts; the shared folder is removed at exit."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port = free_port()
    with LiveServer(service_command(tmp_path, port, "--workers", "2"), port) as server:
        base = server.base
        sent = predict_until_both_workers_answered(base, 30)
        for _ in range(4):                  # new connections: more than one worker answers the scrapes
            assert_one_scrape_counts(base, sent, loaded=2)
        workers = children(server.pid)
        assert len(workers) == 2
        with open(f"/proc/{workers[0]}/maps") as maps:     # the files it counts into are mapped in memory
            folder = next(os.path.dirname(line.split()[-1]) for line in maps if line.rstrip().endswith(".db"))
        assert os.path.basename(folder).startswith("model-service-metrics-")
        os.kill(workers[0], signal.SIGKILL)     # gunicorn starts another, which has loaded nothing yet
        wait_until(lambda: workers[0] not in children(server.pid) and len(children(server.pid)) == 2,
                   timeout=60, what="a new worker")
        wait_until(lambda: scrape(base, "model_service_models_loaded") == 1, timeout=30, what="its gauge gone")
        assert_one_scrape_counts(base, sent, loaded=1)
    assert server.returncode == 0
    assert not os.path.exists(folder), "the parent removes the shared folder at exit"


@pytest.mark.slow
def test_a_pre_fork_host_with_prometheus_multiproc_dir_sums_its_workers(tmp_path, iris_classifier):
    """`gunicorn service:app -w 2` with PROMETHEUS_MULTIPROC_DIR set, as README documents for any pre-fork
    host; a version that leaves the store leaves /metrics too, though its counts stay in the shared files."""
    import shutil

    store = versioned_store(tmp_path / "store", [iris_classifier] * 2, {"version_policy": "all"})
    (tmp_path / "metrics").mkdir()
    port = free_port()
    environment = {"MODEL_SERVICE_STORE": str(store), "MODEL_SERVICE_POLL_INTERVAL": "0.2",
                   "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    with LiveServer(gunicorn_command(port, "-w", "2", "-k", "gthread"), port, env=environment) as server:
        base = server.base
        sent = predict_until_both_workers_answered(base, 30, path="/models/m/versions/1/predict")
        assert_one_scrape_counts(base, sent, loaded=2, model="m")
        shutil.rmtree(store / "m" / "1")
        wait_until(lambda: scrape(base, "model_service_models_loaded") == 0, timeout=30,
                   what="both workers unloading version 1")
        wait_until(lambda: 'version="1"' not in requests.get(base + "/metrics", timeout=30).text, timeout=10,
                   what="version 1 forgotten")
        for _ in range(4):                  # whichever worker answers: both forgot it
            text = requests.get(base + "/metrics", timeout=30).text
            assert 'version="1"' not in text and summed(text, "model_service_requests_total") == 0, text
    assert server.returncode == 0


# -- lean request path -----------------------------------------------------------------------------------

def test_a_model_fitted_on_named_columns_takes_arrays_unless_it_selects_columns_by_name(tmp_path,
                                                                                       named_iris_classifier,
                                                                                       make_app):
    """A DataFrame per request costs about a millisecond; models that answer arrays identically get arrays
    (their names are taken off at load, so scikit-learn has nothing to warn about), the rest DataFrames."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from support import IRIS_FEATURES
    data = load_iris()
    frame = pd.DataFrame(data.data, columns=IRIS_FEATURES)
    by_name = make_pipeline(ColumnTransformer([("scaled", StandardScaler(), ["petal_length", "petal_width"])]),
                            LogisticRegression(max_iter=1000)).fit(frame, data.target)
    write_artifact(tmp_path / "named.joblib", named_iris_classifier, "joblib")
    write_artifact(tmp_path / "by_name.joblib", by_name, "joblib")
    registry = service.ModelRegistry(service.Config(store=str(tmp_path)), watch=False)
    registry.refresh()
    named, selecting = registry.get("named"), registry.get("by_name")
    assert named.make_frame is None and named.feature_names == IRIS_FEATURES
    assert selecting.make_frame is not None
    client = webtest.TestApp(make_app(registry=registry, config=registry.config))
    rows = frame.iloc[:5]
    for name, model in (("named", named_iris_classifier), ("by_name", by_name)):
        answer = client.post_json(f"/models/{name}/predict", {"instances": rows.to_dict("records"),
                                                              "method": "predict_proba"})
        assert answer.json["predictions"] == model.predict_proba(rows).tolist()
    assert client.get("/models/named").json["versions"][0]["feature_names_in_"] == IRIS_FEATURES
