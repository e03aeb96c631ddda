"""The HTTP application section: the route table, the codecs with their one predict core, and the one error
path, in-process (WebTest and direct WSGI calls)."""

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import webtest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression

import service
from support import ROOT, ROWS, write_artifact

IRIS_X, IRIS_Y = load_iris(return_X_y=True)


@pytest.fixture
def iris_client(tmp_path, make_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    return make_client(tmp_path, poll_interval=0)


# -- the route table ------------------------------------------------------------------------------------------------

def test_every_route_has_one_row_with_its_access_and_documentation():
    keys = [(route.method, route.path) for route in service.ROUTES]
    assert len(keys) == len(set(keys)), "one row per route"
    for route in service.ROUTES:
        assert route.access in (service.OPEN, service.TOKEN, service.ADMIN), route
        assert route.summary and route.tag, route
        assert callable(getattr(route.protocol or service.SERVICE_ANSWERS, route.handler)), route
    assert {route.path for route in service.ROUTES if route.access == service.OPEN} == {"/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/ping", "/health"}
    admin = {route.path for route in service.ROUTES if route.access == service.ADMIN}
    assert admin == {"/admin/rescan", "/models/{name}/reload", "/v2/repository/models/{name}/load",
                     "/v2/repository/models/{name}/unload"}


def test_access_comes_from_the_table(tmp_path, make_client, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, auth_tokens=("secret",), admin_token="root")
    for route in service.ROUTES:
        path = route.path.format(name="iris", version="1", label="stable", sentence="[[1,2,3,4]]")
        answer = client.request(path, method=route.method, expect_errors=True)
        if route.access == service.OPEN:
            assert answer.status_int != 401, route
        else:
            assert answer.status_int == 401, route
            realm = "model-service admin" if route.access == service.ADMIN else "model-service"
            assert answer.headers["WWW-Authenticate"] == f'Bearer realm="{realm}"', route
            assert answer.json["code"] == "unauthorized"



def test_requests_no_route_answers_are_told_so_only_as_the_paths_access_allows(tmp_path, make_client,
                                                                                iris_classifier):
    """With tokens required, an unknown path or a wrong method on a model route is a 401 (no route enumeration);
    a wrong method on an open route, or on an admin route, is its 405."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    client = make_client(tmp_path, poll_interval=0, auth_tokens=("secret-token-0123456789",))
    for method, path in (("GET", "/no/such/route"), ("POST", "/models"), ("DELETE", "/models/iris/predict")):
        assert client.request(path, method=method, expect_errors=True).status_int == 401, (method, path)
    for method, path in (("POST", "/healthz"), ("GET", "/admin/rescan"), ("GET", "/models/iris/reload")):
        assert client.request(path, method=method, expect_errors=True).status_int == 405, (method, path)
    authorised = {"Authorization": "Bearer secret-token-0123456789"}
    assert client.get("/no/such/route", headers=authorised, expect_errors=True).status_int == 404
    assert client.post("/models", headers=authorised, expect_errors=True).status_int == 405

# -- the one error path -----------------------------------------------------------------------------------------------

def test_status_codes_come_from_the_error_classes():
    for kind in (service.BadRequest, service.NotFound, service.MethodNotAllowed, service.PayloadTooLarge,
                 service.URITooLong, service.UnsupportedMediaType, service.ModelUnavailable,
                 service.PredictionTimeout, service.NotImplementedHere, service.Forbidden):
        assert service.error_for_status(kind.status) is kind
    assert service.error_for_status(500) is service.ServiceError
    teapot = service.error_for_status(418)
    assert teapot.status == 418 and teapot.code == "http_error" and service.error_for_status(418) is teapot


@pytest.mark.parametrize("method, path, body, status, code, header", [
    ("GET", "/nowhere", None, 404, "not_found", None),
    ("POST", "/healthz", None, 405, "method_not_allowed", ("Allow", "GET")),
    ("POST", "/models/iris/predict", b"{", 400, "bad_request", None),
    ("POST", "/models/iris/predict", b'{"instances": [[1, 2]]}', 400, "bad_request", None),
    ("POST", "/models/nope/predict", b'{"instances": [[1, 2]]}', 404, "not_found", None),
    ("POST", "/v1/models/iris:explain", b"{}", 400, "bad_request", None),      # a :predict body, without rows
    ("POST", "/admin/rescan", None, 403, "forbidden", None),
])
def test_every_refusal_is_json_with_its_status_code_and_headers(iris_client, method, path, body, status, code,
                                                                 header):
    answer = iris_client.request(path, method=method, body=body, expect_errors=True,
                                 headers={"Content-Type": "application/json"} if body else {})
    assert answer.status_int == status and answer.content_type == "application/json"
    assert answer.json["code"] == code and answer.json["error"]
    assert answer.headers["X-Request-ID"]
    if header:
        assert answer.headers[header[0]] == header[1]


def test_mlflow_refusals_carry_mlflow_fields_and_others_do_not(iris_client):
    answer = iris_client.post("/invocations", b"{}", headers={"Content-Type": "application/json"},
                              expect_errors=True)
    assert answer.status_int == 400
    assert answer.json["error_code"] == "BAD_REQUEST" and answer.json["message"] == answer.json["error"]
    native = iris_client.post("/models/iris/predict", b"{}", headers={"Content-Type": "application/json"},
                              expect_errors=True)
    assert "error_code" not in native.json


def test_retry_after_comes_with_the_error(tmp_path, make_client):
    (tmp_path / "broken.joblib").write_bytes(b"not a model")
    client = make_client(tmp_path, poll_interval=0, load_retry_seconds=30)
    answer = client.post_json("/models/broken/predict", {"instances": ROWS}, expect_errors=True)
    assert answer.status_int == 503 and answer.headers["Retry-After"] == "30"


def test_a_bad_environment_never_breaks_import_and_every_request_says_why(make_app, monkeypatch):
    environment = dict(os.environ, MODEL_SERVICE_PORT="not-a-port", PYTHONPATH=ROOT)
    imported = subprocess.run([sys.executable, "-c", "import service"], cwd=ROOT, env=environment,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and imported.stdout == "" and imported.stderr == "", imported
    monkeypatch.setenv("MODEL_SERVICE_PORT", "not-a-port")
    application = make_app()
    for path in ("/healthz", "/readyz", "/models"):
        answer = webtest.TestApp(application).get(path, expect_errors=True)
        assert answer.status_int == 503 and answer.json["code"] == "misconfigured"
        assert "MODEL_SERVICE_PORT" in answer.json["error"]


# -- codecs -----------------------------------------------------------------------------------------------------------

def test_a_v2_output_named_many_times_is_computed_once(iris_client, monkeypatch):
    iris_client.post_json("/models/iris/predict", {"instances": ROWS})     # loaded (and warmed) before counting
    calls = []
    original = service.LoadedModel.call
    monkeypatch.setattr(service.LoadedModel, "call", lambda model, method, inputs: calls.append(method) or
                        original(model, method, inputs))
    body = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": ROWS}],
            "outputs": [{"name": "predict_proba"}] * 5000 + [{"name": "predict"}] * 5000}
    answer = iris_client.post_json("/v2/models/iris/infer", body).json
    assert [output["name"] for output in answer["outputs"]] == ["predict_proba", "predict"]
    assert sorted(calls) == ["predict", "predict_proba"]


def test_tf_regress_on_a_classifier_is_refused(iris_client):
    answer = iris_client.post_json("/v1/models/iris:regress", {"examples": [{"x": 1}]}, expect_errors=True)
    assert answer.status_int == 400 and "classifier" in answer.json["error"]


def test_v2_for_a_multi_output_classifier_and_a_one_feature_model(tmp_path, make_client):
    targets = np.c_[IRIS_Y, (IRIS_Y > 0).astype(int)]
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(IRIS_X, targets)
    write_artifact(tmp_path / "multi.joblib", forest, "joblib")
    single = LinearRegression().fit(pd.DataFrame({"width": IRIS_X[:, 0]}), IRIS_X[:, 1])
    write_artifact(tmp_path / "one.joblib", single, "joblib")
    client = make_client(tmp_path, poll_interval=0)

    outputs = {spec["name"]: spec for spec in client.get("/v2/models/multi").json["outputs"]}
    assert outputs["predict"]["shape"] == [-1, 2]
    assert outputs["predict_proba_0"]["shape"] == [-1, 3] and outputs["predict_proba_1"]["shape"] == [-1, 2]
    body = {"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP64", "data": ROWS}],
            "outputs": [{"name": "predict_proba"}, {"name": "predict"}]}
    answer = {output["name"]: output for output in client.post_json("/v2/models/multi/infer", body).json["outputs"]}
    for number, probabilities in enumerate(forest.predict_proba(np.array(ROWS))):
        tensor = answer[f"predict_proba_{number}"]
        assert tensor["shape"] == list(probabilities.shape) and tensor["data"] == probabilities.ravel().tolist()
    assert answer["predict"]["data"] == forest.predict(np.array(ROWS)).ravel().tolist()

    inputs = client.get("/v2/models/one").json["inputs"]
    assert inputs == [{"name": "width", "datatype": "FP64", "shape": [-1]}]
    body = {"inputs": [{"name": "width", "shape": [3], "datatype": "FP64", "data": [r[0] for r in ROWS]}]}
    answer = client.post_json("/v2/models/one/infer", body).json
    expected = single.predict(pd.DataFrame({"width": [r[0] for r in ROWS]}))
    assert answer["outputs"][0]["data"] == expected.tolist()


# -- bounded observability --------------------------------------------------------------------------------------------

def wsgi_post(app, path, body):
    data = json.dumps(body).encode()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(data)), "wsgi.input": io.BytesIO(data),
               "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    status = []
    b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
    return int(status[0][:3])


def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_metrics_and_memory_stay_flat_from_5000_to_10000_requests_for_made_up_names(tmp_path, iris_classifier,
                                                                                    make_app):
    """Unknown names, versions, labels and methods are all counted under one label value, never as new series:
    after a warm-up, /metrics does not grow from 5,000 requests to 10,000 (a series per made-up name would add
    about 100 bytes a request), nor does the process (a leak of 200 bytes a request would show)."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    application = make_app(store=tmp_path, poll_interval=0)
    rng = random.Random(5)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))  # noqa: E731
    tensor = [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}]
    requests_ = [
        lambda: (f"/models/{word()}/predict", {"instances": ROWS}),
        lambda: (f"/models/iris/versions/{rng.randrange(2, 10**9)}/predict", {"instances": ROWS}),
        lambda: (f"/models/iris/labels/{word()}/predict", {"instances": ROWS}),
        lambda: ("/models/iris/predict", {"instances": ROWS, "method": word()}),
        lambda: ("/v2/models/iris/infer", {"inputs": tensor, "outputs": [{"name": word()} for _ in range(3)]}),
        lambda: (f"/v1/models/{word()}:predict", {"instances": ROWS}),
        lambda: ("/models/iris/predict", {"instances": ROWS}),
    ]

    def send(count):
        for _ in range(count):
            path, body = rng.choice(requests_)()
            assert wsgi_post(application, path, body) in (200, 400, 404)

    def metrics_bytes():
        return len(webtest.TestApp(application).get("/metrics").body)

    send(1_000)                     # every kind of request has been seen: its series exist
    rss_before, sizes = rss_kib(), [metrics_bytes()]
    for _ in range(2):
        send(5_000)
        sizes.append(metrics_bytes())
    assert sizes[2] - sizes[1] < 1024 and sizes[1] - sizes[0] < 1024, sizes      # counters gain digits, no more
    assert rss_kib() - rss_before < 2 * 1024, "the process grew by more than 2 MiB over 10,000 requests"
    text = webtest.TestApp(application).get("/metrics").text
    models = {line.split('model="')[1].split('"')[0] for line in text.splitlines() if 'model="' in line}
    assert models == {"iris", service.UNRESOLVED}
