"""Model lifecycle: per-model settings (version policies, labels), version status, preloading and
readiness, the --max-loaded memory bound, idle unloads and the admin routes (rescan, reload).

Every model is a real estimator trained on scikit-learn's bundled data and written into a tmp_path
store.  HTTP-level tests go through WebTest; tests that need time or ordering to be deterministic
drive a ModelRegistry with a ManualClock (watch=False), sometimes wrapped in create_app.
"""

import base64
import concurrent.futures
import gc
import hashlib
import json
import logging
import os
import threading
import weakref

import joblib
import numpy as np
import pytest
import webtest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import service
from doubles import SlowToLoad
from support import (DIABETES_ROWS, ROWS, assert_error, clocked_registry, metric_value, publish, stays_true,
                     strict_json, versioned_store, wait_until, write_artifact, write_settings)

TOKEN = "s3cr3t-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


# -- models and helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weak_classifier():
    """Same shape as iris_classifier (so its artifact has the same size) but other coefficients."""
    data = load_iris()
    return LogisticRegression(max_iter=1000, C=0.01).fit(data.data, data.target)


def assert_answers(registry, version, estimator, name="m", **where):
    """A request for `name` (and a version or label) answers from `version`, with `estimator`'s outputs."""
    model = registry.acquire(name, **where)
    try:
        assert model.version == version
        assert model.predict("predict", np.array(ROWS)).tolist() == expected(estimator)
    finally:
        registry.release(model)


@pytest.fixture
def clocked_client(make_app):
    """clocked_client(root, **options) -> (WebTest client, registry): an app over a clocked_registry, whose
    clock the test moves; each request refreshes the registry."""
    def make(root, **options):
        registry = clocked_registry(root, **options)
        return webtest.TestApp(make_app(config=registry.config, registry=registry)), registry
    return make


@pytest.fixture
def app_client(make_client):
    """make_client (which stops each app's watcher thread at teardown)."""
    return make_client


def registry_of(client):
    return client.app.registry


def predict(client, url, rows=ROWS, **kwargs):
    return strict_json(client.post_json(url, {"instances": rows}, **kwargs))


def version_status(client, name, version):
    body = strict_json(client.get(f"/models/{name}"))
    return next(v for v in body["versions"] if v["version"] == str(version))


def readiness(client):
    response = client.get("/readyz", expect_errors=True)
    return response.status_int, strict_json(response)


def expected(estimator, rows=ROWS, method="predict"):
    return getattr(estimator, method)(np.array(rows)).tolist()


# -- 1. settings: version policies ---------------------------------------------------------------------------

def test_without_settings_only_the_highest_version_serves(tmp_path, make_client, iris_classifier,
                                                         named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier])
    client = make_client(tmp_path, poll_interval=0)
    body = predict(client, "/models/m/predict")
    assert body["version"] == "2" and body["predictions"] == expected(named_labels_classifier)
    error = assert_error(client.post_json("/models/m/versions/1/predict", {"instances": ROWS}, expect_errors=True),
                         404, "model 'm' does not serve version 1")
    assert error["served_versions"] == ["2"]
    error = assert_error(client.post_json("/models/m/versions/3/predict", {"instances": ROWS}, expect_errors=True),
                         404, "model 'm' has no version 3")
    assert error["served_versions"] == ["2"]
    status = strict_json(client.get("/models/m"))
    assert status["version_policy"] == "latest" and status["labels"] == {} and status["settings_error"] is None
    assert status["latest_version"] == "2" and status["served_versions"] == ["2"]
    assert [(v["version"], v["served"], v["labels"]) for v in status["versions"]] == \
        [("2", True, []), ("1", False, [])]
    unserved = strict_json(client.get("/models/m/versions/1"))
    assert (unserved["name"], unserved["version"], unserved["served"], unserved["state"]) == \
        ("m", "1", False, "UNLOADED")


@pytest.mark.parametrize("policy, served", [
    ("latest", ["3"]),
    ("all", ["3", "2", "1"]),
    ({"latest": 2}, ["3", "2"]),
    ({"specific": [1, 3]}, ["3", "1"]),
    ({"specific": ["2"]}, ["2"]),
])
def test_version_policy_decides_which_versions_serve(tmp_path, make_client, iris_classifier, named_labels_classifier,
                                                     weak_classifier, policy, served):
    estimators = [iris_classifier, named_labels_classifier, weak_classifier]
    versioned_store(tmp_path, estimators, {"version_policy": policy})
    client = make_client(tmp_path, poll_interval=0)
    status = strict_json(client.get("/models/m"))
    assert status["served_versions"] == served and status["latest_version"] == served[0]
    assert status["version_policy"] == (policy if not isinstance(policy, dict) or "latest" in policy
                                        else {"specific": [int(v) for v in policy["specific"]]})
    assert {v["version"]: v["served"] for v in status["versions"]} == {n: n in served for n in ("1", "2", "3")}
    for number, estimator in enumerate(estimators, start=1):
        url = f"/models/m/versions/{number}/predict"
        if str(number) in served:
            body = predict(client, url)
            assert body["version"] == str(number) and body["predictions"] == expected(estimator)
        else:
            error = assert_error(client.post_json(url, {"instances": ROWS}, expect_errors=True), 404,
                                 f"does not serve version {number}")
            assert error["served_versions"] == served
    assert predict(client, "/models/m/predict")["predictions"] == expected(estimators[int(served[0]) - 1])


def test_a_policy_serving_no_version_on_disk_answers_404(tmp_path, make_client, iris_classifier):
    versioned_store(tmp_path, [iris_classifier, iris_classifier], {"version_policy": {"specific": [7]}})
    client = make_client(tmp_path, poll_interval=0)
    error = assert_error(client.post_json("/models/m/predict", {"instances": ROWS}, expect_errors=True), 404,
                         "model 'm' serves no version")
    assert error["served_versions"] == []
    assert strict_json(client.get("/models/m"))["served_versions"] == []


# -- 1. settings: labels ------------------------------------------------------------------------------------

def test_label_routes_serve_the_labelled_version(tmp_path, make_client, iris_classifier, named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier],
                    {"version_policy": "all", "labels": {"stable": 1, "canary": "2"}})
    client = make_client(tmp_path, poll_interval=0)
    assert strict_json(client.get("/models/m/labels/stable")) == {"name": "m", "label": "stable", "version": "1"}
    assert strict_json(client.get("/models/m/labels/canary")) == {"name": "m", "label": "canary", "version": "2"}
    body = predict(client, "/models/m/labels/stable/predict")
    assert body["version"] == "1" and body["predictions"] == expected(iris_classifier)
    body = predict(client, "/models/m/labels/canary/predict?method=predict_proba")
    assert body["version"] == "2" and body["predictions"] == expected(named_labels_classifier, method="predict_proba")
    body = strict_json(client.get("/models/m/labels/canary/predict", {"instances": json.dumps(ROWS)}))
    assert body["version"] == "2" and body["predictions"] == expected(named_labels_classifier)
    body = strict_json(client.get("/models/m/labels/stable/predict", {"instances": json.dumps(ROWS)}))
    assert body["version"] == "1" and body["predictions"] == expected(iris_classifier)
    status = strict_json(client.get("/models/m"))
    assert status["labels"] == {"canary": "2", "stable": "1"}
    assert status["version_policy"] == "all" and status["settings_error"] is None
    assert {v["version"]: v["labels"] for v in status["versions"]} == {"2": ["canary"], "1": ["stable"]}


def test_several_labels_on_one_version_are_listed_on_it(tmp_path, make_client, iris_classifier):
    versioned_store(tmp_path, [iris_classifier, iris_classifier],
                    {"version_policy": "all", "labels": {"prod": 1, "b.2": 1, "Z_last-1": 2}})
    client = make_client(tmp_path, poll_interval=0)
    status = strict_json(client.get("/models/m"))
    assert {v["version"]: v["labels"] for v in status["versions"]} == {"2": ["Z_last-1"], "1": ["b.2", "prod"]}
    assert predict(client, "/models/m/labels/b.2/predict")["version"] == "1"
    assert predict(client, "/models/m/labels/Z_last-1/predict")["version"] == "2"


def test_unknown_label_and_label_of_a_version_not_in_the_store_answer_404(tmp_path, make_client, iris_classifier,
                                                                          named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier],
                    {"version_policy": {"specific": [2]}, "labels": {"old": 7, "canary": 2}})
    client = make_client(tmp_path, poll_interval=0)
    for url in ("/models/m/labels/nope", "/models/m/labels/nope/predict?instances=[[1,2,3,4]]"):
        error = assert_error(client.get(url, expect_errors=True), 404, "label 'nope' of model 'm' is not defined")
        assert error["labels"] == {"canary": "2"} and error["served_versions"] == ["2"]
    error = assert_error(client.post_json("/models/m/labels/nope/predict", {"instances": ROWS}, expect_errors=True),
                         404, "is not defined")
    for url in ("/models/m/labels/old", "/models/m/labels/old/predict?instances=[[1,2,3,4]]"):
        error = assert_error(client.get(url, expect_errors=True), 404,
                             "label 'old' of model 'm' names version 7, which is not in the store")
        assert error["served_versions"] == ["2"]
    error = assert_error(client.post_json("/models/m/labels/old/predict", {"instances": ROWS}, expect_errors=True),
                         404, "which is not in the store")
    assert predict(client, "/models/m/labels/canary/predict")["predictions"] == expected(named_labels_classifier)


def test_moving_an_unused_label_switches_it_at_the_next_rescan(tmp_path, clocked_client, iris_classifier,
                                                               named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier],
                    {"version_policy": "all", "labels": {"stable": 1}})
    client, registry = clocked_client(tmp_path)
    assert strict_json(client.get("/models/m/labels/stable"))["version"] == "1"
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 2}})
    assert strict_json(client.get("/models/m/labels/stable"))["version"] == "1", "no rescan before poll_interval"
    registry.clock_.now += 1.0
    assert strict_json(client.get("/models/m/labels/stable"))["version"] == "2"
    body = predict(client, "/models/m/labels/stable/predict")
    assert body["version"] == "2" and body["predictions"] == expected(named_labels_classifier)
    status = strict_json(client.get("/models/m"))
    assert status["labels"] == {"stable": "2"}
    assert {v["version"]: v["labels"] for v in status["versions"]} == {"2": ["stable"], "1": []}


def test_moving_a_label_in_use_switches_it_once_the_new_target_has_loaded(tmp_path, clocked_client, iris_classifier,
                                                                          named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier],
                    {"version_policy": "all", "labels": {"stable": 1}})
    client, registry = clocked_client(tmp_path)
    assert predict(client, "/models/m/labels/stable/predict")["version"] == "1"
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 2}})
    registry.clock_.now += 1.0
    client.get("/models/m")                          # this request's refresh rescans
    wait_until(lambda: strict_json(client.get("/models/m/labels/stable"))["version"] == "2")
    body = predict(client, "/models/m/labels/stable/predict")
    assert body["version"] == "2" and body["predictions"] == expected(named_labels_classifier)
    assert version_status(client, "m", 1)["state"] == "AVAILABLE", "version 1 is still served (policy all)"


def test_while_a_moved_label_loads_its_new_target_the_old_target_keeps_answering(tmp_path, iris_classifier,
                                                                                 named_labels_classifier):
    write_artifact(tmp_path / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "m" / "2" / "model.pkl", SlowToLoad(named_labels_classifier, 1.0), "pickle")
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 1}})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    held = registry.acquire("m", label="stable")
    assert held.version == 1 and held.predict("predict", np.array(ROWS)).tolist() == expected(iris_classifier)
    registry.release(held)

    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 2}})
    new_target = registry.slot("m", 2)
    for _ in range(2):
        registry.poll()
        assert registry.slot("m", label="stable").ref.version == 1
    wait_until(lambda: new_target.state == "LOADING")
    assert_answers(registry, 1, iris_classifier, label="stable")      # at once, from version 1
    assert new_target.state == "LOADING"
    wait_until(lambda: registry.slot("m", label="stable") is new_target)
    assert_answers(registry, 2, named_labels_classifier, label="stable")
    assert new_target.loads == 1 and new_target.state == "AVAILABLE"
    assert registry.slot("m", 1).state == "AVAILABLE", "still served under policy 'all'"


def test_a_label_in_use_moved_to_a_broken_version_keeps_answering_with_the_old_one(tmp_path, iris_classifier):
    write_artifact(tmp_path / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    os.makedirs(tmp_path / "m" / "2")
    (tmp_path / "m" / "2" / "model.joblib").write_bytes(b"not a joblib file")
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 1}})
    registry = clocked_registry(tmp_path, load_retry_seconds=60)
    registry.refresh()
    registry.release(registry.acquire("m", label="stable"))
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 2}})
    registry.poll()
    broken = registry.slot("m", 2)
    wait_until(lambda: broken.state == "FAILED")
    for _ in range(3):
        registry.poll()
        assert_answers(registry, 1, iris_classifier, label="stable")
    assert broken.loads == 1, "not retried before load_retry_seconds"
    assert broken.error.startswith("cannot load m/2/model.joblib as joblib")


# -- 1. settings: invalid files -----------------------------------------------------------------------------

INVALID_SETTINGS = [
    ('{"version_policy": "newest"}', '"version_policy" must be'),
    ('{"version_policy": {"latest": 0}}', '"version_policy" must be'),
    ('{"version_policy": {"latest": true}}', '"version_policy" must be'),
    ('{"version_policy": {"specific": []}}', '"version_policy" must be'),
    ('{"version_policy": {"specific": [0, 1]}}', "specific: 0 is not a version"),
    ('{"version_policy": {"specific": [1, -3]}}', "specific: -3 is not a version"),
    ('{"version_policy": {"latest": 1, "specific": [1]}}', '"version_policy" must be'),
    ('{"version_policy": null}', '"version_policy" must be'),
    ('{"labels": {"1stable": 1}}', "invalid label '1stable'"),
    ('{"labels": {"can ary": 1}}', "invalid label 'can ary'"),
    ('{"labels": {"%s": 1}}' % ("a" * 65), "invalid label 'aaaa"),
    ('{"labels": {"stable": 0}}', "label 'stable': 0 is not a version"),
    ('{"labels": {"stable": -2}}', "label 'stable': -2 is not a version"),
    ('{"labels": {"stable": "01"}}', "label 'stable': '01' is not a version"),
    ('{"labels": {"stable": 1.0}}', "is not a version"),
    ('{"labels": [1]}', '"labels" must map label names to versions'),
    ('{"policy": "all"}', "unknown key(s) 'policy'"),
    ('{"version_policy": "all", "lables": {}}', "unknown key(s) 'lables'"),
    ('[{"version_policy": "all"}]', "it must hold a JSON object"),
    ('{"version_policy": "all",', "not valid JSON"),
]


@pytest.mark.parametrize("document, fragment", INVALID_SETTINGS)
def test_never_valid_settings_list_the_model_but_predictions_answer_503(tmp_path, make_client, iris_classifier,
                                                                        document, fragment):
    versioned_store(tmp_path, [iris_classifier, iris_classifier], document)
    client = make_client(tmp_path, poll_interval=0)
    assert [m["name"] for m in strict_json(client.get("/models"))["models"]] == ["m"]
    for response in (client.post_json("/models/m/predict", {"instances": ROWS}, expect_errors=True),
                     client.post_json("/models/m/versions/1/predict", {"instances": ROWS}, expect_errors=True),
                     client.get("/models/m/labels/stable/predict?instances=[[1,2,3,4]]", expect_errors=True)):
        error = assert_error(response, 503, "model 'm' is not served: m/model-settings.json: ", fragment)
        assert error["code"] == "model_unavailable"
    status = strict_json(client.get("/models/m"))
    assert fragment in status["settings_error"] and status["settings_error"].startswith("m/model-settings.json: ")
    assert status["served_versions"] == [] and status["version_policy"] is None
    assert [v["served"] for v in status["versions"]] == [False, False]


def test_an_invalid_settings_file_keeps_the_previous_settings_until_fixed(tmp_path, clocked_client, iris_classifier,
                                                                          named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier],
                    {"version_policy": "all", "labels": {"stable": 1}})
    client, registry = clocked_client(tmp_path)
    assert predict(client, "/models/m/versions/1/predict")["predictions"] == expected(iris_classifier)

    write_settings(tmp_path / "m", '{"version_policy": {"specific": [2]}, "labels": {"stable": 0}}')
    registry.clock_.now += 1.0
    status = strict_json(client.get("/models/m"))
    assert status["settings_error"] == "m/model-settings.json: label 'stable': 0 is not a version (a positive integer)"
    assert status["version_policy"] == "all" and status["served_versions"] == ["2", "1"]
    assert status["labels"] == {"stable": "1"}
    assert predict(client, "/models/m/versions/1/predict")["predictions"] == expected(iris_classifier)
    assert predict(client, "/models/m/labels/stable/predict")["version"] == "1"

    write_settings(tmp_path / "m", {"version_policy": {"specific": [2]}, "labels": {"canary": 2}})
    registry.clock_.now += 1.0
    status = strict_json(client.get("/models/m"))
    assert status["settings_error"] is None and status["version_policy"] == {"specific": [2]}
    assert status["served_versions"] == ["2"] and status["labels"] == {"canary": "2"}
    assert_error(client.post_json("/models/m/versions/1/predict", {"instances": ROWS}, expect_errors=True), 404,
                 "does not serve version 1")
    assert_error(client.get("/models/m/labels/stable", expect_errors=True), 404, "is not defined")
    assert predict(client, "/models/m/labels/canary/predict")["predictions"] == expected(named_labels_classifier)
    wait_until(lambda: version_status(client, "m", 1)["state"] == "UNLOADED")


def test_fixing_a_never_valid_settings_file_serves_the_model_at_the_next_rescan(tmp_path, clocked_client,
                                                                                iris_classifier,
                                                                                named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier], '{"version_policy": "everything"}')
    client, registry = clocked_client(tmp_path)
    assert_error(client.post_json("/models/m/predict", {"instances": ROWS}, expect_errors=True), 503,
                 "is not served", '"version_policy" must be')
    write_settings(tmp_path / "m", {"version_policy": {"latest": 2}})
    # no rescan before poll_interval: still not served
    assert_error(client.post_json("/models/m/predict", {"instances": ROWS}, expect_errors=True), 503,
                 "is not served")
    registry.clock_.now += 1.0
    body = predict(client, "/models/m/versions/1/predict")
    assert body["predictions"] == expected(iris_classifier)
    status = strict_json(client.get("/models/m"))
    assert status["settings_error"] is None and status["version_policy"] == {"latest": 2}


def test_removing_the_settings_file_restores_the_default_policy(tmp_path, clocked_client, iris_classifier,
                                                                named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier], {"version_policy": "all"})
    client, registry = clocked_client(tmp_path)
    assert predict(client, "/models/m/versions/1/predict")["version"] == "1"
    os.remove(tmp_path / "m" / service.SETTINGS_FILE)
    registry.clock_.now += 1.0
    assert_error(client.post_json("/models/m/versions/1/predict", {"instances": ROWS}, expect_errors=True), 404,
                 "does not serve version 1")
    assert strict_json(client.get("/models/m"))["version_policy"] == "latest"


# -- 2. status ------------------------------------------------------------------------------------------------

def test_version_status_before_during_and_after_use(tmp_path, clocked_client, iris_classifier):
    path = write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client, registry = clocked_client(tmp_path, poll_interval=0)
    before = version_status(client, "iris", 1)
    assert before["state"] == "UNLOADED" and before["since"].endswith("Z")
    assert before["artifact"]["size"] == os.path.getsize(path) and before["artifact"]["sha256"] is None
    assert before["loaded_at"] is None and before["load_seconds"] is None and before["idle_seconds"] is None
    assert before["in_flight"] == 0 and before["loads"] == 0 and before["preloaded"] is False
    assert before["last_error"] is None and before["last_error_at"] is None

    held = registry.acquire("iris")
    during = version_status(client, "iris", 1)
    assert during["state"] == "AVAILABLE" and during["in_flight"] == 1 and during["loads"] == 1
    registry.release(held)
    registry.clock_.now += 12.5
    after = version_status(client, "iris", 1)
    with open(path, "rb") as handle:
        assert after["artifact"]["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert after["in_flight"] == 0 and after["idle_seconds"] == 12.5
    assert after["loaded_at"].endswith("Z") and after["load_seconds"] > 0 and after["since"].endswith("Z")
    predict(client, "/models/iris/predict")
    assert version_status(client, "iris", 1)["idle_seconds"] == 0.0, "a request makes it fresh"
    assert version_status(client, "iris", 1)["loads"] == 1


def test_a_failed_load_shows_state_error_and_time(tmp_path, make_client):
    (tmp_path / "bad.joblib").write_bytes(b"this is not a joblib file")
    client = make_client(tmp_path, poll_interval=0)
    assert_error(client.post_json("/models/bad/predict", {"instances": ROWS}, expect_errors=True), 503,
                 "model 'bad' version 1 failed to load")
    status = version_status(client, "bad", 1)
    assert status["state"] == "FAILED" and status["loads"] == 1
    assert status["last_error"].startswith("cannot load bad.joblib as joblib")
    assert status["last_error_at"].endswith("Z") and status["artifact"]["sha256"] is None
    assert status["loaded_at"] is None and status["in_flight"] == 0


def test_a_version_removed_while_held_is_unloading_until_released(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier, iris_classifier], {"version_policy": "all"})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    slot = registry.slot("m", 1)
    held = registry.acquire("m", 1)
    os.remove(tmp_path / "m" / "1" / "model.joblib")
    os.rmdir(tmp_path / "m" / "1")
    registry.poll()
    assert [v["version"] for v in registry.describe("m")["versions"]] == ["2"]
    assert slot.state == "UNLOADING" and registry.loaded_count() == 1, "still in memory for its request"
    assert held.predict("predict", np.array(ROWS)).tolist() == expected(iris_classifier)
    registry.release(held)
    assert slot.state == "UNLOADED" and registry.loaded_count() == 0
    with pytest.raises(service.NotFound):
        registry.acquire("m", 1)


def test_a_version_leaving_the_policy_while_held_is_unloading_until_released(tmp_path, clocked_client, iris_classifier,
                                                                             named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier], {"version_policy": "all"})
    client, registry = clocked_client(tmp_path)
    client.get("/models")                            # the first request scans
    held = registry.acquire("m", 1)
    write_settings(tmp_path / "m", {"version_policy": "latest"})
    registry.clock_.now += 1.0
    status = version_status(client, "m", 1)
    assert status["state"] == "UNLOADING" and status["served"] is False
    assert status["in_flight"] == 1, "the request that holds it is counted"
    assert registry.loaded_count() == 1
    registry.release(held)
    status = version_status(client, "m", 1)
    assert status["state"] == "UNLOADED" and registry.loaded_count() == 0


# -- 3. preload and readiness ----------------------------------------------------------------------------------

def test_preload_all_loads_in_the_background_and_readiness_waits_for_it(tmp_path, app_client, iris_classifier):
    write_artifact(tmp_path / "slow.pkl", SlowToLoad(iris_classifier, 0.5), "pickle")
    client = app_client(tmp_path, preload=service.ALL_MODELS, poll_interval=0)
    status, body = readiness(client)                   # the first request scans and starts the preload
    assert status == 503 and body["ready"] is False and body["code"] == "model_unavailable"
    assert body["error"] in ("not ready: model 'slow' version 1 is UNLOADED",
                             "not ready: model 'slow' version 1 is LOADING")
    wait_until(lambda: readiness(client) == (503, {"error": "not ready: model 'slow' version 1 is LOADING",
                                                   "code": "model_unavailable", "ready": False}))
    wait_until(lambda: readiness(client)[0] == 200)
    assert readiness(client) == (200, {"ready": True, "models": 1, "loaded": 1})
    version = version_status(client, "slow", 1)
    assert version["state"] == "AVAILABLE" and version["preloaded"] is True and version["loads"] == 1
    assert predict(client, "/models/slow/predict")["predictions"] == expected(iris_classifier)
    assert version_status(client, "slow", 1)["loads"] == 1


def test_preload_by_name_loads_only_those_models(tmp_path, app_client, iris_classifier, diabetes_regressor):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "diabetes.joblib", diabetes_regressor, "joblib")
    client = app_client(tmp_path, preload=("iris",), poll_interval=0)
    client.get("/healthz")
    wait_until(lambda: readiness(client)[0] == 200)
    assert readiness(client) == (200, {"ready": True, "models": 2, "loaded": 1})
    iris, diabetes = version_status(client, "iris", 1), version_status(client, "diabetes", 1)
    assert (iris["state"], iris["preloaded"]) == ("AVAILABLE", True)
    assert (diabetes["state"], diabetes["preloaded"], diabetes["loads"]) == ("UNLOADED", False, 0)
    body = predict(client, "/models/diabetes/predict", DIABETES_ROWS)
    assert body["predictions"] == expected(diabetes_regressor, DIABETES_ROWS)
    assert readiness(client) == (200, {"ready": True, "models": 2, "loaded": 2})


def test_a_preloaded_model_missing_from_the_store_keeps_readiness_503(tmp_path, app_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = app_client(tmp_path, preload=("ghost", "iris"), poll_interval=0, admin_token=TOKEN)
    wait_until(lambda: version_status(client, "iris", 1)["state"] == "AVAILABLE")
    for _ in range(3):
        assert readiness(client) == (503, {"error": "not ready: preloaded model 'ghost' is not in the store",
                                           "code": "model_unavailable", "ready": False})
    write_artifact(tmp_path / "ghost.joblib", iris_classifier, "joblib")
    assert strict_json(client.post("/admin/rescan", headers=ADMIN)) == {"models": ["ghost", "iris"]}
    wait_until(lambda: readiness(client)[0] == 200)
    assert readiness(client) == (200, {"ready": True, "models": 2, "loaded": 2})


def test_a_corrupt_preloaded_artifact_keeps_readiness_503_with_its_error(tmp_path, app_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    (tmp_path / "broken.joblib").write_bytes(b"garbage, not joblib")
    client = app_client(tmp_path, preload=service.ALL_MODELS, poll_interval=0)
    client.get("/healthz")
    wait_until(lambda: version_status(client, "iris", 1)["state"] == "AVAILABLE"
               and version_status(client, "broken", 1)["state"] == "FAILED")
    for _ in range(3):
        status, body = readiness(client)
        assert status == 503 and body["ready"] is False
        assert body["error"].startswith("not ready: model 'broken' version 1 is FAILED: "
                                        "cannot load broken.joblib as joblib")
        assert "iris" not in body["error"]
    assert predict(client, "/models/iris/predict")["predictions"] == expected(iris_classifier)


def test_a_preloaded_model_with_never_valid_settings_is_not_ready(tmp_path, app_client, iris_classifier):
    versioned_store(tmp_path, [iris_classifier], '{"version_policy": "newest"}')
    client = app_client(tmp_path, preload=service.ALL_MODELS, poll_interval=0)
    status, body = readiness(client)
    assert status == 503 and body["error"].startswith("not ready: model 'm': m/model-settings.json: ")
    assert '"version_policy" must be' in body["error"]


def test_preloaded_failed_load_is_retried_after_the_pause(tmp_path, iris_classifier):
    path = tmp_path / "iris.joblib"
    path.write_bytes(b"garbage")
    registry = clocked_registry(tmp_path, preload=service.ALL_MODELS, poll_interval=0, load_retry_seconds=5)
    registry.refresh()
    slot = registry.slot("iris")
    wait_until(lambda: slot.state == "FAILED")
    assert registry.not_ready_reason().startswith("model 'iris' version 1 is FAILED: cannot load iris.joblib")
    joblib.dump(iris_classifier, path)
    registry.clock_.now += 2
    registry.refresh()
    stays_true(lambda: slot.state == "FAILED" and slot.loads == 1, 0.2, "not retried before load_retry_seconds")
    registry.clock_.now += 4
    registry.refresh()
    wait_until(lambda: slot.state == "AVAILABLE")
    assert registry.ready and slot.loads == 2


# -- 3. warm start --------------------------------------------------------------------------------------------------

CALLS = []                                  # (method, rows) every RecordingClassifier call saw
GATED_ROW = [1.0, 2.0, 3.0, 4.0]
GATE, ENTERED = threading.Event(), threading.Event()


class RecordingClassifier(LogisticRegression):
    """A LogisticRegression that records the rows of each call (a subclass: scikit-learn answers, never native)."""

    def _record(self, method, X):
        CALLS.append((method, np.asarray(X).tolist()))
        if np.asarray(X).tolist() == [GATED_ROW]:       # held here until the test opens the gate
            ENTERED.set()
            GATE.wait(30)
        return getattr(super(), method)(X)

    def predict(self, X):
        return self._record("predict", X)

    def predict_proba(self, X):
        return self._record("predict_proba", X)


def test_warmup_rows_from_the_settings_run_every_method_once_before_the_version_serves(tmp_path, caplog, make_app):
    data = load_iris()
    versioned_store(tmp_path, [RecordingClassifier(max_iter=1000).fit(data.data, data.target)],
                    {"warmup": [[5.9, 3.0, 4.2, 1.5]]})
    registry = clocked_registry(tmp_path, poll_interval=0)
    registry.refresh()
    CALLS.clear()
    with caplog.at_level(logging.INFO, logger="service"):
        registry.get("m")
    assert ("predict", [[5.9, 3.0, 4.2, 1.5]]) in CALLS and ("predict_proba", [[5.9, 3.0, 4.2, 1.5]]) in CALLS
    assert any("loaded model 'm' version 1" in line and "warmed predict, predict_proba, predict_log_proba, "
               "decision_function on 1 row from its settings in " in line for line in caplog.messages)
    client = webtest.TestApp(make_app(config=registry.config, registry=registry))
    assert "model_service_predict_calls_total{" not in client.get("/metrics").text, "warm-up calls are no client's"
    predict(client, "/models/m/predict")
    assert metric_value(client.get("/metrics").text, "model_service_predict_calls_total", model="m", version="1",
                        method="predict", predictor="scikit-learn") == 1


def test_readiness_waits_for_the_warm_up(tmp_path, app_client):
    data = load_iris()
    versioned_store(tmp_path, [RecordingClassifier(max_iter=1000).fit(data.data, data.target)],
                    {"warmup": [GATED_ROW]})
    GATE.clear()
    ENTERED.clear()
    client = app_client(tmp_path, preload=service.ALL_MODELS, poll_interval=0)
    try:
        client.get("/healthz")                                    # scans, and starts the preload
        wait_until(ENTERED.is_set, what="the warm-up to call predict")
        assert readiness(client) == (503, {"error": "not ready: model 'm' version 1 is LOADING",
                                           "code": "model_unavailable", "ready": False})
    finally:
        GATE.set()
    wait_until(lambda: readiness(client)[0] == 200)
    assert version_status(client, "m", 1)["state"] == "AVAILABLE"


def test_without_warmup_rows_a_tabular_model_is_warmed_on_zeros_and_a_text_model_is_not(tmp_path, caplog,
                                                                                        iris_classifier):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer
    data = load_iris()
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "text.joblib", make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(
        ["good film", "bad film"] * 3, [1, 0] * 3), "joblib")
    logged = make_pipeline(FunctionTransformer(np.log), LogisticRegression(max_iter=1000)).fit(data.data, data.target)
    write_artifact(tmp_path / "logged.joblib", logged, "joblib")           # log(0): scikit-learn refuses -inf
    registry = clocked_registry(tmp_path, poll_interval=0)
    registry.refresh()
    with caplog.at_level(logging.INFO, logger="service"):
        for name in ("iris", "text", "logged"):
            registry.get(name)
    lines = "\n".join(caplog.messages)
    assert "loaded model 'iris' version 1 (joblib, " in lines and " on 1 row of zeros in " in lines
    assert ("loaded model 'text' version 1 (joblib, " in lines and
            'not warmed: no fixed-width rows to derive; give "warmup" rows in its model-settings.json' in lines)
    assert "model 'logged' version 1 not warmed: a row of zeros failed: " in lines
    assert registry.slot("logged").state == "AVAILABLE", "a derived row that fails only costs the warm-up"
    assert registry.get("logged").predict("predict", np.array(ROWS)).tolist() == logged.predict(ROWS).tolist()


def test_warmup_rows_the_model_refuses_fail_its_load(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier], {"warmup": [[5.1, 3.5, 1.4]]})
    registry = clocked_registry(tmp_path, poll_interval=0)
    registry.refresh()
    with pytest.raises(service.ModelUnavailable, match='the "warmup" rows of its model-settings.json failed: '
                                                       "expected 4 features, got 3"):
        registry.get("m")
    assert registry.slot("m").state == "FAILED"


def test_warmup_false_leaves_a_model_cold(tmp_path, caplog, iris_classifier):
    versioned_store(tmp_path, [iris_classifier], {"warmup": False})
    registry = clocked_registry(tmp_path, poll_interval=0)
    registry.refresh()
    with caplog.at_level(logging.INFO, logger="service"):
        registry.get("m")
    assert 'not warmed: its model-settings.json says "warmup": false' in "\n".join(caplog.messages)
    assert registry.slot("m").state == "AVAILABLE"


@pytest.mark.parametrize("warmup", ["5.1", [], [5.1], [[]], [None], [[1.0]] * 101, {"a": [1]}, True])
def test_bad_warmup_settings_are_refused(warmup):
    with pytest.raises(ValueError, match='"warmup" must list 1 to 100 rows'):
        service.ModelSettings.parse({"warmup": warmup})


# -- 4. max_loaded ----------------------------------------------------------------------------------------------

@pytest.fixture
def three_models(tmp_path, iris_classifier, diabetes_regressor, named_labels_classifier):
    write_artifact(tmp_path / "a.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "b.joblib", diabetes_regressor, "joblib")
    write_artifact(tmp_path / "c.pkl", named_labels_classifier, "pickle")
    return tmp_path


def test_max_loaded_evicts_the_least_recently_used_version(three_models, app_client, iris_classifier,
                                                          diabetes_regressor, named_labels_classifier):
    client = app_client(three_models, max_loaded=2, poll_interval=0)
    registry = registry_of(client)
    assert predict(client, "/models/a/predict")["predictions"] == expected(iris_classifier)
    assert predict(client, "/models/b/predict", DIABETES_ROWS)["predictions"] == \
        expected(diabetes_regressor, DIABETES_ROWS)
    predict(client, "/models/a/predict")                 # a is now more recent than b
    assert registry.loaded_count() == 2
    assert predict(client, "/models/c/predict")["predictions"] == expected(named_labels_classifier)
    assert registry.loaded_count() == 2
    states = {name: version_status(client, name, 1) for name in "abc"}
    assert {name: (s["state"], s["loads"]) for name, s in states.items()} == \
        {"a": ("AVAILABLE", 1), "b": ("UNLOADED", 1), "c": ("AVAILABLE", 1)}
    assert states["b"]["artifact"]["sha256"] is None and states["b"]["loaded_at"] is None
    # b loads again on demand, evicting the least recently used: a
    assert predict(client, "/models/b/predict", DIABETES_ROWS)["predictions"] == \
        expected(diabetes_regressor, DIABETES_ROWS)
    assert {name: (version_status(client, name, 1)["state"], version_status(client, name, 1)["loads"])
            for name in "abc"} == {"a": ("UNLOADED", 1), "b": ("AVAILABLE", 2), "c": ("AVAILABLE", 1)}
    assert registry.loaded_count() == 2
    assert strict_json(client.get("/readyz")) == {"ready": True, "models": 3, "loaded": 2}


def test_max_loaded_never_evicts_a_version_with_a_request_in_flight(three_models, app_client, iris_classifier,
                                                                   diabetes_regressor):
    client = app_client(three_models, max_loaded=1, poll_interval=0)
    client.get("/models")
    registry = registry_of(client)
    held = registry.acquire("a")
    try:
        response = client.post_json("/models/b/predict", {"instances": DIABETES_ROWS}, expect_errors=True)
        assert_error(response, 503, "memory bound reached: 1 model version(s) in memory (--max-loaded), "
                                    "all busy or preloaded")
        assert response.headers["Retry-After"] == "1"
        a, b = version_status(client, "a", 1), version_status(client, "b", 1)
        assert (a["state"], a["in_flight"]) == ("AVAILABLE", 1)
        assert (b["state"], b["loads"], b["last_error"]) == ("UNLOADED", 0, None)
        assert held.predict("predict", np.array(ROWS)).tolist() == expected(iris_classifier)
    finally:
        registry.release(held)
    assert predict(client, "/models/b/predict", DIABETES_ROWS)["predictions"] == \
        expected(diabetes_regressor, DIABETES_ROWS)
    assert version_status(client, "a", 1)["state"] == "UNLOADED" and registry.loaded_count() == 1


def test_max_loaded_never_evicts_a_preloaded_version(three_models, app_client, diabetes_regressor,
                                                    named_labels_classifier):
    client = app_client(three_models, max_loaded=2, preload=("a",), poll_interval=0)
    client.get("/healthz")
    wait_until(lambda: readiness(client)[0] == 200)
    predict(client, "/models/b/predict", DIABETES_ROWS)
    assert predict(client, "/models/c/predict")["predictions"] == expected(named_labels_classifier)
    # a is the least recently used (never asked for) but preloaded: b goes instead
    assert {name: version_status(client, name, 1)["state"] for name in "abc"} == \
        {"a": "AVAILABLE", "b": "UNLOADED", "c": "AVAILABLE"}
    assert version_status(client, "a", 1)["loads"] == 1 and registry_of(client).loaded_count() == 2

    only_preloaded = app_client(three_models, max_loaded=1, preload=("a",), poll_interval=0)
    only_preloaded.get("/healthz")
    wait_until(lambda: readiness(only_preloaded)[0] == 200)
    response = only_preloaded.post_json("/models/b/predict", {"instances": DIABETES_ROWS}, expect_errors=True)
    assert_error(response, 503, "memory bound reached", "all busy or preloaded")
    assert response.headers["Retry-After"] == "1"
    assert version_status(only_preloaded, "a", 1)["state"] == "AVAILABLE"


def test_reload_under_max_loaded_leaves_the_version_available(three_models, app_client, weak_classifier):
    client = app_client(three_models, max_loaded=1, poll_interval=0, admin_token=TOKEN)
    predict(client, "/models/a/predict")
    path, before = three_models / "a.joblib", os.stat(three_models / "a.joblib")
    joblib.dump(weak_classifier, path)                      # in place; same size, old mtime restored
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    body = strict_json(client.post("/models/a/reload", headers=ADMIN))
    assert body["reload"] == {"1": "RELOADED"} and body["versions"][0]["loads"] == 2
    assert predict(client, "/models/a/predict")["predictions"] == expected(weak_classifier)
    assert registry_of(client).loaded_count() == 1
    assert body["versions"][0]["state"] == "AVAILABLE"
    assert version_status(client, "a", 1)["state"] == "AVAILABLE"


# -- 5. idle_unload ----------------------------------------------------------------------------------------------

def test_idle_versions_are_unloaded_after_idle_unload_and_load_again_on_demand(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    registry = clocked_registry(tmp_path, poll_interval=0, idle_unload=30)
    registry.refresh()
    slot = registry.slot("iris")
    registry.release(registry.acquire("iris"))
    registry.clock_.now += 29.5
    registry.refresh()
    assert slot.state == "AVAILABLE" and registry.loaded_count() == 1, "not idle long enough yet"
    registry.clock_.now += 1.0                 # 30.5 s idle, and past the next housekeeping tick
    registry.refresh()
    assert slot.state == "UNLOADED" and slot.model is None and registry.loaded_count() == 0
    model = registry.acquire("iris")
    try:
        assert model.predict("predict", np.array(ROWS)).tolist() == expected(iris_classifier)
    finally:
        registry.release(model)
    assert slot.state == "AVAILABLE" and slot.loads == 2


def test_a_version_in_use_is_not_unloaded_for_idleness(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    registry = clocked_registry(tmp_path, poll_interval=0, idle_unload=30)
    registry.refresh()
    held = registry.acquire("iris")
    registry.clock_.now += 100
    registry.refresh()
    assert registry.slot("iris").state == "AVAILABLE"
    registry.release(held)
    registry.clock_.now += 1                   # released, but last used 101 s ago
    registry.refresh()
    assert registry.slot("iris").state == "UNLOADED"


def test_idle_unload_spares_preloaded_versions(tmp_path, iris_classifier, diabetes_regressor):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "diabetes.joblib", diabetes_regressor, "joblib")
    registry = clocked_registry(tmp_path, poll_interval=0, idle_unload=30, preload=("iris",))
    registry.refresh()
    wait_until(lambda: registry.ready)
    registry.release(registry.acquire("diabetes"))
    registry.clock_.now += 100
    registry.refresh()
    assert registry.slot("iris").state == "AVAILABLE" and registry.slot("iris").loads == 1
    assert registry.slot("diabetes").state == "UNLOADED"
    assert registry.describe("iris")["versions"][0]["idle_seconds"] == 100.0


# -- 6. admin routes ------------------------------------------------------------------------------------------

ADMIN_ROUTES = ["/admin/rescan", "/models/iris/reload"]


@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_are_forbidden_without_a_configured_token(tmp_path, make_client, iris_classifier, route):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    for client in (make_client(tmp_path, poll_interval=0), make_client(tmp_path, poll_interval=0, admin_token="")):
        for headers in ({}, ADMIN):
            response = client.post(route, headers=headers, expect_errors=True)
            body = assert_error(response, 403, "administration is off", "MODEL_SERVICE_ADMIN_TOKEN")
            assert body["code"] == "forbidden"


@pytest.mark.parametrize("authorization", [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong-token",
    f"Bearer {TOKEN[:-1]}X",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}x",
    f"Basic {base64.b64encode(f'admin:{TOKEN}'.encode()).decode()}",
    f"Basic {TOKEN}",
    TOKEN,
    f"Token {TOKEN}",
])
@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_need_the_exact_bearer_token(tmp_path, make_client, iris_classifier, route, authorization):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    assert strict_json(client.get("/"))["models"] == ["iris"]
    write_artifact(tmp_path / "late.joblib", iris_classifier, "joblib")
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post(route, headers=headers, expect_errors=True)
    body = assert_error(response, 401, "this route needs the admin token: Authorization: Bearer <token>")
    assert body["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert TOKEN not in response.text
    assert strict_json(client.get("/"))["models"] == ["iris"], "nothing was done"


def test_rescan_with_the_token_picks_up_a_new_model_at_once(tmp_path, make_client, iris_classifier,
                                                           diabetes_regressor):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    assert strict_json(client.get("/"))["models"] == ["iris"]
    publish(tmp_path / "diabetes" / "1" / "model.joblib", diabetes_regressor)
    assert strict_json(client.get("/"))["models"] == ["iris"], "no automatic rescan with poll_interval=0"
    assert strict_json(client.post("/admin/rescan", headers=ADMIN)) == {"models": ["diabetes", "iris"]}
    body = predict(client, "/models/diabetes/predict", DIABETES_ROWS)
    assert body["version"] == "1" and body["predictions"] == expected(diabetes_regressor, DIABETES_ROWS)
    os.remove(tmp_path / "iris.joblib")
    assert strict_json(client.post("/admin/rescan", headers=ADMIN)) == {"models": ["diabetes"]}
    assert_error(client.post_json("/models/iris/predict", {"instances": ROWS}, expect_errors=True), 404,
                 "model 'iris' not found")


def test_rescan_with_the_token_uses_a_new_version_without_waiting_for_it_to_settle(tmp_path, clocked_client,
                                                                                   iris_classifier,
                                                                                   named_labels_classifier):
    write_artifact(tmp_path / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    client, registry = clocked_client(tmp_path, admin_token=TOKEN)
    assert predict(client, "/models/m/predict")["version"] == "1"
    publish(tmp_path / "m" / "2" / "model.joblib", named_labels_classifier)
    registry.clock_.now += 1.0
    assert strict_json(client.get("/models/m"))["served_versions"] == ["1"], "a poll waits for it to settle"
    client.post("/admin/rescan", headers=ADMIN)
    wait_until(lambda: predict(client, "/models/m/predict")["version"] == "2")
    assert predict(client, "/models/m/predict")["predictions"] == expected(named_labels_classifier)


def test_a_retired_version_is_not_kept_in_memory_by_the_last_request_it_answered(tmp_path, clocked_client,
                                                                                 iris_classifier, weak_classifier):
    """A request's environ outlives it (Bottle's request of the thread holds it until the thread's next one): it
    must not keep the model that answered it, nor its rows, once the request is over."""
    write_artifact(tmp_path / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    client, registry = clocked_client(tmp_path, admin_token=TOKEN)
    with concurrent.futures.ThreadPoolExecutor(1) as server_thread:      # answers once, then idles, as a server's
        answer = server_thread.submit(predict, client, "/models/m/predict").result()
        assert answer["version"] == "1"
        retired = weakref.ref(registry.slot("m", 1).model)
        publish(tmp_path / "m" / "2" / "model.joblib", weak_classifier)
        client.post("/admin/rescan", headers=ADMIN)
        wait_until(lambda: strict_json(client.get("/models/m"))["served_versions"] == ["2"])
        wait_until(lambda: gc.collect() is not None and retired() is None, what="version 1 freed")


def test_a_request_that_looked_up_a_version_before_a_swap_does_not_load_it_back(tmp_path, clocked_client,
                                                                               iris_classifier, weak_classifier):
    """A request looks its version up, then a swap takes that version out of service before the request uses it (a
    pause anywhere widens the window: a live server's CI run met it): the request looks again and gets the new
    version, and the old one is not loaded back, where it would stay in memory, unserved, with no request to
    unload it."""
    write_artifact(tmp_path / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    client, registry = clocked_client(tmp_path, admin_token=TOKEN)
    assert predict(client, "/models/m/predict")["version"] == "1"
    looked_up = registry.slot("m")
    publish(tmp_path / "m" / "2" / "model.joblib", weak_classifier)
    client.post("/admin/rescan", headers=ADMIN)
    wait_until(lambda: strict_json(client.get("/models/m"))["latest_version"] == "2")
    model = registry.acquire("m", slot=looked_up)
    try:
        assert model.version == 2
    finally:
        registry.release(model)
    states = {v["version"]: v["state"] for v in strict_json(client.get("/models/m"))["versions"]}
    assert states == {"2": "AVAILABLE", "1": "UNLOADED"}


def test_reload_rereads_an_artifact_replaced_in_place_with_the_same_size_and_mtime(
        tmp_path, make_client, iris_classifier, weak_classifier):
    path = write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    assert predict(client, "/models/iris/predict?method=predict_proba")["predictions"] == \
        expected(iris_classifier, method="predict_proba")
    before = os.stat(path)
    joblib.dump(weak_classifier, path)                       # in place, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns), "precondition"
    with open(path, "rb") as handle:
        new_sha256 = hashlib.sha256(handle.read()).hexdigest()

    client.post("/admin/rescan", headers=ADMIN)              # same fingerprint: a rescan sees no change
    assert predict(client, "/models/iris/predict?method=predict_proba")["predictions"] == \
        expected(iris_classifier, method="predict_proba")

    response = client.post("/models/iris/reload", headers=ADMIN)
    body = strict_json(response)
    assert body["name"] == "iris" and body["reload"] == {"1": "RELOADED"}
    version = body["versions"][0]
    assert version["state"] == "AVAILABLE" and version["loads"] == 2 and version["last_error"] is None
    assert version["artifact"]["sha256"] == new_sha256
    assert predict(client, "/models/iris/predict?method=predict_proba")["predictions"] == \
        expected(weak_classifier, method="predict_proba")


def test_reload_of_a_version_not_in_memory_reports_its_state(tmp_path, make_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    body = strict_json(client.post("/models/iris/reload", headers=ADMIN))
    assert body["reload"] == {"1": "UNLOADED"} and body["versions"][0]["loads"] == 0
    assert predict(client, "/models/iris/predict")["predictions"] == expected(iris_classifier)


def test_reload_of_a_broken_replacement_fails_and_the_old_model_keeps_serving(tmp_path, make_client,
                                                                             iris_classifier):
    path = write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    predict(client, "/models/iris/predict")
    with open(path, "wb") as handle:
        handle.write(b"truncated")
    body = strict_json(client.post("/models/iris/reload", headers=ADMIN))
    assert body["reload"] == {"1": "FAILED"}
    version = body["versions"][0]
    assert version["state"] == "AVAILABLE"
    assert version["last_error"].startswith("changed artifact not loaded, the previous one still serves: "
                                            "cannot load iris.joblib as joblib")
    assert predict(client, "/models/iris/predict")["predictions"] == expected(iris_classifier)


def test_reload_of_a_failed_version_lets_the_next_request_retry_without_the_pause(tmp_path, make_client,
                                                                                 iris_classifier):
    path = write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    with open(path, "rb") as handle:
        good = handle.read()
    stat = os.stat(path)
    with open(path, "wb") as handle:                          # same size and mtime as the good artifact
        handle.write(b"x" * len(good))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN, load_retry_seconds=3600)
    response = client.post_json("/models/iris/predict", {"instances": ROWS}, expect_errors=True)
    assert_error(response, 503, "failed to load")
    assert response.headers["Retry-After"] == "3600"
    with open(path, "wb") as handle:                          # fixed in place, fingerprint unchanged
        handle.write(good)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # the pause still holds: no retry yet
    assert_error(client.post_json("/models/iris/predict", {"instances": ROWS}, expect_errors=True), 503,
                 "failed to load")
    body = strict_json(client.post("/models/iris/reload", headers=ADMIN))
    assert body["reload"] == {"1": "FAILED"}
    assert predict(client, "/models/iris/predict")["predictions"] == expected(iris_classifier)
    status = version_status(client, "iris", 1)
    assert status["state"] == "AVAILABLE" and status["loads"] == 2 and status["last_error"] is None


def test_reload_of_every_served_version(tmp_path, make_client, iris_classifier, named_labels_classifier):
    versioned_store(tmp_path, [iris_classifier, named_labels_classifier, iris_classifier],
                    {"version_policy": {"specific": [1, 2]}})
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    predict(client, "/models/m/versions/2/predict")
    body = strict_json(client.post("/models/m/reload", headers=ADMIN))
    assert body["reload"] == {"2": "RELOADED", "1": "UNLOADED"}
    assert {v["version"]: v["loads"] for v in body["versions"]} == {"3": 0, "2": 2, "1": 0}


def test_reload_of_an_unknown_model_is_404(tmp_path, make_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=TOKEN)
    body = assert_error(client.post("/models/nosuch/reload", headers=ADMIN, expect_errors=True), 404,
                        "model 'nosuch' not found")
    assert body["code"] == "not_found" and body["models"] == ["iris"]


@pytest.mark.parametrize("route", ADMIN_ROUTES)
@pytest.mark.parametrize("token", [None, TOKEN])
def test_get_on_admin_routes_is_405_json(tmp_path, make_client, iris_classifier, route, token):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, admin_token=token)
    response = client.get(route, headers=ADMIN, expect_errors=True)
    body = assert_error(response, 405, "method GET is not allowed here", "POST")
    assert body["code"] == "method_not_allowed"
    assert [method.strip() for method in response.headers["Allow"].split(",")] == ["POST"]
