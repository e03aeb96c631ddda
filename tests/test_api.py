"""Every route and every error of the native JSON API, in-process (WebTest); loading and metadata for each
artifact format."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

import service
from support import IRIS_FEATURES, ROW, ROWS, assert_error, strict_json

IRIS_ROWS = ROWS[:2]             # a setosa and a virginica


# -- service routes ---------------------------------------------------------------------------------------

def test_index_describes_service_and_models(client):
    body = strict_json(client.get("/"))
    assert body["name"] == "model-service" and body["version"]
    assert body["models"] == ["diabetes", "flowers", "iris"]
    assert body["links"]["models"] == "/models"


def test_health_and_readiness(client):
    assert strict_json(client.get("/healthz")) == {"status": "alive"}
    assert strict_json(client.get("/readyz"))["ready"] is True


def test_nothing_is_loaded_before_a_prediction(client):
    models = strict_json(client.get("/models"))["models"]
    states = {(m["name"], v["version"]): v["state"] for m in models for v in m["versions"]}
    assert states == {("diabetes", "1"): "UNLOADED", ("diabetes", "2"): "UNLOADED",
                      ("flowers", "1"): "UNLOADED", ("iris", "1"): "UNLOADED"}


def test_models_lists_versions_format_and_status(store_in_each_format, artifact_format, make_client):
    client = make_client(store_in_each_format)
    models = {m["name"]: m for m in strict_json(client.get("/models"))["models"]}
    diabetes = models["diabetes"]
    assert diabetes["latest_version"] == "2"
    assert [v["version"] for v in diabetes["versions"]] == ["2", "1"]
    assert {v["format"] for m in models.values() for v in m["versions"]} == {artifact_format}


def test_model_metadata_after_load(store_in_each_format, make_client):
    store = store_in_each_format
    client = make_client(store)
    client.post_json("/models/flowers/predict", {"instances": IRIS_ROWS})
    body = strict_json(client.get("/models/flowers"))
    version = body["versions"][0]
    assert version["state"] == "AVAILABLE"
    assert version["estimator"] == "sklearn.pipeline.Pipeline"
    assert version["methods"] == ["predict", "predict_proba", "predict_log_proba", "decision_function"]
    assert version["n_features_in_"] == 4
    assert version["feature_names_in_"] == IRIS_FEATURES
    assert version["classes_"] == ["setosa", "versicolor", "virginica"]
    artifact = version["artifact"]
    path = store / artifact["file"]
    assert path.exists() and artifact["size"] == path.stat().st_size
    import hashlib
    assert artifact["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert artifact["modified"].endswith("Z") and version["loaded_at"].endswith("Z")
    assert version["load_seconds"] > 0 and version["last_error"] is None and version["loads"] == 1


def test_version_metadata(client):
    body = strict_json(client.get("/models/diabetes/versions/1"))
    assert body["name"] == "diabetes" and body["version"] == "1" and body["state"] == "UNLOADED"


# -- predictions --------------------------------------------------------------------------------------------

def test_predict_rows_matches_the_estimator(client, iris_classifier):
    body = strict_json(client.post_json("/models/iris/predict", {"instances": IRIS_ROWS}))
    assert body == {"model": "iris", "version": "1", "method": "predict",
                    "predictions": iris_classifier.predict(np.array(IRIS_ROWS)).tolist()}


def test_predict_accepts_a_bare_list(client, iris_classifier):
    body = strict_json(client.post_json("/models/iris/predict", IRIS_ROWS))
    assert body["predictions"] == iris_classifier.predict(np.array(IRIS_ROWS)).tolist()


def test_predict_accepts_inputs_tensor(client, iris_classifier):
    body = strict_json(client.post_json("/models/iris/predict", {"inputs": IRIS_ROWS}))
    assert body["predictions"] == iris_classifier.predict(np.array(IRIS_ROWS)).tolist()


def test_predict_proba_carries_classes(client, iris_classifier):
    body = strict_json(client.post_json("/models/iris/predict", {"instances": IRIS_ROWS,
                                                                  "method": "predict_proba"}))
    assert body["method"] == "predict_proba" and body["classes"] == [0, 1, 2]
    assert body["predictions"] == iris_classifier.predict_proba(np.array(IRIS_ROWS)).tolist()


@pytest.mark.parametrize("method", ["predict_log_proba", "decision_function"])
def test_other_methods_by_query(client, iris_classifier, method):
    body = strict_json(client.post_json(f"/models/iris/predict?method={method}", {"instances": IRIS_ROWS}))
    assert body["method"] == method
    assert body["predictions"] == getattr(iris_classifier, method)(np.array(IRIS_ROWS)).tolist()


def test_transform_on_a_scaler(tmp_path, make_client, artifact_format):
    from sklearn.preprocessing import StandardScaler

    from support import EXTENSIONS, write_artifact
    scaler = StandardScaler().fit(load_iris().data)
    write_artifact(tmp_path / f"scaler{EXTENSIONS[artifact_format]}", scaler, artifact_format)
    client = make_client(tmp_path)
    body = strict_json(client.post_json("/models/scaler/predict", {"instances": IRIS_ROWS, "method": "transform"}))
    assert body["predictions"] == scaler.transform(np.array(IRIS_ROWS)).tolist()
    assert_error(client.post_json("/models/scaler/predict", {"instances": IRIS_ROWS}, expect_errors=True),
                 400, "has no method 'predict'", "transform")


def test_named_rows_are_ordered_by_feature_names(client, named_iris_classifier):
    rows = [dict(zip(reversed(IRIS_FEATURES), reversed(row))) for row in IRIS_ROWS]
    body = strict_json(client.post_json("/models/flowers/predict", {"instances": rows}))
    import pandas
    expected = named_iris_classifier.predict(pandas.DataFrame(IRIS_ROWS, columns=IRIS_FEATURES)).tolist()
    assert body["predictions"] == expected == ["setosa", "virginica"]


def test_named_model_accepts_list_rows_and_columns(client):
    by_rows = strict_json(client.post_json("/models/flowers/predict", {"instances": IRIS_ROWS}))
    columns = {name: [row[i] for row in IRIS_ROWS] for i, name in enumerate(IRIS_FEATURES)}
    by_columns = strict_json(client.post_json("/models/flowers/predict", {"inputs": columns}))
    assert by_rows["predictions"] == by_columns["predictions"] == ["setosa", "virginica"]


def test_missing_and_unknown_feature_names_are_named(client):
    row = dict(zip(IRIS_FEATURES, IRIS_ROWS[0]))
    missing = {k: v for k, v in row.items() if k != "petal_width"}
    assert_error(client.post_json("/models/flowers/predict", {"instances": [missing]}, expect_errors=True),
                 400, "missing feature 'petal_width'")
    assert_error(client.post_json("/models/flowers/predict", {"instances": [dict(row, colour=1)]},
                                  expect_errors=True), 400, "unknown feature 'colour'")
    assert_error(client.post_json("/models/iris/predict", {"instances": [row]}, expect_errors=True),
                 400, "does not know its feature names")


def test_versioned_predict_and_latest(client, diabetes_regressor):
    row = load_diabetes().data[:3]
    expected = diabetes_regressor.predict(row).tolist()
    latest = strict_json(client.post_json("/models/diabetes/predict", {"instances": row.tolist()}))
    first = strict_json(client.post_json("/models/diabetes/versions/1/predict", {"instances": row.tolist()}))
    assert latest["version"] == "2" and first["version"] == "1"
    assert latest["predictions"] == first["predictions"] == expected


def test_get_predict_with_query(client, iris_classifier):
    body = strict_json(client.get("/models/iris/predict", {"instances": json.dumps(IRIS_ROWS),
                                                           "method": "predict_proba"}))
    assert body["predictions"] == iris_classifier.predict_proba(np.array(IRIS_ROWS)).tolist()
    versioned = strict_json(client.get("/models/diabetes/versions/1/predict",
                                       {"instances": json.dumps(load_diabetes().data[:1].tolist())}))
    assert versioned["version"] == "1"


def test_null_cells_become_nan_and_non_finite_outputs_become_null(tmp_path, make_client, artifact_format):
    from sklearn.preprocessing import StandardScaler

    from support import EXTENSIONS, write_artifact
    write_artifact(tmp_path / f"scaler{EXTENSIONS[artifact_format]}", StandardScaler().fit(load_iris().data),
                   artifact_format)
    client = make_client(tmp_path)
    body = strict_json(client.post_json("/models/scaler/predict",
                                        {"instances": [[None, 1, 2, 3]], "method": "transform"}))
    assert body["predictions"][0][0] is None and all(isinstance(x, float) for x in body["predictions"][0][1:])
    # JSON is RFC 8259: NaN and Infinity tokens are refused (null is the missing value), in every protocol
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        response = client.post("/models/scaler/predict", b'{"instances": [[%s, 1, 1, 2]], "method": "transform"}'
                               % token, content_type="application/json", expect_errors=True)
        assert_error(response, 400, token.decode() + " is not a JSON value")
        assert "null" in response.json["error"]


def test_any_content_type_except_multipart_is_read_as_json(client):
    """Never a decoder chosen by the header: curl -d's form type, text/plain or none all mean JSON."""
    for content_type in ("text/plain", "application/octet-stream", "application/json; charset=utf-8", "",
                         "application/x-www-form-urlencoded"):
        response = client.request("/models/iris/predict", method="POST",
                                  body=json.dumps({"instances": IRIS_ROWS}).encode(),
                                  headers={"Content-Type": content_type} if content_type else {})
        assert "CONTENT_TYPE" not in response.request.environ or content_type
        assert strict_json(response)["predictions"]


# -- seed compatibility -----------------------------------------------------------------------------------

def test_seed_routes_use_the_only_model(tmp_path, make_client, iris_classifier):
    from support import write_artifact
    write_artifact(tmp_path / "only.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path)
    expected = iris_classifier.predict(np.array(IRIS_ROWS)).tolist()
    assert strict_json(client.get("/predict/[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]"))["predictions"] == expected
    assert strict_json(client.get("/predict/((5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3))"))["predictions"] == expected
    assert strict_json(client.post_json("/predict", {"instances": IRIS_ROWS}))["predictions"] == expected


def test_seed_route_needs_a_default_when_several_models(client, store, make_client):
    assert_error(client.get("/predict/[[1,2,3,4]]", expect_errors=True), 404, "--default-model")
    chosen = make_client(store, default_model="iris")
    assert strict_json(chosen.get("/predict/[[5.1,3.5,1.4,0.2]]"))["model"] == "iris"


@pytest.mark.parametrize("literal, fragment", [
    ("[[1, 2, 3, 4]", "neither JSON nor a Python literal"),
    ("__import__('os').system('true')", "neither JSON nor a Python literal"),
    ("[" * 200 + "]" * 200, "nested deeper"),
])
def test_seed_literal_is_parsed_safely(client, store, make_client, literal, fragment):
    chosen = make_client(store, default_model="iris")
    assert_error(chosen.get("/predict/" + literal, expect_errors=True), 400, fragment)


def test_a_long_seed_literal_is_refused_by_the_url_bound_then_by_the_literal_bound(store, make_client):
    literal = "[" + "1," * 60000 + "1]"
    assert_error(make_client(store, default_model="iris").get("/predict/" + literal, expect_errors=True), 414,
                 "--max-url-bytes")
    roomy = make_client(store, default_model="iris", max_url_bytes=1_000_000)
    assert_error(roomy.get("/predict/" + literal, expect_errors=True), 400, "longer than")


# -- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, status, fragment", [
    ("/models/nosuch/predict", 404, "model 'nosuch' not found"),
    ("/models/diabetes/versions/7/predict", 404, "has no version 7"),
    ("/models/diabetes/versions/abc/predict", 400, "invalid version"),
    ("/models/diabetes/versions/0/predict", 400, "invalid version"),
    ("/models/-x/predict", 400, "invalid model name"),
    ("/models/%2e%2e/predict", 400, "invalid model name"),
])
def test_unknown_model_and_version(client, url, status, fragment):
    assert_error(client.post_json(url, {"instances": IRIS_ROWS}, expect_errors=True), status, fragment)


def test_unknown_model_and_version_metadata(client):
    assert_error(client.get("/models/nosuch", expect_errors=True), 404, "not found")
    assert_error(client.get("/models/diabetes/versions/9", expect_errors=True), 404, "no version 9")


def test_unknown_method_is_404_and_missing_method_is_400(client):
    body = assert_error(client.post_json("/models/iris/predict", {"instances": IRIS_ROWS, "method": "explain"},
                                         expect_errors=True), 404, "has no method 'explain'")
    assert body["methods"] == ["predict", "predict_proba", "predict_log_proba", "decision_function"]
    body = assert_error(client.post_json("/models/diabetes/predict", {"instances": [[0] * 10],
                                                                      "method": "predict_proba"},
                                         expect_errors=True), 400, "has no method 'predict_proba'", "predict")
    assert body["methods"] == ["predict"]


@pytest.mark.parametrize("body, fragment", [
    (b"{bad json", "not valid JSON"),
    (b"instances=1&method=predict", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"instances": [[1,2,3]]}', "expected 4 features, got 3"),
    (b'{"instances": [[1,2,3,4],[1,2]]}', "list of 4 feature values"),
    (b'{"instances": [1,2,3,4]}', "list of 4 feature values"),
    (b'{"instances": []}', "No values in 'instances' array"),
    (b'{"instances": [[1,2,3,4]], "inputs": [[1,2,3,4]]}', "only one of 'inputs' or 'instances'"),
    (b'{"rows": [[1,2,3,4]]}', "Missing 'inputs' or 'instances' key"),
    (b'"text"', "expected a JSON object"),
    (b'{"instances": [[1,2,3,4]], "method": 5}', "'method' must be a string"),
    (b'{"instances": [["a","b","c","d"]]}', "predict failed"),
    (b'{"instances": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
    (b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"instances": [[1e400, 1, 1, 1]]}', "out of a float's range"),
])
def test_malformed_requests_are_400(client, body, fragment):
    response = client.post("/models/iris/predict", body, content_type="application/json", expect_errors=True)
    assert_error(response, 400, fragment)


def test_body_method_and_query_method_must_agree(client):
    assert_error(client.post_json("/models/iris/predict?method=predict_proba",
                                  {"instances": IRIS_ROWS, "method": "predict"}, expect_errors=True),
                 400, "disagrees")


def test_get_predict_without_instances_is_400(client):
    assert_error(client.get("/models/iris/predict", expect_errors=True), 400, "?instances=")
    assert_error(client.get("/models/iris/predict?instances=[[1,2", expect_errors=True), 400, "not valid JSON")


def test_body_over_the_limit_is_413(store, make_client):
    client = make_client(store, max_body_bytes=100)
    body = json.dumps({"instances": IRIS_ROWS * 10})
    assert_error(client.post("/models/iris/predict", body, content_type="application/json", expect_errors=True),
                 413, "over the limit")
    assert strict_json(client.post_json("/models/iris/predict", {"instances": IRIS_ROWS[:1]}))


def test_chunked_body_over_the_limit_is_413(store, make_client):
    client = make_client(store, max_body_bytes=100)
    body = json.dumps({"instances": IRIS_ROWS * 10}).encode()
    import io
    response = client.app  # raw WSGI call: a chunked body has no Content-Length
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/models/iris/predict", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "HTTP_TRANSFER_ENCODING": "chunked", "SERVER_PROTOCOL": "HTTP/1.1",
               "CONTENT_TYPE": "application/json"}
    seen = {}
    chunks = response(environ, lambda status, headers, exc_info=None: seen.update(status=status))
    assert seen["status"].startswith("413") and b"over the limit" in b"".join(chunks)


def test_row_limit(store, make_client):
    client = make_client(store, max_rows=2)
    assert_error(client.post_json("/models/iris/predict", {"instances": IRIS_ROWS * 2}, expect_errors=True),
                 400, "over the limit of 2")


def body_routes(name):
    """(path, example) of every route that takes a JSON body with an example, for model `name`, version 1."""
    return [(route.path.replace("{name}", name).replace("{version}", "1"), service.BODY_EXAMPLES[route.body])
            for route in service.ROUTES if route.body in service.BODY_EXAMPLES and "{label}" not in route.path]


def test_every_body_example_is_a_body_its_route_takes(store, make_client):
    """The examples refusals show (and OpenAPI documents) are real requests: each one predicts on its route
    (:regress refuses a classifier for what it is, not for its body)."""
    client = make_client(store, default_model="flowers")
    routes = body_routes("flowers")
    assert {json.dumps(example) for _, example in routes} == {
        json.dumps(example) for example in service.BODY_EXAMPLES.values()}, "every example has a route"
    for path, example in routes:
        response = client.post_json(path, example, expect_errors=True)
        if path.endswith(":regress"):
            assert_error(response, 400, "is a classifier")
        else:
            assert response.status_int == 200 and strict_json(response), (path, response.text)


@pytest.mark.parametrize("body, content_type, status, fragment", [
    (b"sepal_length=5.1&sepal_width=3.5", "application/x-www-form-urlencoded", 415,
     "Content-Type application/x-www-form-urlencoded: request body is not valid JSON"),
    (b"<instances><row>5.1</row></instances>", "application/xml", 415, "Content-Type application/xml: "),
    (b"5.1,3.5,1.4,0.2", "text/csv", 415, "Content-Type text/csv: "),
    (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--", "multipart/form-data; boundary=x", 415,
     "a multipart/form-data body is not JSON"),
    (b"{bad json", "application/json", 400, "request body is not valid JSON"),
    (b"{bad json", "text/plain", 400, "request body is not valid JSON"),
    (b"{bad json", "", 400, "request body is not valid JSON"),
    (b"", "application/json", 400, "request body is empty"),
    (b'{"instances": [[5.1, 3.5, 1.4 0.2]]}', "application/x-www-form-urlencoded", 400,
     "request body is not valid JSON: Expecting ',' delimiter: line 1 column 31 (char 30) (it came as Content-Type "
     "application/x-www-form-urlencoded, as curl -d sends it: the body is read as JSON all the same)"),
], ids=["form", "xml", "csv", "multipart", "json", "text-plain", "no-content-type", "empty", "json-typo-as-form"])
def test_a_body_that_is_not_json_is_answered_with_the_route_s_example(store, make_client, body, content_type, status,
                                                                      fragment):
    """A form, XML or CSV body (a Content-Type naming another format) is a 415, a malformed body claiming JSON
    or no format a 400; both show JSON the route takes, in that route's protocol (MLflow says which two
    Content-Types it takes: a 415 whatever the body)."""
    client = make_client(store, default_model="flowers")
    for path, example in body_routes("flowers"):
        response = client.request(path, method="POST", body=body, expect_errors=True,
                                  headers={"Content-Type": content_type} if content_type else {})
        assert content_type or "CONTENT_TYPE" not in response.request.environ
        if path == "/invocations" and content_type == "text/csv":
            assert_error(response, 400, "CSV needs a header line")         # MLflow's other body format
            continue
        if path == "/invocations" and content_type in ("", "text/plain", "application/xml", "application/x-www-"
                                                       "form-urlencoded"):
            error = assert_error(response, 415, "/invocations takes application/json or text/csv")
        else:
            error = assert_error(response, status, fragment)
        assert error["error"].endswith("send JSON with Content-Type: application/json, for example "
                                       + json.dumps(example)), (path, error)
        assert error["code"] == {400: "bad_request", 415: "unsupported_media_type"}[response.status_int]


def test_json_under_a_form_content_type_is_still_read_as_curl_d_sends_it(store, make_client):
    """curl -d without -H sends application/x-www-form-urlencoded: a body that is JSON is read all the same."""
    client = make_client(store, default_model="flowers")
    for path, example in body_routes("flowers"):
        if path not in ("/invocations",) and not path.endswith(":regress"):
            response = client.post(path, json.dumps(example), content_type="application/x-www-form-urlencoded")
            assert response.status_int == 200 and strict_json(response)


def test_a_route_without_a_body_keeps_its_plain_400(client):
    response = client.get("/models/iris/predict?instances=[[1,2", headers={"Content-Type": "text/csv"},
                          expect_errors=True)
    error = assert_error(response, 400, "?instances is not valid JSON")
    assert "for example" not in error["error"]


def test_an_empty_store_says_so_without_its_path(tmp_path, make_client, caplog):
    """Predicting from an empty store says the store has no models (the log names the folder, clients are not
    shown it), on the default model's routes and on a named model's."""
    root = tmp_path / "store"
    root.mkdir()
    client = make_client(root)
    for path in ("/predict", "/invocations", "/models/iris/predict"):
        error = assert_error(client.post_json(path, {"instances": IRIS_ROWS}, expect_errors=True), 404,
                             "the model store has no models", store=root)
        assert "--default-model" not in error["error"] and error["models"] == []
    assert f"model store {root}: the model store has no models" in caplog.text
    named = make_client(root, default_model="iris")
    assert_error(named.post_json("/predict", {"instances": IRIS_ROWS}, expect_errors=True), 404,
                 "model 'iris' not found: the model store has no models", store=root)


@pytest.mark.parametrize("content_type, status", [
    ("multipart/form-data; boundary=x", 415),
    ("application/json; charset=latin-1", 415)])
def test_refused_content_types(client, content_type, status):
    response = client.post("/models/iris/predict", json.dumps({"instances": IRIS_ROWS}),
                           headers={"Content-Type": content_type}, expect_errors=True)
    assert_error(response, status)


def test_compressed_bodies_are_415(client):
    response = client.post("/models/iris/predict", b"\x1f\x8b", headers={"Content-Encoding": "gzip",
                           "Content-Type": "application/json"}, expect_errors=True)
    assert_error(response, 415, "compressed")


def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/no/such/route", expect_errors=True), 404, "no route")
    response = client.put_json("/models/iris/predict", {"instances": IRIS_ROWS}, expect_errors=True)
    assert_error(response, 405, "PUT")
    assert set(response.headers["Allow"].split(",")) == {"GET", "POST"}
    assert_error(client.delete("/models", expect_errors=True), 405)


def test_invalid_utf8_path_is_400_not_stripped(client):
    response = client.get("/models/.%FF./predict?instances=[[1,2,3,4]]", expect_errors=True)
    assert_error(response, 400, "not valid UTF-8")


def test_internal_faults_are_500_json_without_traceback(store, make_client, caplog):
    client = make_client(store)
    registry = client.app.registry
    client.get("/models")
    registry.describe = lambda name: 1 / 0      # a fault of ours, not the caller's
    response = client.get("/models/iris", expect_errors=True)
    body = assert_error(response, 500, "internal server error")
    assert body["error_id"] and "ZeroDivision" not in response.text
    assert body["error_id"] in caplog.text and "ZeroDivisionError" in caplog.text


# -- messages that say what to do ------------------------------------------------------------------------------

@pytest.mark.parametrize("instance, where", [
    ([5.1, "big", 1.4, 0.2], "instance 0, feature 'sepal_width'"),
    ({"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": "big", "petal_width": 0.2},
     "instance 0, feature 'petal_length'"),
])
def test_a_word_for_a_numeric_feature_names_the_feature(client, instance, where):
    """"big" is no number's spelling, so it goes to the model as text (it may be a category); a model that takes
    only numbers refuses it, and the answer says where it was, as it does for "5.1"."""
    response = client.post_json("/models/flowers/predict", {"instances": [instance]}, expect_errors=True)
    assert_error(response, 400, f"predict failed: {where}: could not convert string to float: 'big'")
    response = client.post_json("/models/iris/predict", {"instances": [ROW[0], [5.1, 3.5, "big", 0.2]]},
                                expect_errors=True)
    assert_error(response, 400, "predict failed: instance 1, feature 2: could not convert string to float: 'big'")


@pytest.mark.parametrize("method, path, nearest", [
    ("POST", "/model/iris/predict", "POST /models/iris/predict"),
    ("GET", "/models/iris/", "GET /models/iris"),
    ("POST", "/models/iris/predict/", "POST /models/iris/predict"),
    ("GET", "/healtz", "GET /healthz"),
    ("POST", "/v1/models/iris:predic", "POST /v1/models/iris:predict"),
    ("GET", "/nothing/here/at/all", None),
])
def test_an_unknown_route_points_to_the_nearest_one_and_to_openapi(client, method, path, nearest):
    response = client.request(path, method=method, body=json.dumps({"instances": ROW}).encode() if method == "POST"
                              else b"", expect_errors=True)
    error = assert_error(response, 404, f"no route for {method} {path}", "(every route is listed in /openapi.json)")
    assert (f"; did you mean {nearest}?" in error["error"]) if nearest else "did you mean" not in error["error"]
    route_method, route_path = (nearest or " ").split(" ")
    if nearest:             # and the route it names is real
        answer = client.request(route_path, method=route_method, expect_errors=True,
                                body=json.dumps({"instances": ROW}).encode() if route_method == "POST" else b"")
        assert answer.status_int == 200, (nearest, answer.text)


def test_a_model_name_in_another_case_or_a_letter_off_suggests_the_real_one(client):
    assert_error(client.get("/models/Iris", expect_errors=True), 404, "model 'Iris' not found; did you mean 'iris'?")
    assert_error(client.post_json("/models/flower/predict", {"instances": ROW}, expect_errors=True), 404,
                 "model 'flower' not found; did you mean 'flowers'?")
    error = assert_error(client.get("/models/zzz", expect_errors=True), 404, "model 'zzz' not found")
    assert "did you mean" not in error["error"]
