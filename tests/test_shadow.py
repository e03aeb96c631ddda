"""The shadow version: each request also runs on the model's "shadow" version in the
background, and the agreement shows in the model's status and in /metrics, never in the client's answer.

Real models from scikit-learn's bundled data in tmp_path stores.
"""

import threading

import pytest
import webtest
from sklearn.linear_model import LogisticRegression

import service
from support import ROWS, assert_error, metric_value, strict_json, versioned_store, wait_until


def shadow_status(client):
    return strict_json(client.get("/models/m"))["shadow"]


@pytest.fixture(scope="module")
def weak_classifier(iris):
    features, target = iris
    return LogisticRegression(C=0.01, max_iter=1000).fit(features, target)     # disagrees on some flowers


def test_the_shadow_counts_agreement_and_never_changes_the_answer(tmp_path, iris, iris_classifier,
                                                                  weak_classifier, make_app):
    store = versioned_store(tmp_path / "store", [iris_classifier, weak_classifier],
                            {"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                             "traffic": {"stable": 1}, "shadow": "canary"})
    client = webtest.TestApp(make_app(store=store))
    features, _ = iris
    batches = [features[start:start + 15].tolist() for start in range(0, 150, 15)]
    for rows in batches:
        answer = client.post_json("/models/m/predict", {"instances": rows}, headers={"X-Request-ID": "fixed"})
        assert strict_json(answer) == {"model": "m", "version": "1", "method": "predict",
                                       "predictions": iris_classifier.predict(rows).tolist()}
        assert answer.headers["X-Request-ID"] == "fixed"
    probabilities = client.post_json("/models/m/predict", {"instances": ROWS, "method": "predict_proba"})
    assert strict_json(probabilities)["predictions"] == iris_classifier.predict_proba(ROWS).tolist()
    count = len(batches) + 1
    wait_until(lambda: shadow_status(client)["compared"] == count, what="every request compared")
    status = shadow_status(client)
    identical = sum(weak_classifier.predict(rows).tolist() == iris_classifier.predict(rows).tolist()
                    for rows in batches)
    assert identical < len(batches)
    gaps = abs(weak_classifier.predict_proba(ROWS) - iris_classifier.predict_proba(ROWS))
    assert status == {"target": "canary", "version": "2", "compared": count, "identical": identical,
                      "identical_share": round(identical / count, 6),
                      "mean_abs_diff": pytest.approx(gaps.mean()), "max_abs_diff": pytest.approx(gaps.max()),
                      "errors": 0, "dropped": 0}
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "model_service_shadow_compared_total", model="m", version="2") == count
    assert metric_value(metrics, "model_service_shadow_identical_total", model="m", version="2") == identical
    assert metric_value(metrics, "model_service_shadow_numeric_values_total", model="m", version="2") == 9
    pinned = client.post_json("/models/m/versions/2/predict", {"instances": ROWS})      # the shadow itself:
    assert strict_json(pinned)["version"] == "2"                                     # nothing to compare
    assert shadow_status(client)["compared"] == count


def test_a_failing_shadow_is_counted_and_the_client_never_sees_it(tmp_path, iris_classifier, diabetes_regressor,
                                                                  make_app, caplog):
    store = versioned_store(tmp_path / "store", [iris_classifier, diabetes_regressor],     # 10 features, not 4
                            {"version_policy": "all", "labels": {"stable": 1}, "traffic": {"stable": 1},
                             "shadow": "2"})
    client = webtest.TestApp(make_app(store=store))
    for _ in range(3):
        answer = client.post_json("/models/m/predict", {"instances": ROWS})
        assert answer.status_int == 200 and strict_json(answer)["predictions"] == iris_classifier.predict(ROWS).tolist()
    wait_until(lambda: shadow_status(client)["errors"] == 3, what="three shadow errors")
    assert shadow_status(client)["compared"] == 0
    assert metric_value(client.get("/metrics").text, "model_service_shadow_errors_total", model="m", version="2") == 3
    assert any("shadow version 2 of model 'm' failed" in record.getMessage() for record in caplog.records)


def test_a_full_shadow_queue_drops_and_counts(tmp_path, iris_classifier, weak_classifier, make_app, monkeypatch):
    monkeypatch.setattr(service.Backlog, "ITEMS", 1)
    comparing, release = [], threading.Event()
    original = service.Shadow._compare

    def slow_compare(shadow, *offer):          # the thread stalls on its first offer: the next one waits
        comparing.append(offer)
        release.wait(30)
        original(shadow, *offer)
    monkeypatch.setattr(service.Shadow, "_compare", slow_compare)
    store = versioned_store(tmp_path / "store", [iris_classifier, weak_classifier],
                            {"version_policy": "all", "labels": {"stable": 1}, "traffic": {"stable": 1},
                             "shadow": "2"})
    client = webtest.TestApp(make_app(store=store))
    client.post_json("/models/m/predict", {"instances": ROWS})
    wait_until(lambda: comparing, what="the first comparison")
    for _ in range(5):
        assert strict_json(client.post_json("/models/m/predict", {"instances": ROWS}))["version"] == "1"
    assert shadow_status(client)["dropped"] == 4
    release.set()
    wait_until(lambda: shadow_status(client)["compared"] == 2, what="the two accepted offers")
    assert metric_value(client.get("/metrics").text, "model_service_shadow_dropped_total", model="m",
                        version="2") == 4


def test_the_shadow_rests_while_predictions_are_answered_and_runs_freely_when_none_are(tmp_path, iris_classifier,
                                                                                      make_app):
    """Its share of the interpreter is bounded only when client requests need it."""
    store = versioned_store(tmp_path / "store", [iris_classifier] * 2, {"version_policy": "all", "shadow": "1"})
    app = make_app(store=store)
    holding, release = threading.Event(), threading.Event()
    original = service.LoadedModel.call

    def held_call(model, method, inputs):            # the client request stays in predict() until released
        holding.set()
        release.wait(30)
        return original(model, method, inputs)
    client = webtest.TestApp(app)
    client.post_json("/models/m/predict", {"instances": ROWS})          # loaded: warm-up calls are over
    assert app.shadow._rest(0.001) == 0.0, "nothing being answered: no rest"
    service.LoadedModel.call = held_call
    try:
        request = threading.Thread(target=client.post_json, args=("/models/m/predict", {"instances": ROWS}))
        request.start()
        assert holding.wait(30)
        assert app.shadow._rest(0.001) == pytest.approx(0.001 * (1 / app.shadow.SHARE - 1))
    finally:
        service.LoadedModel.call = original
        release.set()
        request.join(30)
    wait_until(lambda: app.predicting.count == 0, what="the request to end")
    assert app.shadow._rest(0.001) == 0.0


@pytest.mark.parametrize("shadow, fragment", [
    ("nope", '"shadow": \'nope\' is neither a version nor a defined label'),
    (2, '"shadow" must name a label or a version'),
    ("3", '"shadow": version 3, which is not served'),
])
def test_a_shadow_that_cannot_be_honoured_refuses_the_settings(tmp_path, iris_classifier, make_app, shadow,
                                                                fragment):
    store = versioned_store(tmp_path / "store", [iris_classifier] * 2, {"version_policy": "all", "shadow": shadow})
    client = webtest.TestApp(make_app(store=store))
    assert fragment in strict_json(client.get("/models/m"))["settings_error"]
    assert_error(client.post_json("/models/m/predict", {"instances": ROWS}, expect_errors=True), 503, "not served")
