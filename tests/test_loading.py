"""Lazy, single-flight loading; failed loads answer 503, show in status and are retried after a pause."""

import concurrent.futures
import threading

import numpy as np
import pytest

import service
from support import EXTENSIONS, ROW, ManualClock, assert_error, strict_json, write_artifact


def make_registry(root, clock=None, **options):
    config = service.Config(store=str(root), **options)
    return service.ModelRegistry(config, clock=clock or ManualClock(), watch=False)


def test_creating_the_app_loads_and_scans_nothing(tmp_path, iris_classifier, make_app):
    import webtest
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    app = make_app(store=tmp_path)
    registry = app.registry
    assert registry.names() == [] and not registry.ready
    client = webtest.TestApp(app)
    assert strict_json(client.get("/models"))["models"][0]["versions"][0]["state"] == "UNLOADED"
    assert registry.slot("iris").model is None


def test_first_request_loads_and_later_requests_reuse(tmp_path, iris_classifier, artifact_format):
    write_artifact(tmp_path / f"iris{EXTENSIONS[artifact_format]}", iris_classifier, artifact_format)
    registry = make_registry(tmp_path)
    registry.refresh()
    first = registry.get("iris")
    assert registry.get("iris") is first
    assert registry.slot("iris").loads == 1 and registry.slot("iris").state == "AVAILABLE"
    assert np.array_equal(first.predict("predict", np.array(ROW)), iris_classifier.predict(np.array(ROW)))


def test_concurrent_first_requests_cause_exactly_one_load(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.pkl", iris_classifier, "pickle")
    registry = make_registry(tmp_path)
    registry.refresh()
    barrier = threading.Barrier(16)

    def first_request(_):
        barrier.wait()
        return registry.get("iris")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        models = list(pool.map(first_request, range(16)))
    assert all(model is models[0] for model in models)
    assert registry.slot("iris").loads == 1


@pytest.mark.parametrize("content, fragment", [
    (b"not a pickle at all", "cannot load"),
    (b"", "cannot load"),
])
def test_corrupt_artifact_answers_503_and_shows_in_status(tmp_path, make_client, iris_classifier, content, fragment):
    write_artifact(tmp_path / "good.joblib", iris_classifier, "joblib")
    (tmp_path / "bad.joblib").write_bytes(content)
    client = make_client(tmp_path)
    response = client.post_json("/models/bad/predict", {"instances": ROW}, expect_errors=True)
    body = assert_error(response, 503, "failed to load", fragment)
    assert body["model"] == "bad" and int(response.headers["Retry-After"]) >= 1
    status = strict_json(client.get("/models/bad"))["versions"][0]
    assert status["state"] == "FAILED" and fragment in status["last_error"]
    assert str(tmp_path) not in response.text
    # the good model is unaffected
    assert strict_json(client.post_json("/models/good/predict", {"instances": ROW}))["predictions"]


def test_artifact_without_a_prediction_method_fails_to_load(tmp_path, make_client):
    import joblib
    joblib.dump({"weights": [1, 2, 3]}, tmp_path / "notamodel.joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/notamodel/predict", {"instances": ROW}, expect_errors=True),
                 503, "holds a dict")


def test_json_artifact_that_is_not_a_model_fails_to_load(tmp_path, make_client):
    (tmp_path / "other.json").write_text('{"hello": "world"}')
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/other/predict", {"instances": ROW}, expect_errors=True),
                 503, "not a JSON model document")


def test_pickle_that_exits_does_not_take_the_server_down(tmp_path, make_client, iris_classifier):
    import pickle

    class Exit:
        def __reduce__(self):
            return (SystemExit, (3,))
    (tmp_path / "exits.pkl").write_bytes(pickle.dumps(Exit()))
    write_artifact(tmp_path / "good.pkl", iris_classifier, "pickle")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/exits/predict", {"instances": ROW}, expect_errors=True),
                 503, "SystemExit")
    assert strict_json(client.post_json("/models/good/predict", {"instances": ROW}))["predictions"]


def test_missing_module_in_pickle_names_it(tmp_path, make_client):
    # a pickle referring to a module this environment lacks, as a model trained with an extra package would
    payload = b"cnosuch_package\nModel\n."      # protocol 0: GLOBAL nosuch_package.Model, STOP
    (tmp_path / "extra.pkl").write_bytes(payload)
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/extra/predict", {"instances": ROW}, expect_errors=True),
                 503, "No module named 'nosuch_package'")


def test_failed_load_is_retried_only_after_the_pause(tmp_path, iris_classifier):
    path = tmp_path / "iris.joblib"
    path.write_bytes(b"garbage")
    clock = ManualClock()
    registry = make_registry(tmp_path, clock=clock, load_retry_seconds=30)
    registry.refresh()
    for _ in range(50):
        with pytest.raises(service.ModelUnavailable) as caught:
            registry.get("iris")
    assert registry.slot("iris").loads == 1, "no tight retry loop"
    assert caught.value.retry_after == 30
    clock.now += 10
    with pytest.raises(service.ModelUnavailable) as caught:
        registry.get("iris")
    assert caught.value.retry_after == 20 and registry.slot("iris").loads == 1
    # the operator fixes the artifact in place; after the pause the next request loads it
    import joblib
    joblib.dump(iris_classifier, path)
    clock.now += 21
    model = registry.get("iris")
    slot = registry.slot("iris")
    assert slot.loads == 2 and slot.state == "AVAILABLE" and slot.error is None
    assert model.predict("predict", np.array(ROW)).tolist() == iris_classifier.predict(np.array(ROW)).tolist()


def test_a_failed_version_does_not_affect_other_versions(tmp_path, make_client, iris_classifier):
    write_artifact(tmp_path / "iris" / "1" / "model.joblib", iris_classifier, "joblib")
    (tmp_path / "iris" / "2").mkdir()
    (tmp_path / "iris" / "2" / "model.pkl").write_bytes(b"broken")
    (tmp_path / "iris" / "model-settings.json").write_text('{"version_policy": "all"}')
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/iris/predict", {"instances": ROW}, expect_errors=True), 503,
                 "version 2 failed to load")
    assert strict_json(client.post_json("/models/iris/versions/1/predict", {"instances": ROW}))["version"] == "1"
    states = {v["version"]: v["state"] for v in strict_json(client.get("/models/iris"))["versions"]}
    assert states == {"2": "FAILED", "1": "AVAILABLE"}


# -- faults of the artifact: found at load, or answered as the server's, never as the caller's -----------------

def skewed_classifier(fitted):
    """A version-skew-like artifact: a fitted model lacking an attribute its methods read, as a pickle from
    another scikit-learn lacks one the running version added (here `solver`, which predict reads)."""
    import copy
    skewed = copy.deepcopy(fitted)
    del skewed.solver
    return skewed


def test_an_unfitted_model_fails_at_load_with_scikit_learns_reason(tmp_path, make_client, iris):
    from sklearn.linear_model import LinearRegression
    write_artifact(tmp_path / "unfitted.joblib", LinearRegression(), "joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/unfitted/predict", {"instances": ROW}, expect_errors=True), 503,
                 "model 'unfitted' version 1 failed to load: unfitted.joblib holds a model that was never fitted: "
                 "This LinearRegression instance is not fitted yet")
    version = strict_json(client.get("/models/unfitted"))["versions"][0]
    assert version["state"] == "FAILED" and "never fitted" in version["last_error"]


def test_a_pipeline_with_a_step_never_fitted_fails_at_load(tmp_path, make_client, iris):
    """scikit-learn's own check of a pipeline looks at its last step only: every step is checked."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(*iris)
    pipeline.steps[0] = ("standardscaler", StandardScaler())
    write_artifact(tmp_path / "half.joblib", pipeline, "joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/half/predict", {"instances": ROW}, expect_errors=True), 503,
                 "never fitted: This StandardScaler instance is not fitted yet")


@pytest.mark.parametrize("settings", ['{"native": false}', '{}'])
def test_a_version_skew_artifact_fails_at_load_saying_which_method_and_why(tmp_path, make_client, iris_classifier,
                                                                          settings):
    """A tabular model is called once per method on a row of zeros at load: a fault of the artifact there (not
    of the input) fails the load, so no request is ever blamed for it."""
    write_artifact(tmp_path / "skewed" / "1" / "model.joblib", skewed_classifier(iris_classifier), "joblib")
    (tmp_path / "skewed" / "model-settings.json").write_text(settings)
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/skewed/predict", {"instances": ROW}, expect_errors=True), 503,
                 "model 'skewed' version 1 failed to load: skewed/1/model.joblib: its predict fails on a row of "
                 "zeros through a fault of the artifact, not of any input: AttributeError: 'LogisticRegression' "
                 "object has no attribute 'solver'")
    assert strict_json(client.get("/models/skewed"))["versions"][0]["state"] == "FAILED"


def skewed_text_model():
    """A text pipeline (no fixed width: the pickle's text is not probed at load) whose vectorizer lacks what
    transform reads."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    text = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["good film", "bad film"] * 3, [1, 0] * 3)
    del text[0]._tfidf
    return text


def test_a_part_that_the_whole_models_row_never_reaches_is_probed_on_its_own(tmp_path, make_client, iris):
    """A scaler missing its scale_ behind a column transformer whose other branch, an encoder, refuses the
    row of zeros first: each fitted part is called on zeros of its own width, so the load fails, not every
    request."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    X, y = iris
    X = np.column_stack([np.where(y == 0, 5.0, 7.0), X[:, 1:]])        # a category column without a 0
    columns = ColumnTransformer([("category", OneHotEncoder(), [0]),
                                 ("numbers", make_pipeline(StandardScaler()), [1, 2, 3])])
    model = make_pipeline(columns, LogisticRegression(max_iter=1000)).fit(X, y)
    del model[0].named_transformers_["numbers"][0].scale_
    write_artifact(tmp_path / "hidden.joblib", model, "joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/hidden/predict", {"instances": [[5.0, 3.5, 1.4, 0.2]]},
                                  expect_errors=True), 503,
                 "model 'hidden' version 1 failed to load: hidden.joblib: its StandardScaler's transform fails on a "
                 "row of zeros through a fault of the artifact, not of any input: AttributeError: "
                 "'StandardScaler' object has no attribute 'scale_'")


def test_an_encoder_is_probed_on_categories_it_knows(tmp_path, make_client):
    """An ordinal encoder told it maps infrequent categories, without the mapping: zeros are an unknown
    category (refused before that state is read), its first categories reach it, so the load fails."""
    import numpy as np
    from sklearn.preprocessing import OrdinalEncoder
    encoder = OrdinalEncoder().fit(np.array([["red"], ["blue"]], dtype=object))
    encoder._infrequent_enabled = True
    write_artifact(tmp_path / "colours.joblib", encoder, "joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/colours/predict", {"instances": [["red"]], "method": "transform"},
                                  expect_errors=True), 503,
                 "model 'colours' version 1 failed to load: colours.joblib: its OrdinalEncoder's transform fails on "
                 "its first categories through a fault of the artifact, not of any input: AttributeError: "
                 "'OrdinalEncoder' object has no attribute '_infrequent_indices'")


def test_a_model_faulting_at_predict_time_is_the_servers_500_with_an_error_id(tmp_path, make_client, caplog):
    write_artifact(tmp_path / "skewed.joblib", skewed_text_model(), "joblib")
    client = make_client(tmp_path)
    with caplog.at_level("ERROR", logger="service"):
        error = assert_error(client.post_json("/models/skewed/predict", {"instances": ["a good film"]},
                                              expect_errors=True), 500,
                             "model 'skewed' version 1 cannot answer predict: its artifact is at fault, not the "
                             "request: AttributeError: 'TfidfVectorizer' object has no attribute '_tfidf'",
                             code="model_fault")
    logged = [record for record in caplog.records if error["error_id"] in record.getMessage()]
    assert logged and logged[0].exc_info is not None, "logged with its traceback, under the answer's error_id"


def test_the_inputs_faults_stay_the_callers_400(tmp_path, make_client):
    """An AttributeError raised on the caller's data (numbers sent to a text model) is a 400, as before."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    text = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["good film", "bad film"] * 3, [1, 0] * 3)
    write_artifact(tmp_path / "text.joblib", text, "joblib")
    client = make_client(tmp_path)
    assert_error(client.post_json("/models/text/predict", {"instances": [5]}, expect_errors=True), 400,
                 "'int' object has no attribute 'lower'")


def test_a_model_faulting_on_its_warm_up_fails_its_load(tmp_path):
    """Loaded ahead of its requests (preloaded), a model that faults on its "warmup" rows never serves."""
    from support import wait_until
    write_artifact(tmp_path / "skewed" / "1" / "model.joblib", skewed_text_model(), "joblib")
    (tmp_path / "skewed" / "model-settings.json").write_text('{"warmup": ["a good film"]}')
    registry = make_registry(tmp_path, preload=("skewed",))
    registry.refresh()
    slot = registry.slot("skewed")
    wait_until(lambda: slot.state == "FAILED", what="the preload to fail")
    assert slot.error.startswith("warming it up failed: model 'skewed' version 1 cannot answer predict: its artifact "
                                 "is at fault")
