"""The four wire dialects against one live server (real `python service.py` under waitress).

TensorFlow Serving REST, KServe V1, the Open Inference Protocol V2 (driven by the real
tritonclient.http client, plus raw requests for what a client never sends) and MLflow scoring,
as their specifications describe them.  Every prediction is compared with the
estimator's own output: floats exactly (JSON carries Python's repr), binary FP64 bit for bit.

One server serves the whole module (started once, module-scoped); a snapshot of the states
taken right after it starts, before any request loads a model, lets the "before load" checks
run in any order.
"""

import json
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import requests
import tritonclient.http as httpclient
from sklearn.datasets import load_diabetes, load_iris
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tritonclient.utils import InferenceServerException

from support import (IRIS_FEATURES, ROWS, LiveServer, assert_error, free_port, service_command, strict_json,
                     write_artifact)

TOKEN = "T0ken"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IRIS_METHODS = ["predict", "predict_proba", "predict_log_proba", "decision_function"]
REVIEWS = [
    ("a wonderful, moving film with brilliant acting", "positive"),
    ("I loved every minute, great story and great cast", "positive"),
    ("superb direction and a beautiful soundtrack", "positive"),
    ("funny, warm and clever: the best film this year", "positive"),
    ("a dull, boring film with terrible acting", "negative"),
    ("I hated it, the story made no sense at all", "negative"),
    ("awful direction and a painfully slow plot", "negative"),
    ("the worst film this year, a complete waste of time", "negative"),
]
TEXTS = ["a brilliant, moving film", "boring and awful"]


# -- models, store and server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """The estimators the store holds, kept in memory to compute the expected answers."""
    iris = load_iris(as_frame=True)
    frame = iris.data.set_axis(IRIS_FEATURES, axis=1)
    labels = iris.target_names[iris.target]
    diabetes = load_diabetes(as_frame=True)
    texts, sentiments = zip(*REVIEWS)
    return types.SimpleNamespace(
        iris_v1=LogisticRegression(max_iter=1000).fit(frame, labels),
        iris_v2=make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(frame, labels),
        plain=LogisticRegression(max_iter=1000).fit(iris.data.to_numpy(), iris.target.to_numpy()),
        diabetes=make_pipeline(StandardScaler(), Ridge(alpha=0.5)).fit(diabetes.data, diabetes.target),
        diabetes_features=list(diabetes.data.columns),
        diabetes_rows=diabetes.data.iloc[:3].to_numpy().tolist(),
        sentiment=make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0)).fit(list(texts),
                                                                                    list(sentiments)),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, models):
    """iris (folder layout, versions 1 and 2, all served, label stable -> 1), plain, diabetes, sentiment, broken."""
    root = tmp_path_factory.mktemp("protocols") / "store"
    write_artifact(root / "iris" / "1" / "model.joblib", models.iris_v1, "joblib")
    write_artifact(root / "iris" / "2" / "model.joblib", models.iris_v2, "joblib")
    (root / "iris" / "model-settings.json").write_text(
        json.dumps({"version_policy": "all", "labels": {"stable": 1}}))
    write_artifact(root / "plain.joblib", models.plain, "joblib")
    write_artifact(root / "diabetes.joblib", models.diabetes, "joblib")
    write_artifact(root / "sentiment.joblib", models.sentiment, "joblib")
    (root / "broken.joblib").write_bytes(b"these bytes are not a joblib file\n")
    return root


@pytest.fixture(scope="module")
def server(store):
    """One live server for the module, plus what it answered before anything was loaded."""
    port = free_port()
    with LiveServer(service_command(store, port, "--default-model", "iris", "--admin-token", TOKEN), port) as live:
        base = live.base
        before = {
            "iris": requests.get(base + "/v1/models/iris", timeout=10),
            "broken": requests.get(base + "/v1/models/broken", timeout=10),
            "index": requests.post(base + "/v2/repository/index", timeout=10),
        }
        yield types.SimpleNamespace(base=base, port=port, store=store, before=before)


@pytest.fixture(scope="module")
def triton(server):
    """The real tritonclient HTTP client, pointed at the live server."""
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def get(server, path, **options):
    return requests.get(server.base + path, timeout=30, **options)


def post(server, path, body=None, **options):
    if body is not None:
        options["json"] = body
    return requests.post(server.base + path, timeout=30, **options)


# -- helpers -------------------------------------------------------------------------------------------------

def frame(rows, columns=IRIS_FEATURES):
    return pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=columns)


def fail_broken_load(server):
    """Ask for the broken model: its load fails (503, with the reason, and Retry-After)."""
    response = post(server, "/v1/models/broken:predict", {"instances": [[1, 2, 3, 4]]})
    body = assert_error(response, 503, "broken", store=server.store)
    assert "failed to load" in body["error"] and response.headers.get("Retry-After")
    return body


# ===========================================================================================================
# 1. TensorFlow Serving REST
# ===========================================================================================================

def test_tf_model_list(server):
    """GET /v1/models lists every model on disk, the broken one included."""
    assert strict_json(get(server, "/v1/models")) == {"models": ["broken", "diabetes", "iris", "plain", "sentiment"]}


def test_tf_status_is_start_before_load_and_available_after(server):
    """GET /v1/models/iris is the merged TF + KServe object: START for both served versions before any load
    (the status request itself loads nothing), AVAILABLE once each has answered, error_code OK throughout."""
    before = server.before["iris"]
    assert before.status_code == 200
    body = strict_json(before)
    assert body["name"] == "iris" and body["ready"] is True
    assert body["model_version_status"] == [
        {"version": "2", "state": "START", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "START", "status": {"error_code": "OK", "error_message": ""}}]

    for path in ("/v1/models/iris:predict", "/v1/models/iris/versions/1:predict"):
        assert post(server, path, {"instances": ROWS[:1]}).status_code == 200
    body = strict_json(get(server, "/v1/models/iris"))
    assert body["name"] == "iris" and body["ready"] is True
    assert {s["version"]: s["state"] for s in body["model_version_status"]} == {"1": "AVAILABLE",
                                                                               "2": "AVAILABLE"}
    assert all(s["status"] == {"error_code": "OK", "error_message": ""} for s in body["model_version_status"])


def test_tf_status_of_a_failed_load_is_503_with_end(server):
    """A model whose artifact is not joblib: START and 200 (loadable on demand) before anyone asks for it;
    after the failed load GET /v1/models/broken is 503 with ready false, state END, a non-OK error_code and
    a sanitised error_message (the file's store-relative name, never an absolute path)."""
    before = server.before["broken"]
    assert before.status_code == 200
    assert strict_json(before)["model_version_status"][0]["state"] == "START"

    fail_broken_load(server)
    response = get(server, "/v1/models/broken")
    body = assert_error(response, 503, store=server.store)
    assert body["name"] == "broken" and body["ready"] is False
    (status,) = body["model_version_status"]
    assert status["version"] == "1" and status["state"] == "END"
    assert status["status"]["error_code"] not in ("OK", "", None)
    assert "broken.joblib" in status["status"]["error_message"]


def test_tf_status_of_one_version_and_of_a_label(server):
    """/versions/<v> and /labels/<l> give the status of that one version; unknown ones are 404 JSON."""
    for path, version in (("/v1/models/iris/versions/1", "1"), ("/v1/models/iris/versions/2", "2"),
                          ("/v1/models/iris/labels/stable", "1")):
        body = strict_json(get(server, path))
        assert body["name"] == "iris" and body["ready"] is True
        assert [s["version"] for s in body["model_version_status"]] == [version]
        assert body["model_version_status"][0]["status"]["error_code"] == "OK"
    assert_error(get(server, "/v1/models/iris/versions/9"), 404)
    assert_error(get(server, "/v1/models/iris/labels/canary"), 404)
    assert_error(get(server, "/v1/models/nosuch"), 404)


def test_tf_metadata_has_a_signature_per_method(server):
    """GET .../metadata: model_spec names the model and the version answering (latest, or the one a version
    or label names); signature_def holds serving_default (predict) and one signature per other method, each
    taking the feature names as inputs."""
    body = strict_json(get(server, "/v1/models/iris/metadata"))
    assert body["model_spec"]["name"] == "iris" and body["model_spec"]["version"] == "2"
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "predict_proba", "predict_log_proba", "decision_function"}
    for name, signature in signatures.items():
        assert list(signature["inputs"]) == IRIS_FEATURES, name
        assert all(tensor["dtype"] == "DT_DOUBLE" and tensor["name"] == feature
                   for feature, tensor in signature["inputs"].items())
    assert signatures["serving_default"]["outputs"]["predict"]["dtype"] == "DT_STRING"
    proba = signatures["predict_proba"]["outputs"]["predict_proba"]
    assert proba["dtype"] == "DT_DOUBLE"
    assert [d["size"] for d in proba["tensor_shape"]["dim"]] == ["-1", "3"]

    for path in ("/v1/models/iris/versions/1/metadata", "/v1/models/iris/labels/stable/metadata"):
        assert strict_json(get(server, path))["model_spec"]["version"] == "1"


def test_tf_predict_rows_as_lists_and_as_objects(server, models):
    """:predict with `instances` rows, as lists or as {feature: value} objects, answers `predictions` equal to
    the latest version's own predict."""
    expected = models.iris_v2.predict(frame(ROWS)).tolist()
    assert strict_json(post(server, "/v1/models/iris:predict", {"instances": ROWS})) == {"predictions": expected}
    objects = [dict(zip(IRIS_FEATURES, row)) for row in ROWS]
    assert strict_json(post(server, "/v1/models/iris:predict", {"instances": objects})) == {"predictions": expected}


def test_tf_predict_with_signature_predict_proba(server, models):
    """signature_name picks the method: predict_proba's floats come back exactly; serving_default is predict."""
    body = strict_json(post(server, "/v1/models/iris:predict", {"signature_name": "predict_proba", "instances": ROWS}))
    assert body == {"predictions": models.iris_v2.predict_proba(frame(ROWS)).tolist()}
    body = strict_json(post(server, "/v1/models/iris:predict",
                            {"signature_name": "serving_default", "instances": ROWS}))
    assert body == {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}


def test_tf_predict_columnar_inputs_answer_outputs(server, models):
    """Columnar `inputs`, as {feature: [values]} or as one tensor, answer under `outputs` (TF's rule)."""
    columns = {feature: [row[i] for row in ROWS] for i, feature in enumerate(IRIS_FEATURES)}
    expected = models.iris_v2.predict_proba(frame(ROWS)).tolist()
    body = strict_json(post(server, "/v1/models/iris:predict", {"signature_name": "predict_proba", "inputs": columns}))
    assert body == {"outputs": expected}
    assert strict_json(post(server, "/v1/models/iris:predict", {"inputs": ROWS})) == {
        "outputs": models.iris_v2.predict(frame(ROWS)).tolist()}


def test_tf_predict_by_version_and_by_label_answers_from_version_1(server, models):
    """/versions/1:predict and /labels/stable:predict answer from version 1, not the latest (their
    probabilities differ)."""
    expected = models.iris_v1.predict_proba(frame(ROWS)).tolist()
    assert expected != models.iris_v2.predict_proba(frame(ROWS)).tolist()
    for path in ("/v1/models/iris/versions/1:predict", "/v1/models/iris/labels/stable:predict"):
        body = strict_json(post(server, path, {"signature_name": "predict_proba", "instances": ROWS}))
        assert body == {"predictions": expected}, path


def test_tf_classify_gives_label_score_pairs(server, models):
    """:classify merges `context` into each example and answers `results`: per example, one [label, score]
    pair per class, the scores being predict_proba's exactly."""
    payload = {"context": {"sepal_length": 5.1},
               "examples": [{"sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
                            {"sepal_width": 2.5, "petal_length": 4.9, "petal_width": 1.9}]}
    rows = [[5.1, 3.5, 1.4, 0.2], [5.1, 2.5, 4.9, 1.9]]
    probabilities = models.iris_v2.predict_proba(frame(rows)).tolist()
    classes = models.iris_v2.classes_.tolist()
    body = strict_json(post(server, "/v1/models/iris:classify", payload))
    assert body == {"results": [[[label, score] for label, score in zip(classes, row)] for row in probabilities]}


def test_tf_regress_on_the_regressor(server, models):
    """:regress on diabetes (named features, context plus examples) answers `results` equal to predict."""
    features, rows = models.diabetes_features, models.diabetes_rows
    examples = [dict(zip(features[1:], row[1:])) for row in rows]
    rows = [[0.01] + row[1:] for row in rows]
    body = strict_json(post(server, "/v1/models/diabetes:regress",
                            {"context": {features[0]: 0.01}, "examples": examples}))
    assert body == {"results": models.diabetes.predict(frame(rows, features)).tolist()}


def test_kserve_v1_explain_adds_up_to_the_models_decision_function(server, models):
    """:explain (KServe V1) answers shap's layout: for a plain logistic regression, with no reference row, each
    contribution is coef * x and the expected value the intercept, bit for bit; a text model is a 501."""
    body = strict_json(post(server, "/v1/models/plain:explain", {"instances": ROWS}))
    explanations = body["explanations"]
    assert body["model"] == "plain" and explanations["method"] == "decision_function"
    assert explanations["expected_value"] == models.plain.intercept_.tolist()
    assert explanations["contributions"] == (np.array(ROWS)[:, :, None] * models.plain.coef_.T).tolist()
    assert_error(post(server, "/v1/models/sentiment:explain", {"instances": ["great"]}), 501,
                 "does not take tabular rows")


@pytest.mark.parametrize("payload, message", [
    ({"instances": ROWS, "inputs": ROWS}, "expecting only one of 'inputs' or 'instances' keys"),
    ({"signature_name": "serving_default"}, "Missing 'inputs' or 'instances' key"),
    ({"instances": []}, "No values in 'instances' array"),
], ids=["both-keys", "neither-key", "empty-instances"])
def test_tf_request_key_errors_use_tf_wording(server, payload, message):
    """Both keys, neither key, and an empty instances list are 400 with TF Serving's own messages."""
    assert_error(post(server, "/v1/models/iris:predict", payload), 400, message)


def test_tf_unknown_signature_is_400(server):
    """A signature_name that is no method of the model (or a method it lacks) is 400, not 404 or 500."""
    assert_error(post(server, "/v1/models/iris:predict", {"signature_name": "nosuch", "instances": ROWS}), 400,
                 "nosuch")
    assert_error(post(server, "/v1/models/diabetes:predict",
                      {"signature_name": "predict_proba", "instances": [[0.0] * 10]}), 400, "predict_proba")


def test_tf_context_feature_repeated_in_an_example_is_400(server):
    """A feature in both `context` and an example is ambiguous: 400."""
    payload = {"context": {"sepal_length": 5.1},
               "examples": [{"sepal_length": 5.0, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}
    assert_error(post(server, "/v1/models/iris:classify", payload), 400, "sepal_length")


def test_tf_garbage_verb_is_404_json(server):
    """A misspelt verb (`:predic`) is no route: 404 JSON, no prediction."""
    body = assert_error(post(server, "/v1/models/iris:predic", {"instances": ROWS}), 404)
    assert "predictions" not in body


@pytest.mark.parametrize("target", [
    "iris:predict:predict", "iris:classify:predict", "iris:predict/versions/1:predict",
    "iris/versions/1:predict:predict", "iris/labels/stable:predict:regress", "iris:predict/",
    "iris/versions/1/labels/stable:predict",
])
def test_tf_colon_tricks_are_never_read_as_a_prediction(server, target):
    """A target where the verb could be misparsed (extra colons, verbs inside the name) is 404 or 400,
    never a prediction."""
    response = post(server, "/v1/models/" + target, {"instances": ROWS})
    assert response.status_code in (400, 404), response.text
    body = assert_error(response, response.status_code)
    assert "predictions" not in body and "outputs" not in body and "results" not in body


def test_tf_verb_on_a_get_is_not_a_status(server):
    """GET /v1/models/iris:predict is not the status of `iris`: the colon never belongs to a name."""
    response = get(server, "/v1/models/iris:predict")
    body = assert_error(response, response.status_code)
    assert response.status_code in (400, 404, 405) and "model_version_status" not in body


# ===========================================================================================================
# 2. KServe V1
# ===========================================================================================================

def test_kserve_v1_liveness_on_root(server):
    """The KServe V1 client's liveness check reads GET / as {"status": "alive"}; other keys may ride along."""
    response = get(server, "/")
    assert response.status_code == 200 and strict_json(response)["status"] == "alive"


def test_kserve_v1_model_ready(server):
    """KServe's is_model_ready: GET /v1/models/<m> -> `name` and `ready` true; a model that failed to load is
    a 503 (which the client reads as not ready) with ready false."""
    body = strict_json(get(server, "/v1/models/iris"))
    assert body["name"] == "iris" and body["ready"] is True
    fail_broken_load(server)
    response = get(server, "/v1/models/broken")
    assert response.status_code == 503 and strict_json(response)["ready"] is False


def test_kserve_v1_predict_with_instances(server, models):
    """KServe V1 predict: {"instances": [...]} -> {"predictions": [...]}, the estimator's own answers."""
    response = post(server, "/v1/models/iris:predict", {"instances": ROWS})
    assert response.status_code == 200
    assert strict_json(response) == {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}
    body = strict_json(post(server, "/v1/models/sentiment:predict", {"instances": TEXTS}))
    assert body == {"predictions": models.sentiment.predict(TEXTS).tolist()}


# ===========================================================================================================
# 3. Open Inference Protocol V2, through the real tritonclient
# ===========================================================================================================

def _input(name, array, datatype, binary=True):
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_v2_explain_parameter_through_tritonclient(triton, models):
    """parameters={"explain": True} on tritonclient's infer: the predictions, and an "explain" output of one
    BYTES element holding the explanation's JSON (as MLServer's explainer runtime answers)."""
    rows = np.array(ROWS, dtype=np.float64)
    result = triton.infer("plain", [_input("input-0", rows, "FP64")], parameters={"explain": True})
    assert result.as_numpy("predict").tolist() == models.plain.predict(rows).tolist()
    explanations = json.loads(result.as_numpy("explain")[0])
    assert explanations["contributions"] == (rows[:, :, None] * models.plain.coef_.T).tolist()


def test_v2_server_liveness_readiness_and_metadata(triton):
    """is_server_live, is_server_ready, and the server metadata listing both extensions."""
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True
    metadata = triton.get_server_metadata()
    assert metadata["name"] and metadata["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


def test_v2_model_readiness(server, triton):
    """is_model_ready for a model and for a version; false for an unknown version or model and for a model
    whose load failed."""
    assert triton.is_model_ready("iris") is True
    assert triton.is_model_ready("iris", "1") is True
    assert triton.is_model_ready("iris", "9") is False
    assert triton.is_model_ready("nosuch") is False
    fail_broken_load(server)
    assert triton.is_model_ready("broken") is False


def test_v2_model_metadata(triton):
    """get_model_metadata: one FP64 input per feature for a named-feature model, one [-1, 4] input-0 for an
    unnamed one, a BYTES input for the text model; outputs are the methods with their datatypes."""
    iris = triton.get_model_metadata("iris")
    assert iris["name"] == "iris" and sorted(iris["versions"]) == ["1", "2"]
    assert iris["inputs"] == [{"name": f, "datatype": "FP64", "shape": [-1]} for f in IRIS_FEATURES]
    outputs = {o["name"]: o for o in iris["outputs"]}
    assert list(outputs) == IRIS_METHODS
    assert outputs["predict"]["datatype"] == "BYTES"
    assert outputs["predict_proba"] == {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]}

    plain = triton.get_model_metadata("plain", model_version="1")
    assert plain["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert {o["name"]: o["datatype"] for o in plain["outputs"]}["predict"] == "INT64"
    sentiment = triton.get_model_metadata("sentiment")
    assert sentiment["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]


def test_v2_repository_index_lists_every_served_version(server, triton):
    """The repository index (a POST, as tritonclient sends it) lists every served version of every model
    on disk: UNAVAILABLE before any load, READY once loaded; a failed load gives its reason."""
    before = server.before["index"]
    assert before.status_code == 200
    entries = strict_json(before)
    assert sorted((e["name"], e["version"]) for e in entries) == [
        ("broken", "1"), ("diabetes", "1"), ("iris", "1"), ("iris", "2"), ("plain", "1"), ("sentiment", "1")]
    assert {e["state"] for e in entries} == {"UNAVAILABLE"}

    for version in ("1", "2"):
        assert triton.is_model_ready("iris", version)
        triton.get_model_metadata("iris", model_version=version)        # loads that version
    fail_broken_load(server)
    index = {(e["name"], e["version"]): e for e in triton.get_model_repository_index()}
    assert index[("iris", "1")]["state"] == index[("iris", "2")]["state"] == "READY"
    assert index[("broken", "1")]["state"] == "UNAVAILABLE" and "broken.joblib" in index[("broken", "1")]["reason"]
    ready = {(e["name"], e["version"]) for e in strict_json(post(server, "/v2/repository/index", {"ready": True}))}
    assert {("iris", "1"), ("iris", "2")} <= ready and ("broken", "1") not in ready


def test_v2_infer_binary_fp64_input_by_default(triton, models):
    """set_data_from_numpy's default (binary tensor, no Content-Type) with FP64 [N, 4] named input-0, no
    outputs requested: the client asks for binary outputs and gets predict's BYTES labels."""
    x = np.array(ROWS)
    result = triton.infer("iris", [_input("input-0", x, "FP64")])
    response = result.get_response()
    assert response["model_name"] == "iris" and response["model_version"] == "2"
    assert [o["name"] for o in response["outputs"]] == ["predict"]
    assert response["outputs"][0]["datatype"] == "BYTES" and response["outputs"][0]["shape"] == [3]
    assert [b.decode() for b in result.as_numpy("predict").tolist()] == models.iris_v2.predict(frame(x)).tolist()


def test_v2_infer_binary_fp32_input(triton, models):
    """An FP32 binary tensor is read as float32 and widened: the answer equals the estimator's on the same
    float32 values."""
    x = np.array(ROWS, dtype=np.float32)
    result = triton.infer("iris", [_input("input-0", x, "FP32")],
                          outputs=[httpclient.InferRequestedOutput("predict_proba", binary_data=True)])
    expected = models.iris_v2.predict_proba(frame(x.astype(np.float64)))
    assert result.as_numpy("predict_proba").tobytes() == expected.astype("<f8").tobytes()


def test_v2_infer_json_input_and_json_outputs(triton, models):
    """binary_data=False sends the tensor as JSON `data`; JSON outputs carry the exact floats."""
    x = np.array(ROWS)
    result = triton.infer("iris", [_input("input-0", x, "FP64", binary=False)],
                          outputs=[httpclient.InferRequestedOutput("predict", binary_data=False),
                                   httpclient.InferRequestedOutput("predict_proba", binary_data=False)])
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert outputs["predict"]["data"] == models.iris_v2.predict(frame(x)).tolist()
    assert outputs["predict_proba"]["shape"] == [3, 3]
    assert outputs["predict_proba"]["data"] == models.iris_v2.predict_proba(frame(x)).reshape(-1).tolist()
    assert result.as_numpy("predict_proba").tolist() == models.iris_v2.predict_proba(frame(x)).tolist()


def test_v2_binary_outputs_are_bit_exact(triton, models):
    """InferRequestedOutput(binary_data=True) for predict (BYTES labels) and predict_proba (FP64): the
    probabilities are bit for bit the estimator's on the float64 input."""
    x = np.array(ROWS)
    result = triton.infer("iris", [_input("input-0", x, "FP64")],
                          outputs=[httpclient.InferRequestedOutput("predict", binary_data=True),
                                   httpclient.InferRequestedOutput("predict_proba", binary_data=True)])
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "data" not in outputs["predict_proba"] and outputs["predict_proba"]["parameters"]["binary_data_size"] == 72
    expected = models.iris_v2.predict_proba(frame(x))
    probabilities = result.as_numpy("predict_proba")
    assert probabilities.dtype == np.float64 and probabilities.shape == (3, 3)
    assert probabilities.tobytes() == expected.astype("<f8").tobytes()
    assert [b.decode() for b in result.as_numpy("predict").tolist()] == models.iris_v2.predict(frame(x)).tolist()


def test_v2_model_version_and_request_id(triton, models):
    """model_version="1" answers from version 1 and says so; request_id comes back as `id`."""
    x = np.array(ROWS)
    result = triton.infer("iris", [_input("input-0", x, "FP64")], model_version="1", request_id="req-42",
                          outputs=[httpclient.InferRequestedOutput("predict_proba", binary_data=True)])
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "req-42"
    assert result.as_numpy("predict_proba").tobytes() == models.iris_v1.predict_proba(frame(x)).tobytes()


def test_v2_one_input_per_feature_column(triton, models):
    """Four inputs named by the features, each of shape [N], are the model's columns (order by name, not
    position: they are sent shuffled)."""
    x = np.array(ROWS)
    inputs = [_input(feature, np.ascontiguousarray(x[:, i]), "FP64")
              for i, feature in reversed(list(enumerate(IRIS_FEATURES)))]
    result = triton.infer("iris", inputs, outputs=[httpclient.InferRequestedOutput("predict_proba")])
    assert result.as_numpy("predict_proba").tolist() == models.iris_v2.predict_proba(frame(x)).tolist()


def test_v2_bytes_input_for_the_text_model(triton, models):
    """A BYTES tensor (binary, length-prefixed UTF-8) feeds the text pipeline; labels come back as BYTES."""
    texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    result = triton.infer("sentiment", [_input("input-0", texts, "BYTES")],
                          outputs=[httpclient.InferRequestedOutput("predict", binary_data=True),
                                   httpclient.InferRequestedOutput("predict_proba", binary_data=True)])
    assert [b.decode() for b in result.as_numpy("predict").tolist()] == models.sentiment.predict(TEXTS).tolist()
    assert result.as_numpy("predict_proba").tobytes() == models.sentiment.predict_proba(TEXTS).tobytes()


def test_v2_client_errors(triton):
    """Through the client: an unknown model raises InferenceServerException with status 404; an unknown
    output name is a 400 whose message names it (the client reads the body's `error`)."""
    x = _input("input-0", np.array(ROWS), "FP64")
    with pytest.raises(InferenceServerException) as unknown_model:
        triton.infer("nosuch", [x])
    assert unknown_model.value.status() == "404" and "nosuch" in unknown_model.value.message()
    with pytest.raises(InferenceServerException) as unknown_output:
        triton.infer("iris", [x], outputs=[httpclient.InferRequestedOutput("nope")])
    assert unknown_output.value.status() == "400" and "nope" in unknown_output.value.message()


def test_v2_compressed_request_is_decoded_or_refused_cleanly(triton, models):
    """A gzip-compressed request body (tritonclient's request_compression_algorithm) is either decoded
    (a correct answer) or refused with 415 and a message the client can show (§4.5 allows both): never a
    crash or a misread body."""
    x = np.array(ROWS)
    try:
        result = triton.infer("iris", [_input("input-0", x, "FP64")], request_compression_algorithm="gzip")
    except InferenceServerException as refused:
        assert refused.status() == "415" and refused.message()
    else:
        assert [b.decode() for b in result.as_numpy("predict").tolist()] == models.iris_v2.predict(frame(x)).tolist()


# -- raw V2 requests ------------------------------------------------------------------------------------------

V2_NUMERIC = {
    "BOOL": (np.bool_, [[True, False, True, False], [False, True, True, True]]),
    "INT8": (np.int8, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "INT16": (np.int16, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "INT32": (np.int32, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "INT64": (np.int64, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "UINT8": (np.uint8, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "UINT16": (np.uint16, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "UINT32": (np.uint32, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "UINT64": (np.uint64, [[5, 3, 1, 0], [6, 3, 5, 2]]),
    "FP16": (np.float16, ROWS[:2]),
    "FP32": (np.float32, ROWS[:2]),
    "FP64": (np.float64, ROWS[:2]),
}


def v2_json(rows, datatype="FP64", **extra):
    rows = np.asarray(rows)
    return {"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": datatype,
                        "data": rows.reshape(-1).tolist()}], **extra}


@pytest.mark.parametrize("datatype", sorted(V2_NUMERIC))
def test_v2_json_infer_accepts_every_numeric_datatype(server, models, datatype):
    """JSON infer on the numeric model accepts every numeric V2 datatype; the values are read as that type
    (FP16 rounds) and the answer equals the estimator's on them."""
    dtype, rows = V2_NUMERIC[datatype]
    payload = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": datatype, "data": rows}],
               "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}
    body = strict_json(post(server, "/v2/models/plain/infer", payload))
    x = np.array(rows, dtype=dtype).astype(np.float64)
    assert body["model_name"] == "plain" and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["predict"] == {"name": "predict", "datatype": "INT64", "shape": [2],
                                  "data": models.plain.predict(x).tolist()}
    assert outputs["predict_proba"] == {"name": "predict_proba", "datatype": "FP64", "shape": [2, 3],
                                        "data": models.plain.predict_proba(x).reshape(-1).tolist()}


def test_v2_shape_and_data_count_mismatch_is_400(server):
    """Data that does not fill the declared shape is 400."""
    payload = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": ROWS[0]}]}
    assert_error(post(server, "/v2/models/plain/infer", payload), 400, "input-0")


def test_v2_bf16_is_refused_with_400(server):
    """BF16 has no numpy type: a clear 400, not a 500."""
    assert_error(post(server, "/v2/models/plain/infer", v2_json(ROWS, "BF16")), 400, "BF16")


def _binary_request(server, header, tail, header_length=None):
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return requests.post(server.base + "/v2/models/plain/infer", data=text + tail, timeout=30,
                         headers={"Inference-Header-Content-Length": str(length)})


def test_v2_raw_binary_request_as_the_extension_shows_it(server, models):
    """The spec's example byte for byte: two FP32 rows after the JSON header, binary_data_output true, no
    Content-Type; the answer is the JSON header then the INT64 labels, split by Inference-Header-Content-Length."""
    x = np.array(ROWS[:2], dtype="<f4")
    header = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                          "parameters": {"binary_data_size": 32}}], "parameters": {"binary_data_output": True}}
    response = _binary_request(server, header, x.tobytes())
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    (output,) = answer["outputs"]
    assert output["name"] == "predict" and output["datatype"] == "INT64" and output["shape"] == [2]
    assert output["parameters"]["binary_data_size"] == 16 == len(response.content) - length
    labels = np.frombuffer(response.content[length:], dtype="<i8")
    assert labels.tolist() == models.plain.predict(x.astype(np.float64)).tolist()


def test_v2_binary_header_larger_than_body_is_400(server):
    """An Inference-Header-Content-Length beyond the body is 400."""
    header = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]}
    assert_error(_binary_request(server, header, b"", header_length=10_000), 400,
                 "Inference-Header-Content-Length")


@pytest.mark.parametrize("declared, tail", [(32, 40), (40, 32), (16, 32)],
                         ids=["bytes-left-over", "size-beyond-body", "too-few-for-shape"])
def test_v2_binary_sizes_that_do_not_add_up_are_400(server, declared, tail):
    """binary_data_size that disagrees with the bytes sent (left over, missing, or not the shape's size)
    is 400."""
    header = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                          "parameters": {"binary_data_size": declared}}]}
    assert_error(_binary_request(server, header, bytes(tail)), 400)


def test_v2_id_is_echoed_and_parameters_are_accepted(server, models):
    """`id` comes back verbatim; request, input and output `parameters` are accepted without effect on the
    answer."""
    payload = v2_json(ROWS, id="batch-7/α", parameters={"content_type": "np", "priority": 1, "trace": True})
    payload["inputs"][0]["parameters"] = {"content_type": "np"}
    payload["outputs"] = [{"name": "predict", "parameters": {"binary_data": False}}]
    body = strict_json(post(server, "/v2/models/plain/infer", payload))
    assert body["id"] == "batch-7/α"
    assert body["outputs"][0]["data"] == models.plain.predict(np.array(ROWS)).tolist()


# -- repository extension ----------------------------------------------------------------------------------------

def test_v2_repository_load_needs_the_bearer_token(server):
    """With an admin token configured, load and unload without it or with a wrong one are 401 (with
    WWW-Authenticate), JSON."""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for action in ("load", "unload"):
            response = post(server, f"/v2/repository/models/plain/{action}", headers=headers)
            assert_error(response, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_v2_repository_load_and_unload(server, triton, models):
    """With the token: load -> 200 {} and the model READY in the index; unload -> 200 {}, its versions leave
    memory (UNAVAILABLE, TF state START); the next infer loads it again."""
    def state():
        return {(e["name"], e["version"]): e["state"] for e in triton.get_model_repository_index()}[("plain", "1")]

    response = post(server, "/v2/repository/models/plain/load", headers=ADMIN)
    assert response.status_code == 200 and strict_json(response) == {}
    assert state() == "READY"
    triton.load_model("plain", headers=ADMIN)           # the client's own call works as well
    assert triton.is_model_ready("plain")

    response = post(server, "/v2/repository/models/plain/unload", {"parameters": {"unload_dependents": False}},
                    headers=ADMIN)
    assert response.status_code == 200 and strict_json(response) == {}
    assert state() == "UNAVAILABLE"
    assert strict_json(get(server, "/v1/models/plain"))["model_version_status"][0]["state"] == "START"

    result = triton.infer("plain", [_input("input-0", np.array(ROWS), "FP64")])
    assert result.as_numpy("predict").tolist() == models.plain.predict(np.array(ROWS)).tolist()
    assert state() == "READY"
    triton.unload_model("plain", headers=ADMIN)
    assert state() == "UNAVAILABLE"


def test_v2_repository_load_refuses_uploads(server, triton):
    """Triton's `config` and `file:` load parameters (a model upload) are refused with 400, raw and through
    the client's load_model(config=..., files=...)."""
    for parameters in ({"config": json.dumps({"backend": "onnxruntime"})}, {"file:1/model.onnx": "AAAA"}):
        assert_error(post(server, "/v2/repository/models/plain/load", {"parameters": parameters},
                          headers=ADMIN), 400)
    with pytest.raises(InferenceServerException) as refused:
        triton.load_model("plain", headers=ADMIN, config=json.dumps({"backend": "python"}))
    assert refused.value.status() == "400"
    with pytest.raises(InferenceServerException) as refused:
        triton.load_model("plain", headers=ADMIN, config="{}", files={"file:1/model.py": b"import os"})
    assert refused.value.status() == "400"


def test_v2_repository_load_is_403_without_a_token_configured(store, make_client):
    """Without an admin token configured, load and unload are off: 403 JSON (in-process)."""
    client = make_client(store)
    for action in ("load", "unload"):
        response = client.post(f"/v2/repository/models/plain/{action}", headers=ADMIN, expect_errors=True)
        assert_error(response, 403)


# ===========================================================================================================
# 4. MLflow scoring
# ===========================================================================================================

def test_mlflow_ping_health_and_version(server):
    """/ping and /health are 200 JSON; /version is the service version as text/plain."""
    for path in ("/ping", "/health"):
        response = get(server, path)
        assert response.status_code == 200 and strict_json(response)
    response = get(server, "/version")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain") and response.text.strip()


MLFLOW_BODIES = {
    "dataframe_split": {"dataframe_split": {"columns": IRIS_FEATURES, "data": ROWS}},
    "dataframe_split-index": {"dataframe_split": {"index": [0, 1, 2], "columns": IRIS_FEATURES, "data": ROWS}},
    "dataframe_split-reordered": {"dataframe_split": {"columns": IRIS_FEATURES[::-1],
                                                      "data": [row[::-1] for row in ROWS]}},
    "dataframe_records": {"dataframe_records": [dict(zip(IRIS_FEATURES, row)) for row in ROWS]},
    "instances": {"instances": ROWS},
    "instances-objects": {"instances": [dict(zip(IRIS_FEATURES, row)) for row in ROWS]},
    "inputs": {"inputs": {f: [row[i] for row in ROWS] for i, f in enumerate(IRIS_FEATURES)}},
    "inputs-tensor": {"inputs": ROWS},
    "dataframe_split-params": {"dataframe_split": {"columns": IRIS_FEATURES, "data": ROWS},
                               "params": {"max_answer_len": 10}},
    "inputs-params": {"inputs": ROWS, "params": {"temperature": 0.5}},
}


@pytest.mark.parametrize("name", list(MLFLOW_BODIES))
def test_mlflow_invocations_json_formats(server, models, name):
    """POST /invocations with each body as MLflow's documentation shows it (and `params` alongside) answers
    {"predictions": [...]} from the default model (iris, latest version)."""
    response = post(server, "/invocations", MLFLOW_BODIES[name])
    assert strict_json(response) == {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}


def test_mlflow_invocations_csv(server, models):
    """text/csv: a header line then rows (CRLF or LF, with or without the last newline, charset allowed)."""
    lines = [",".join(IRIS_FEATURES)] + [",".join(map(str, row)) for row in ROWS]
    expected = {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}
    for text, content_type in (("\n".join(lines) + "\n", "text/csv"),
                               ("\r\n".join(lines), "text/csv; charset=utf-8")):
        response = post(server, "/invocations", data=text.encode(), headers={"Content-Type": content_type})
        assert strict_json(response) == expected


@pytest.mark.parametrize("body, content_type, status", [
    (json.dumps({"dataframe_split": {"columns": IRIS_FEATURES, "data": ROWS}, "instances": ROWS}),
     "application/json", 400),
    (json.dumps({"params": {"x": 1}}), "application/json", 400),
    (json.dumps(ROWS), "application/json", 400),
    (json.dumps({"instances": ROWS}), "application/x-www-form-urlencoded", 415),
    (",".join(IRIS_FEATURES) + "\n5.1,3.5,1.4\n6.7,3.0,5.2,2.3\n", "text/csv", 400),
], ids=["two-format-keys", "no-format-key", "bare-list", "form-urlencoded", "ragged-csv"])
def test_mlflow_errors_carry_error_code_and_message(server, body, content_type, status):
    """MLflow errors keep the envelope and add MLflow's `error_code` and `message` (same text as `error`)."""
    response = post(server, "/invocations", data=body.encode(), headers={"Content-Type": content_type})
    error = assert_error(response, status)
    assert error["error_code"] == "BAD_REQUEST" and error["message"] == error["error"]
    assert "stack_trace" not in error


def test_mlflow_one_column_csv_for_the_text_model(store, make_client, models):
    """With sentiment as the default model, a one-column CSV (quoted cells may hold commas) and a one-column
    dataframe_split feed the text pipeline its strings."""
    client = make_client(store, default_model="sentiment")
    csv_text = 'review\n"a brilliant, moving film"\nboring and awful\n'
    expected = {"predictions": models.sentiment.predict(TEXTS).tolist()}
    assert strict_json(client.post("/invocations", csv_text, content_type="text/csv")) == expected
    split = {"dataframe_split": {"columns": ["review"], "data": [[t] for t in TEXTS]}}
    assert strict_json(client.post_json("/invocations", split)) == expected


def test_mlflow_csv_with_a_blank_line(server, models):
    """A CSV body with a blank line (here a trailing empty line, as many editors save) is read as MLflow's
    pandas.read_csv reads it: blank lines are skipped."""
    text = ",".join(IRIS_FEATURES) + "\n" + "\n".join(",".join(map(str, row)) for row in ROWS) + "\n\n"
    response = post(server, "/invocations", data=text.encode(), headers={"Content-Type": "text/csv"})
    assert strict_json(response) == {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}


def test_mlflow_csv_with_a_byte_order_mark(server, models):
    """A CSV saved with a UTF-8 byte-order mark (Excel's default) is read like pandas.read_csv reads it, as
    the JSON bodies already are (parse_json strips the mark)."""
    text = ",".join(IRIS_FEATURES) + "\n" + "\n".join(",".join(map(str, row)) for row in ROWS) + "\n"
    response = post(server, "/invocations", data=b"\xef\xbb\xbf" + text.encode(),
                    headers={"Content-Type": "text/csv"})
    assert strict_json(response) == {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}


def test_mlflow_csv_text_column_with_a_numeric_looking_review(store, make_client, models):
    """In a text model's one-column CSV, a review that looks like a number ("1984") stays text."""
    client = make_client(store, default_model="sentiment")
    texts = ["1984", "boring and awful"]
    response = client.post("/invocations", "review\n1984\nboring and awful\n", content_type="text/csv",
                           expect_errors=True)
    assert strict_json(response) == {"predictions": models.sentiment.predict(texts).tolist()}


def as_mlflow_predicts(model, table):
    """What MLflow's scoring server answers for a table: scikit-learn's predict on the pandas DataFrame it
    builds (a model fitted without feature names warns, then takes the columns by position)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model.predict(table).tolist()


def test_mlflow_tables_go_by_position_to_a_model_fitted_without_feature_names(store, make_client, models):
    """A CSV with a header, a dataframe_split with columns and dataframe_records, as an MLflow client writes
    them from a DataFrame: a model without feature names (plain) takes the columns by position, the header
    only counting them, exactly as MLflow's server answers; pandas' own column names (0, 1, ...) too."""
    client = make_client(store, default_model="plain")
    for columns in (["a", "b", "c", "d"], [0, 1, 2, 3]):
        table = pd.DataFrame(ROWS, columns=columns)
        expected = {"predictions": as_mlflow_predicts(models.plain, table)}
        assert expected["predictions"] == models.plain.predict(np.array(ROWS)).tolist()
        csv_text = table.to_csv(index=False)
        assert strict_json(client.post("/invocations", csv_text, content_type="text/csv")) == expected
        split = {"dataframe_split": json.loads(table.to_json(orient="split", index=False))}
        assert strict_json(client.post_json("/invocations", split)) == expected
        records = {"dataframe_records": json.loads(table.to_json(orient="records"))}
        assert strict_json(client.post_json("/invocations", records)) == expected


def test_mlflow_tables_by_position_need_the_model_s_number_of_columns(store, make_client):
    client = make_client(store, default_model="plain")
    response = client.post("/invocations", "a,b,c\n5.1,3.5,1.4\n", content_type="text/csv", expect_errors=True)
    body = assert_error(response, 400, "expected 4 features, got 3")
    assert body["error_code"] == "BAD_REQUEST" and body["model"] == "plain"
    split = {"dataframe_split": {"columns": list("abcde"), "data": [row + [1.0] for row in ROWS]}}
    assert_error(client.post_json("/invocations", split, expect_errors=True), 400, "expected 4 features, got 5")


def test_mlflow_tables_go_by_name_to_a_model_fitted_with_feature_names(server, models):
    """iris knows its feature names: named columns are matched by name (any order), unknown or repeated names
    are refused; pandas' numbered columns are no names, so they go by position, as scikit-learn takes them."""
    reordered = ",".join(IRIS_FEATURES[::-1]) + "\n" + "\n".join(",".join(map(str, row[::-1])) for row in ROWS)
    expected = {"predictions": models.iris_v2.predict(frame(ROWS)).tolist()}
    csv = {"Content-Type": "text/csv"}
    assert strict_json(post(server, "/invocations", data=reordered.encode(), headers=csv)) == expected
    numbered = {"dataframe_split": {"columns": [0, 1, 2, 3], "data": ROWS}}
    assert strict_json(post(server, "/invocations", numbered)) == {
        "predictions": as_mlflow_predicts(models.iris_v2, pd.DataFrame(ROWS))} == expected
    assert_error(post(server, "/invocations", data=b"a,b,c,d\n5.1,3.5,1.4,0.2\n", headers=csv), 400,
                 "unknown feature 'a'")
    repeated = ",".join(IRIS_FEATURES[:3] + IRIS_FEATURES[:1]) + "\n5.1,3.5,1.4,0.2\n"
    assert_error(post(server, "/invocations", data=repeated.encode(), headers=csv), 400,
                 "column 'sepal_length' appears twice")
    mixed = {"dataframe_split": {"columns": [0, "sepal_width", 2, 3], "data": ROWS}}
    assert_error(post(server, "/invocations", mixed), 400, "all names (strings) or all positions (integers)")


def test_tf_metadata_of_the_text_model_is_one_dimensional(server, models):
    """The text model's TF signature describes the input it accepts: a 1-D DT_STRING batch, as in V2."""
    assert strict_json(post(server, "/v1/models/sentiment:predict", {"instances": TEXTS})) == {
        "predictions": models.sentiment.predict(TEXTS).tolist()}
    assert_error(post(server, "/v1/models/sentiment:predict", {"instances": [[t] for t in TEXTS]}), 400)
    v2 = strict_json(get(server, "/v2/models/sentiment"))
    assert v2["inputs"][0]["shape"] == [-1]
    signature = strict_json(get(server, "/v1/models/sentiment/metadata"))["metadata"]["signature_def"][
        "signature_def"]["serving_default"]
    (tensor,) = signature["inputs"].values()
    assert tensor["dtype"] == "DT_STRING"
    assert [d["size"] for d in tensor["tensor_shape"]["dim"]] == ["-1"]


# ===========================================================================================================
# 5. Errors everywhere: JSON, nosniff, no HTML
# ===========================================================================================================

@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/v1/models/nosuch", None, 404),
    ("POST", "/v1/models/nosuch:predict", {"instances": ROWS}, 404),
    ("POST", "/v1/models/iris/versions/x:predict", {"instances": ROWS}, 400),
    ("POST", "/v1/models/iris:predict", b"{not json", 400),
    ("GET", "/v2/models/nosuch", None, 404),
    ("GET", "/v2/models/iris/versions/9/ready", None, 404),
    ("POST", "/v2/models/iris/infer", {"inputs": []}, 400),
    ("POST", "/v2/models/iris/versions/9/infer", v2_json(ROWS), 404),
    ("PUT", "/v2/repository/index", {}, 405),
    ("GET", "/v2/nothing-here", None, 404),
    ("DELETE", "/invocations", None, 405),
])
def test_error_bodies_are_json_with_nosniff(server, method, path, body, status):
    """Protocol routes' errors, the framework's 404 and 405 included, use the one JSON envelope with
    X-Content-Type-Options: nosniff: never HTML, never a traceback or a path."""
    options = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = requests.request(method, server.base + path, timeout=30, **options)
    assert_error(response, status, store=server.store)


def test_a_v2_answer_of_a_model_that_predicts_a_plain_list_is_one_tensor(tmp_path, make_client):
    """A model of one's own may answer a list of values: one tensor, not one per value (a multi-output
    classifier's probabilities are a list of arrays, one tensor each)."""
    from doubles import SlowModel

    write_artifact(tmp_path / "listed.pkl", SlowModel(0), "pickle")
    body = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": [0.0] * 12}]}
    answer = make_client(tmp_path).post_json("/v2/models/listed/infer", body).json
    assert answer["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [3], "data": [0, 0, 0]}]
