"""Hardening suite: the items of the project's hardening checklist (its section 6, numbered below) that
other test files do not already cover, with real models, real servers on 127.0.0.1 and real clients.

    names in URLs never reach outside the store, on every protocol's routes, in-process and over waitress (2)
    a corpus of malformed bodies never yields a 500, on every protocol's predict route (6)
    every answer is strict, non-leaky JSON; a fault of the service is a bare 500 with an error id (8)
    16 threads at a one-microsecond switch interval get bit-identical answers to a sequential run (13)
    waitress, wsgiref and gunicorn answer the same requests alike (15, 16)
    overload gives 200 or 503 with Retry-After and recovers; slowloris clients starve nobody (17)
    kill -9 of a gunicorn worker fails at most its requests in flight; its successor serves the same version (19)

Covered elsewhere, not repeated here: untrusted pickles (test_trusted_loading), Host and CORS (test_cors),
limits and tokens (test_limits_auth, test_api), hot swaps, failed and half-written versions, single-flight loads
and graceful stops (test_reload, test_lifecycle*, test_loading), version skew (test_trusted_loading).
"""

import collections
import concurrent.futures
import contextlib
import functools
import http.client
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
import webtest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

import service

from doubles import FaultyLogisticRegression, SlowModel, SlowToLoad
from support import (ROOT, ROWS, Answer, LiveServer, free_port, gunicorn_command, http_call, service_app,
                     service_command, strict_json, wait_until, write_artifact)

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
JSON_HEADERS = {"Content-Type": "application/json"}


# -- transports: an Answer (status, {lower-case header: value}, body bytes), from support.http_call or a WSGI call ---

def wsgi_call(app, method, target, body=None, headers=None):
    """What support.http_call gives, through WebTest, with nothing added: no Content-Type unless given."""
    request = webtest.TestRequest.blank(target, method=method)
    if body is not None:
        request.body = body
    for name, value in (headers or {}).items():
        if name.lower() == "content-type":
            request.environ["CONTENT_TYPE"] = value
        else:
            request.headers[name] = value
    response = app.do_request(request, status=None, expect_errors=True)
    return Answer(response.status_int, {k.lower(): v for k, v in response.headerlist}, response.body)


# -- strict, non-leaky output --------------------------------------------------------------------------------------

LEAK_MARKERS = ("Traceback", 'File "', "<class", "<function", "<module", " object at 0x", "site-packages",
                ROOT, "/work/", "/srv/private", "0xdeadbeef")


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def check_answer(answer, secrets=(), target=None):
    """Strict JSON with its content type and nosniff; an error has the fixed shape and leaks nothing: no
    traceback, repr or path (the caller's own request path, echoed in a 404, is not a leak).  Returns the body."""
    assert answer.headers.get("content-type", "").split(";")[0] == "application/json", answer
    assert answer.headers.get("x-content-type-options") == "nosniff", answer
    body = strict_json(answer.body)
    if answer.status < 400:
        return body
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], answer
    assert isinstance(body.get("code"), str) and body["code"], answer
    echoes = []
    if target is not None:
        path = urllib.parse.unquote(target.split("?")[0], errors="ignore")
        echoes = [path, "/" + path.lstrip("/")]
    for text in strings_in(body):
        for echo in echoes:
            text = text.replace(echo, "")
        for marker in (*LEAK_MARKERS, *map(str, secrets)):
            assert marker not in text, f"{marker!r} leaked in {answer}"
    if answer.status >= 500 and body.get("code") == "internal_error":
        mlflow = {"error_code", "message"} if "error_code" in body else set()      # MLflow's own fields
        assert set(body) == {"error", "code", "error_id"} | mlflow and body["error"] == "internal server error", body
        assert not mlflow or (body["error_code"] == "INTERNAL_ERROR" and body["message"] == body["error"]), body
    return body


# -- 1. names in URLs never reach outside the store ----------------------------------------------------------------

SENTINEL = "outside-secret"
LOOK_ALIKES = ["model..1", "a.b-c_d"]       # valid names (service.valid_model_name) that look like traversal
TRAVERSALS = [
    "..", "%2e%2e", "%2E%2E", ".%FF.", "%C0%AE%C0%AE", "%252e%252e", "%2F", "..%2F..%2Fetc%2Fpasswd",
    "..%2Foutside%2Fsecret", "%5C..%5C", "..%5C..%5Coutside%5Csecret", "%2Fetc%2Fpasswd", "{absolute}",
    "secret%00", "iris%00.joblib", "iris.", "iris%20", "%20iris", "iris.joblib", "a" * 1024, "evil",
    "evil%2Fsecret", "link", "secret", "outside", "-iris",
]
V2_BODY = json.dumps({"inputs": [{"name": "input-0", "shape": [len(ROWS), 4], "datatype": "FP64",
                                  "data": ROWS}]}).encode()
NATIVE_BODY = json.dumps({"instances": ROWS}).encode()
INSTANCES_QUERY = "?instances=" + urllib.parse.quote(json.dumps(ROWS))
# (method, target template, body, whether {} is the model's name: a look-alike name must be served there)
NAME_ROUTES = [
    ("POST", "/models/{}/predict", NATIVE_BODY, True),
    ("POST", "/models/{}/versions/1/predict", NATIVE_BODY, True),
    ("GET", "/models/{}/predict" + INSTANCES_QUERY, None, True),
    ("POST", "/v1/models/{}:predict", NATIVE_BODY, True),
    ("POST", "/v2/models/{}/infer", V2_BODY, True),
    ("POST", "/v2/models/{}/versions/1/infer", V2_BODY, True),
    ("GET", "/v2/models/{}", None, True),
    ("GET", "/models/{}", None, True),
    ("POST", "/models/iris/versions/{}/predict", NATIVE_BODY, False),     # the version slot
    ("GET", "/predict/{}", None, False),                                   # the seed route: the rest of the path
]
RAW_TARGETS = ["/models//etc/passwd/predict", "/models/../../outside/secret/predict", "/models/evil/../link/predict",
               "/models/./iris/../secret/predict", "/v2/models/../outside/secret/infer",
               "/predict/../../etc/passwd", "http://127.0.0.1/models/../predict"]

_watched, _opened, _hooked = [], [], []


def _audit(event, args):
    """Notes every open() of a watched path (installed once: audit hooks cannot be removed)."""
    if event == "open" and _watched and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if any(path.startswith(prefix) for prefix in _watched):
            _opened.append(path)


@contextlib.contextmanager
def opens_watched(*prefixes):
    """Collects the open() calls of paths under `prefixes` made inside the block, in this process."""
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked.append(True)
    _opened.clear()
    _watched[:] = [str(prefix) for prefix in prefixes]
    try:
        yield _opened
    finally:
        _watched.clear()


@pytest.fixture(scope="module")
def traversal_store(tmp_path_factory, iris_classifier):
    """tmp/store with iris and two look-alike names; a sentinel model outside it (tmp/outside/secret.joblib,
    tmp/outside/1/model.joblib, tmp/secret.joblib), reached from the store by outward symlinks."""
    base = tmp_path_factory.mktemp("traversal")
    sentinel = DummyClassifier(strategy="constant", constant=SENTINEL).fit(IRIS_X, [SENTINEL] * len(IRIS_X))
    outside = base / "outside"
    write_artifact(outside / "secret.joblib", sentinel, "joblib")
    write_artifact(outside / "1" / "model.joblib", sentinel, "joblib")
    write_artifact(base / "secret.joblib", sentinel, "joblib")
    root = base / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / "model..1.joblib", iris_classifier, "joblib")
    write_artifact(root / "a.b-c_d" / "1" / "model.json", iris_classifier, "json")
    os.symlink(outside, root / "evil")                          # a model folder leading out
    os.symlink(outside / "secret.joblib", root / "link.joblib")  # an artifact leading out
    return base


@pytest.fixture(scope="module")
def traversal_server(traversal_store):
    port = free_port()
    with LiveServer(service_command(traversal_store / "store", port, "--default-model", "iris", "--poll-interval",
                                    "0"), port):
        yield port


def traversal_cases(base):
    """(method, target, body, served) for every route and name, then raw targets with unencoded dot segments."""
    absolute = urllib.parse.quote(str(base / "outside" / "secret"), safe="")
    for method, template, body, names_model in NAME_ROUTES:
        for name in TRAVERSALS + LOOK_ALIKES:
            yield method, template.format(name.replace("{absolute}", absolute)), body, \
                names_model and name in LOOK_ALIKES
    for target in RAW_TARGETS:
        yield ("GET" if target.startswith("/predict/") else "POST"), target, NATIVE_BODY, False


def predictions_of(body):
    """The predictions in a native, TF or MLflow answer, or a V2 answer's first output."""
    if "outputs" in body:
        return body["outputs"][0]["data"]
    return body.get("predictions")


@pytest.mark.parametrize("transport", ["in-process", pytest.param("waitress", marks=pytest.mark.slow)])
def test_names_in_urls_never_reach_outside_the_store_on_any_route(request, transport, traversal_store,
                                                                    iris_classifier, make_app):
    """Every traversal, encoding trick, absolute path and outward symlink, on every protocol's model routes:
    400/404 strict JSON, never the outside model's answer, and in-process nothing outside the store is even
    opened; valid look-alike names (model..1, a.b-c_d) are still served."""
    if transport == "waitress":
        call = functools.partial(http_call, request.getfixturevalue("traversal_server"))
    else:
        application = make_app(store=traversal_store / "store", poll_interval=0, default_model="iris")
        call = functools.partial(wsgi_call, webtest.TestApp(application))
    expected = iris_classifier.predict(np.array(ROWS)).tolist()
    wrong = []
    outside = [traversal_store / "outside", traversal_store / "secret.joblib", traversal_store / "store" / "evil",
               traversal_store / "store" / "link.joblib"]
    inside = os.path.realpath(traversal_store / "store" / "model..1.joblib")    # shows the watch works
    with opens_watched(inside, *outside, *map(os.path.realpath, outside)) as opened:
        for method, target, body, served in traversal_cases(traversal_store):
            answer = call(method, target, body, JSON_HEADERS if body else None)
            if SENTINEL.encode() in answer.body:
                wrong.append((target, "answered by the model outside the store", answer))
                continue
            try:
                result = check_answer(answer, secrets=[traversal_store], target=target)
            except (AssertionError, ValueError) as error:
                wrong.append((target, f"not strict, clean JSON: {error}", answer))
                continue
            if served:
                predicts = "/predict" in target or target.endswith("infer")
                if answer.status != 200 or (predicts and predictions_of(result) != expected):
                    wrong.append((target, "a valid look-alike name is not served", answer))
            elif answer.status not in (400, 404):
                wrong.append((target, "neither 400 nor 404", answer))
        listed = strict_json(call("GET", "/models", None, None).body)
    assert not wrong, "\n".join(map(repr, wrong[:20]))
    assert sorted(model["name"] for model in listed["models"]) == ["a.b-c_d", "iris", "model..1"]
    if transport == "in-process":
        assert inside in opened, "the open() watch saw the look-alike model load"
        assert set(opened) == {inside}, f"opened outside the store: {opened}"


# -- 2, 3. malformed bodies never yield a 500; every answer is strict, clean JSON --------------------------------

PREDICT_ROUTES = {"native": "/models/hgb/predict", "tf": "/v1/models/hgb:predict", "v2": "/v2/models/hgb/infer",
                  "mlflow": "/invocations"}
OK, REFUSED, EITHER = {200}, {400, 413, 415}, {200, 400}
CORPUS_LIMIT = 200_000         # --max-body-bytes of the corpus app: a 50,000-deep body (100 kB) is parsed


def wrap(protocol, rows):
    """A predict body carrying `rows` (JSON text) in the protocol's own envelope."""
    if protocol == "v2":
        return ('{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": %s}]}' % rows).encode()
    return ('{"instances": %s}' % rows).encode()


GOOD_ROWS = json.dumps(ROWS[:1])
DEEP = "[" * 50_000 + "]" * 50_000


def case(case_id, body, expect, headers=JSON_HEADERS, only=None, **per_protocol):
    """A corpus entry: `body` is bytes or f(protocol) -> bytes; `expect` the statuses allowed, overridden per
    protocol by keyword; `only` restricts it to some protocols."""
    return {"id": case_id, "body": body, "expect": expect, "headers": headers, "only": only, "per": per_protocol}


def good(protocol):
    return wrap(protocol, GOOD_ROWS)


CORPUS = [
    # not JSON at all, or not JSON as the service reads it
    case("empty", b"", REFUSED),
    case("whitespace", b" \r\n\t ", REFUSED),
    case("truncated", lambda p: good(p)[:-9], REFUSED),
    case("invalid-utf8", lambda p: good(p)[:-1] + b', "note": "\xff\xfe"}', REFUSED),
    case("overlong-utf8-dots", b'{"instances": "\xc0\xae\xc0\xae"}', REFUSED),
    case("utf16", lambda p: good(p).decode().encode("utf-16"), REFUSED),
    case("nul-bytes", b"\x00" * 64, REFUSED),
    case("nested-50000-arrays", DEEP.encode(), REFUSED),
    case("nested-50000-objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, REFUSED),
    case("nested-50000-in-rows", lambda p: wrap(p, DEEP), REFUSED),
    case("unclosed-50000", b"[" * 50_000, REFUSED),
    case("trailing-garbage", lambda p: good(p) + b"}}", REFUSED),
    case("single-quotes", lambda p: good(p).replace(b'"', b"'"), REFUSED),
    case("comment", lambda p: b"// rows\n" + good(p), REFUSED),
    case("double-bom", lambda p: b"\xef\xbb\xbf" * 2 + good(p), REFUSED),
    case("json-null", b"null", REFUSED),
    case("json-string", b'"instances"', REFUSED),
    case("json-number", b"42", REFUSED),
    case("json-true", b"true", REFUSED),
    case("empty-array", b"[]", REFUSED),
    case("empty-object", b"{}", REFUSED),
    case("over-the-limit", lambda p: b" " * (CORPUS_LIMIT + 1) + good(p), {413}),
    # the right envelope, wrong rows
    case("rows-null", lambda p: wrap(p, "null"), REFUSED),
    case("rows-object", lambda p: wrap(p, '{"a": 1}'), REFUSED),
    case("rows-objects-of-unknown-names", lambda p: wrap(p, '[{"a": 1, "b": 2, "c": 3, "d": 4}]'), REFUSED),
    case("rows-too-narrow", lambda p: wrap(p, "[[5.1, 3.5, 1.4]]"), REFUSED),
    case("rows-ragged", lambda p: wrap(p, "[[5.1, 3.5, 1.4, 0.2], [1, 2]]"), REFUSED),
    case("rows-flat", lambda p: wrap(p, "[5.1, 3.5, 1.4, 0.2]"), REFUSED, v2=OK),     # V2 data may be flat
    case("rows-nested", lambda p: wrap(p, "[[[5.1], [3.5], [1.4], [0.2]]]"), REFUSED, v2=EITHER),
    case("rows-empty", lambda p: wrap(p, "[]"), REFUSED),
    case("rows-text", lambda p: wrap(p, '[["a", "b", "c", "d"]]'), REFUSED),
    # strict JSON, the same in every protocol (README, "Inputs"): numbers are JSON numbers, null is missing
    case("rows-strings-for-numbers", lambda p: wrap(p, '[["5.1", "3.5", "1.4", "0.2"]]'), REFUSED),
    case("rows-one-string-for-a-number", lambda p: wrap(p, '[[5.1, " 3.5", 1.4, 0.2]]'), REFUSED),
    case("rows-string-nan", lambda p: wrap(p, '[["NaN", 3.5, 1.4, 0.2]]'), REFUSED),
    case("rows-booleans", lambda p: wrap(p, "[[true, false, true, false]]"), REFUSED),
    case("rows-bare-nan", lambda p: wrap(p, "[[NaN, 3.5, 1.4, 0.2]]"), REFUSED),
    case("rows-1e400", lambda p: wrap(p, "[[1e400, 3.5, 1.4, 0.2]]"), REFUSED),
    case("rows-infinity", lambda p: wrap(p, "[[-Infinity, 3.5, 1.4, 0.2]]"), REFUSED),
    case("rows-huge-int", lambda p: wrap(p, "[[%d, 3.5, 1.4, 0.2]]" % 10 ** 400), REFUSED),
    case("rows-5000-digit-int", lambda p: wrap(p, "[[%s, 3.5, 1.4, 0.2]]" % ("9" * 5000)), REFUSED),
    case("rows-deeper-than-max-depth", lambda p: wrap(p, "[" * 100 + "]" * 100), REFUSED),
    # inputs README accepts: null cells, a byte-order mark; a member named twice is ambiguous: refused
    case("rows-null-cell", lambda p: wrap(p, "[[null, 3.5, 1.4, 0.2]]"), OK),
    case("rows-negative-zero", lambda p: wrap(p, "[[-0.0, 3.5, 1.4, 0.2]]"), OK),
    case("byte-order-mark", lambda p: b"\xef\xbb\xbf" + good(p), OK),
    case("duplicate-keys", lambda p: good(p).replace(b"{", b'{"%s": "x", ' % (b"inputs" if p == "v2" else
                                                                             b"instances"), 1), REFUSED),
    # Content-Type: only JSON on JSON routes whatever the type says; MLflow takes JSON or CSV only
    case("no-content-type", good, OK, headers={}, mlflow={415}),
    case("text-plain", good, OK, headers={"Content-Type": "text/plain"}, mlflow={415}),
    case("form-urlencoded", good, OK, headers={"Content-Type": "application/x-www-form-urlencoded"}, mlflow={415}),
    case("octet-stream", good, OK, headers={"Content-Type": "application/octet-stream"}, mlflow={415}),
    case("text-csv-holding-json", good, OK, headers={"Content-Type": "text/csv"}, mlflow=REFUSED),
    case("json-upper-case", good, OK, headers={"Content-Type": "APPLICATION/JSON"}),
    case("json-charset-utf8", good, OK, headers={"Content-Type": "application/json; charset=utf-8"}),
    case("json-charset-latin1", good, {415}, headers={"Content-Type": "application/json; charset=latin-1"}),
    case("multipart", good, {415}, headers={"Content-Type": "multipart/form-data; boundary=x"}),
    case("content-encoding-gzip", good, {415}, headers={**JSON_HEADERS, "Content-Encoding": "gzip"}),
    # each protocol's own envelope, wrong
    case("tf-signature-not-a-string", b'{"signature_name": 5, "instances": %s}' % GOOD_ROWS.encode(), REFUSED,
         only={"tf"}),
    case("tf-signature-dunder", b'{"signature_name": "__class__", "instances": %s}' % GOOD_ROWS.encode(),
         REFUSED, only={"tf"}),
    case("v2-shape-negative", good("v2").replace(b"[1, 4]", b"[-1, 4]"), REFUSED, only={"v2"}),
    case("v2-shape-huge", good("v2").replace(b"[1, 4]", b"[1000000000000, 4]"), REFUSED, only={"v2"}),
    case("v2-shape-not-numbers", good("v2").replace(b"[1, 4]", b'["1", 4]'), REFUSED, only={"v2"}),
    case("v2-datatype-unknown", good("v2").replace(b"FP64", b"FP128"), REFUSED, only={"v2"}),
    case("v2-binary-size-too-large", good("v2").replace(b'"data"', b'"parameters": {"binary_data_size": '
                                                                   b'1000000000}, "data"'), REFUSED, only={"v2"}),
    case("v2-inference-header-not-a-number", good("v2"), REFUSED, only={"v2"},
         headers={**JSON_HEADERS, "Inference-Header-Content-Length": "abc"}),
    case("v2-inference-header-past-the-body", good("v2"), REFUSED, only={"v2"},
         headers={**JSON_HEADERS, "Inference-Header-Content-Length": "999999"}),
    case("v2-output-dunder", good("v2")[:-1] + b', "outputs": [{"name": "__class__"}]}', REFUSED, only={"v2"}),
    case("v2-id-object", good("v2")[:-1] + b', "id": {"a": [1]}}', EITHER, only={"v2"}),
    case("v2-id-nan", good("v2")[:-1] + b', "id": NaN}', REFUSED, only={"v2"}),
    case("v2-id-lone-surrogate", good("v2")[:-1] + b', "id": "\\ud800"}', EITHER, only={"v2"}),
    case("mlflow-split-columns-not-a-list",
         b'{"dataframe_split": {"columns": "abcd", "data": %s}}' % GOOD_ROWS.encode(), REFUSED, only={"mlflow"}),
    case("mlflow-records-not-objects", b'{"dataframe_records": [1, 2]}', REFUSED, only={"mlflow"}),
    case("mlflow-two-formats", b'{"instances": %s, "inputs": %s}' % (GOOD_ROWS.encode(), GOOD_ROWS.encode()),
         REFUSED, only={"mlflow"}),
    case("mlflow-csv-ragged", b"a,b,c,d\n1,2\n", REFUSED, headers={"Content-Type": "text/csv"}, only={"mlflow"}),
    case("mlflow-csv-invalid-utf8", b"a,b,c,d\n\xff,2,3,4\n", REFUSED, headers={"Content-Type": "text/csv"},
         only={"mlflow"}),
]

CORPUS_PARAMS = [pytest.param(protocol, entry, id=f"{protocol}-{entry['id']}")
                 for entry in CORPUS for protocol in PREDICT_ROUTES
                 if entry["only"] is None or protocol in entry["only"]]


@pytest.fixture(scope="module")
def corpus_store(tmp_path_factory):
    """One model that takes NaN (HistGradientBoosting), so documented NaN input can be answered."""
    root = tmp_path_factory.mktemp("corpus")
    write_artifact(root / "hgb.joblib", HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(
        IRIS_X, IRIS_Y), "joblib")
    return root


@pytest.fixture(scope="module")
def corpus_app(corpus_store):
    with service_app(store=corpus_store, poll_interval=0, default_model="hgb",
                     max_body_bytes=CORPUS_LIMIT) as application:
        yield webtest.TestApp(application)


@pytest.mark.parametrize("protocol, entry", CORPUS_PARAMS)
def test_malformed_bodies_never_yield_a_server_error(corpus_app, corpus_store, protocol, entry):
    """Each body on each protocol's predict route: only 2xx/400/413/415, as the entry expects; strict JSON
    with nosniff; errors in the fixed shape (MLflow's error_code and message too) without leaks."""
    body = entry["body"](protocol) if callable(entry["body"]) else entry["body"]
    target = PREDICT_ROUTES[protocol]
    answer = wsgi_call(corpus_app, "POST", target, body, entry["headers"])
    assert answer.status in entry["per"].get(protocol, entry["expect"]), answer
    result = check_answer(answer, secrets=[corpus_store], target=target)
    if answer.status == 200:
        assert len(predictions_of(result)) == 1, result
    elif protocol == "mlflow":
        assert result["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") and \
            result["message"] == result["error"], result


FAULT_REQUESTS = [("POST", "/models/faulty/predict", NATIVE_BODY),
                  ("GET", "/models/faulty/predict" + INSTANCES_QUERY, None),
                  ("POST", "/models/faulty/versions/1/predict", NATIVE_BODY),
                  ("POST", "/v1/models/faulty:predict", NATIVE_BODY),
                  ("POST", "/v2/models/faulty/infer", V2_BODY),
                  ("POST", "/invocations", NATIVE_BODY),
                  ("POST", "/predict", NATIVE_BODY),
                  ("GET", "/predict/" + urllib.parse.quote(json.dumps(ROWS)), None)]


@pytest.mark.parametrize("batch", [1, 8], ids=["unbatched", "batched"])
def test_a_fault_inside_the_service_is_a_bare_500_with_an_error_id(tmp_path, caplog, make_app, batch):
    """A real estimator whose predict raises RuntimeError (a fault of ours, not the caller's): on every
    protocol a 500 holding only error, code and error_id (and MLflow's error_code and message on its route),
    nothing of the exception; the id is in the log."""
    model = FaultyLogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    write_artifact(tmp_path / "faulty.pkl", model, "pickle")
    app = webtest.TestApp(make_app(store=tmp_path, poll_interval=0, default_model="faulty", max_batch_size=batch))
    for method, target, body in FAULT_REQUESTS:
        answer = wsgi_call(app, method, target, body, JSON_HEADERS if body else None)
        assert answer.status == 500, (target, answer)
        result = check_answer(answer, secrets=[tmp_path], target=target)
        assert result["code"] == "internal_error" and len(result["error_id"]) == 12, result
        assert result["error_id"] in caplog.text
    assert "RuntimeError: internal detail" in caplog.text, "the traceback goes to the log, not to the client"


# -- 4. concurrency correctness -----------------------------------------------------------------------------------

def concurrency_requests(seed=7, count=48):
    """Distinct requests (own rows each, so a crossed answer shows) over four models, methods and protocols."""
    rng = random.Random(seed)
    diabetes = load_diabetes().data
    models = {"iris": (IRIS_X, ["predict", "predict_proba", "decision_function"]),
              "flowers": (IRIS_X, ["predict", "predict_proba"]),
              "diabetes": (diabetes, ["predict"]),
              "hgb": (IRIS_X, ["predict", "predict_proba"])}
    requests_ = []
    for number in range(count):
        name = rng.choice(sorted(models))
        data, methods = models[name]
        start = rng.randrange(len(data) - 6)
        rows = data[start:start + rng.randint(1, 6)].tolist()
        method = rng.choice(methods)
        if number % 3 == 2:
            body = {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                                "data": rows}], "outputs": [{"name": method}]}
            target = f"/v2/models/{name}/infer"
        else:
            body, target = {"instances": rows, "method": method}, f"/models/{name}/predict"
        requests_.append((target, json.dumps(body).encode()))
    return requests_


def test_sixteen_threads_at_a_tiny_switch_interval_answer_bit_identically(tmp_path, iris_classifier,
                                                                          named_iris_classifier,
                                                                          diabetes_regressor, make_app):
    """16 threads, same and different models (first loads included), sys.setswitchinterval(1e-6): every
    answer byte for byte what a sequential run gave."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "flowers" / "1" / "model.pkl", named_iris_classifier, "pickle")
    write_artifact(tmp_path / "diabetes" / "1" / "model.json", diabetes_regressor, "json")
    write_artifact(tmp_path / "hgb.joblib", HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(
        IRIS_X, IRIS_Y), "joblib")
    requests_ = concurrency_requests()
    sequential, concurrent_ = (webtest.TestApp(make_app(store=tmp_path, poll_interval=0)) for _ in range(2))
    expected = {}
    for target, body in requests_:
        answer = wsgi_call(sequential, "POST", target, body, JSON_HEADERS)
        assert answer.status == 200, answer
        expected[target, body] = answer.body
    assert len(set(expected.values())) > len(requests_) * 0.9, "the requests' answers tell them apart"
    start = threading.Barrier(16)

    def client(number):
        mine = random.Random(number).sample(requests_, 24)
        start.wait(timeout=30)
        return [(key, wsgi_call(concurrent_, "POST", key[0], key[1], JSON_HEADERS)) for key in mine]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = [item for batch in pool.map(client, range(16)) for item in batch]
    finally:
        sys.setswitchinterval(previous)
    assert len(results) == 16 * 24
    differing = [(key[0], answer) for key, answer in results if answer.status != 200 or answer.body != expected[key]]
    assert not differing, differing[:5]


# -- 5. the same answers on waitress, wsgiref and gunicorn --------------------------------------------------------

HOST_LIMIT = 2000          # --max-body-bytes of the host matrix
GOOD_BODY = json.dumps({"instances": ROWS[:1]}).encode()
NO_ANSWER_AFTER = 4        # seconds a host may take to answer a table request


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, iris_classifier):
    """{host: port}: the same store and settings served by `python service.py` (waitress),
    `python service.py --server wsgiref` and `gunicorn service:app`, all configured from the environment."""
    pytest.importorskip("gunicorn")
    root = tmp_path_factory.mktemp("hosts")
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    environment = {"MODEL_SERVICE_STORE": str(root), "MODEL_SERVICE_MAX_BODY_BYTES": str(HOST_LIMIT),
                   "MODEL_SERVICE_DEFAULT_MODEL": "iris", "MODEL_SERVICE_POLL_INTERVAL": "0"}
    ports = {name: free_port() for name in ("waitress", "wsgiref", "gunicorn")}
    commands = {"waitress": [sys.executable, "service.py", "--port", str(ports["waitress"])],
                "wsgiref": [sys.executable, "service.py", "--port", str(ports["wsgiref"]), "--server", "wsgiref"],
                "gunicorn": gunicorn_command(ports["gunicorn"], "-w", "1", "-k", "sync")}
    with contextlib.ExitStack() as stack:
        for name, command in commands.items():
            stack.enter_context(LiveServer(command, ports[name], env=environment))
        for port in ports.values():         # models loaded before the table, on every host
            assert http_call(port, "POST", "/models/iris/predict", GOOD_BODY, JSON_HEADERS, timeout=60).status == 200
        yield ports


def chunks_of(body, size):
    return [body[start:start + size] for start in range(0, len(body), size)]


V2_GOOD = wrap("v2", GOOD_ROWS)
HOST_TABLE = [
    pytest.param("POST", "/models/iris/predict", {"body": GOOD_BODY}, id="good-predict"),
    pytest.param("POST", "/models/iris/predict", {"chunks": chunks_of(GOOD_BODY, 10)}, id="chunked-predict"),
    pytest.param("POST", "/v2/models/iris/infer", {"body": V2_GOOD}, id="good-v2-infer"),
    pytest.param("POST", "/invocations", {"body": GOOD_BODY}, id="good-mlflow"),
    pytest.param("POST", "/models/iris/predict", {}, id="no-content-length-no-body"),
    pytest.param("POST", "/models/iris/predict", {"body": b"[" * (HOST_LIMIT + 1)}, id="over-the-limit"),
    pytest.param("POST", "/models/iris/predict", {"chunks": chunks_of(b"[" * (HOST_LIMIT + 1000), 1000)},
                 id="over-the-limit-chunked"),
    pytest.param("POST", "/models/iris/predict", {"body": b"{bad json"}, id="malformed-json"),
    pytest.param("POST", "/models/caf%C3%A9/predict", {"body": GOOD_BODY}, id="cafe-utf8-name"),
    pytest.param("POST", "/models/%FF/predict", {"body": GOOD_BODY}, id="invalid-utf8-name"),
    pytest.param("POST", "/models/.%FF./predict", {"body": GOOD_BODY}, id="invalid-utf8-dots"),
    pytest.param("GET", "/predict/%E2%80%AE[[5.1,3.5,1.4,0.2]]", {}, id="bidi-override-in-seed-route"),
    pytest.param("GET", "/predict/[[5.1,3.5,1.4,0.2]]", {}, id="seed-route"),
    pytest.param("GET", "/predict/%5B%5B5.1%2C3.5%2C1.4%2C0.2%5D%5D", {}, id="seed-route-encoded"),
    pytest.param("POST", "//models/iris/predict", {"body": GOOD_BODY}, id="leading-double-slash"),
    pytest.param("POST", "/models//iris/predict", {"body": GOOD_BODY}, id="inner-double-slash"),
    pytest.param("POST", "/models/iris/predict/", {"body": GOOD_BODY}, id="trailing-slash"),
    pytest.param("GET", "/models/iris/predict?instances=[[5.1,3.5,1.4,0.2]]&instances=x", {}, id="repeated-query"),
    pytest.param("PUT", "/models/iris/predict", {"body": GOOD_BODY}, id="wrong-method"),
    pytest.param("GET", "/nowhere", {}, id="unknown-route"),
]


def outcome(port, method, target, request):
    """(status, body without error_id) of one request, or ("no answer", why) after NO_ANSWER_AFTER seconds."""
    headers = JSON_HEADERS if "body" in request or "chunks" in request else {}
    try:
        answer = http_call(port, method, target, headers=headers, timeout=NO_ANSWER_AFTER, **request)
    except (OSError, http.client.HTTPException) as error:
        return ("no answer", type(error).__name__)
    body = check_answer(answer, target=target)
    if isinstance(body, dict):
        body.pop("error_id", None)
    return answer.status, body


@pytest.mark.parametrize("method, target, request_", HOST_TABLE)
@pytest.mark.slow
def test_waitress_wsgiref_and_gunicorn_answer_alike(hosts, method, target, request_):
    """The same status and the same JSON body (ids aside) from every host; chunked bodies work everywhere or
    are refused alike (411)."""
    outcomes = {host: outcome(port, method, target, request_) for host, port in hosts.items()}
    assert len({json.dumps(outcome_, sort_keys=True) for outcome_ in outcomes.values()}) == 1, outcomes
    if "chunks" in request_:
        assert outcomes["waitress"][0] in (200, 411, 413), outcomes


# -- 6. overload and slow clients, over a real waitress -----------------------------------------------------------

@pytest.mark.slow
def test_overload_answers_200_or_503_with_retry_after_and_recovers_at_once(tmp_path):
    """--max-inflight 2 --threads 4 and a burst of 12 concurrent half-second predictions: only 200s (right
    answers) and 503s (Retry-After, JSON), at least one of each; a normal request right after is answered fast."""
    write_artifact(tmp_path / "slow.pkl", SlowModel(0.5), "pickle")
    port = free_port()
    expected = IRIS_Y[[0]].tolist()
    with LiveServer(service_command(tmp_path, port, "--max-inflight", "2", "--threads", "4"), port) as server:
        assert http_call(port, "POST", "/models/slow/predict", GOOD_BODY, JSON_HEADERS, timeout=30).status == 200
        start = threading.Barrier(12)

        def call(_):
            start.wait(timeout=10)
            return http_call(port, "POST", "/models/slow/predict", GOOD_BODY, JSON_HEADERS, timeout=20)
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(12)))
        burst = time.monotonic() - began
        began = time.monotonic()
        after = http_call(port, "POST", "/models/slow/predict", GOOD_BODY, JSON_HEADERS, timeout=10)
        recovery = time.monotonic() - began
    statuses = collections.Counter(answer.status for answer in answers)
    assert set(statuses) <= {200, 503} and statuses[200] >= 2 and statuses[503] >= 1, statuses
    for answer in answers:
        body = check_answer(answer, secrets=[tmp_path])
        if answer.status == 503:
            assert answer.headers.get("retry-after") == "1" and body["code"] == "model_unavailable", answer
        else:
            assert body["predictions"] == expected
    assert burst < 10, f"the burst took {burst:.1f} s"
    assert after.status == 200 and recovery < 3, (after, recovery)
    assert server.returncode == 0, server.output()


@pytest.mark.slow
def test_slowloris_connections_starve_no_client_and_the_server_stays_up(tmp_path, iris_classifier):
    """150 connections trickling a request (half stuck in the headers, half in the body) while a normal client
    asks: every answer comes within 2 s, the trickling connections stay held, the server exits cleanly."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port = free_port()
    expected = iris_classifier.predict(np.array(ROWS[:1])).tolist()
    latencies, held = [], 0
    with LiveServer(service_command(tmp_path, port), port) as server, contextlib.ExitStack() as sockets:
        assert http_call(port, "POST", "/models/iris/predict", GOOD_BODY, JSON_HEADERS, timeout=30).status == 200
        attackers = []
        for number in range(150):
            attacker = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            opening = b"POST /models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            if number % 2:      # headers done, a body that never finishes
                opening += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            attacker.sendall(opening)
            attackers.append(attacker)
        deadline, trickle = time.monotonic() + 4, 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= trickle:           # one more header line or body byte each half second
                for number, attacker in enumerate(attackers):
                    attacker.sendall(b" " if number % 2 else b"X-Slow: 1\r\n")
                trickle = time.monotonic() + 0.5
            began = time.monotonic()
            answer = http_call(port, "POST", "/models/iris/predict", GOOD_BODY, JSON_HEADERS, timeout=5)
            latencies.append(time.monotonic() - began)
            assert answer.status == 200 and check_answer(answer)["predictions"] == expected, answer
        for attacker in attackers:
            attacker.setblocking(False)
            try:
                held += attacker.recv(1) != b""          # b"": the server closed it
            except BlockingIOError:
                held += 1                                # still open, nothing answered: held
            except OSError:
                pass
    assert len(latencies) >= 10 and max(latencies) < 2, latencies
    assert held >= 140, f"only {held} of 150 trickling connections were held: the attack was not in force"
    assert server.returncode == 0, server.output()


@pytest.mark.slow
def test_a_client_that_stops_sending_is_cut_off_after_the_connection_timeout(tmp_path, iris_classifier):
    """README's promise: a connection that sends nothing more for --connection-timeout seconds (30 by default,
    2 here; waitress's channel_timeout, checked as often) is closed, whether it stopped in the request line or
    in the body."""
    assert service.Config().connection_timeout == 30, "README gives 30 s"
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port = free_port()
    with LiveServer(service_command(tmp_path, port, "--connection-timeout", "2"), port) as server, \
            contextlib.ExitStack() as sockets:
        stalled = []
        for opening in (b"POST /models/iris/pre", b"POST /models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"):
            client = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=60))
            client.sendall(opening)
            stalled.append(client)
        began = time.monotonic()
        for client in stalled:
            try:
                assert client.recv(1024) == b"", "closed without an answer"
            except ConnectionResetError:
                pass
        waited = time.monotonic() - began
    assert 1.9 <= waited <= 10, f"closed after {waited:.1f} s"
    assert server.returncode == 0, server.output()


# -- 7. kill -9 of a gunicorn worker under load -------------------------------------------------------------------

def child_pids(pid):
    """Live (not zombie) children of `pid`, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def assert_stops_within(server, shutdown_timeout):
    """SIGTERM `server`; it must exit within its --shutdown-timeout (and a margin), whatever still runs in it."""
    stopped = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=15)
    assert time.monotonic() - stopped < shutdown_timeout + 2, "exited within --shutdown-timeout (and a margin)"


@pytest.mark.slow
def test_sigterm_exits_within_the_shutdown_timeout_while_an_abandoned_prediction_runs(tmp_path):
    """A prediction past --max-predict-seconds goes on in the background; it must not keep the process alive."""
    write_artifact(tmp_path / "slow.pkl", SlowModel(30), "pickle")
    port = free_port()
    command = service_command(tmp_path, port, "--max-predict-seconds", "0.5", "--shutdown-timeout", "2",
                              "--poll-interval", "0")
    with LiveServer(command, port) as server:
        answers = []                    # a first load (scikit-learn's imports) may outlast the limit: 503 meanwhile

        def predicted():
            answers.append(http_call(port, "POST", "/models/slow/predict", json.dumps({"instances": ROWS}).encode(),
                                     JSON_HEADERS))
            return answers[-1].status != 503 or b"still loading" not in answers[-1].body
        wait_until(predicted, timeout=30, what="the model's load")
        assert answers[-1].status == 504, answers[-1]
        assert_stops_within(server, 2)


@pytest.mark.slow
def test_a_request_waiting_on_a_slow_load_is_answered_within_the_time_limit(tmp_path):
    """The old shutdown repro's request waited for a load that never ended (a forged JSON model spun): under
    --max-predict-seconds a request that waits on a load gets its 503 at the limit, and the load goes on."""
    model = LogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    write_artifact(tmp_path / "slow.pkl", SlowToLoad(model, 6), "pickle")
    with service_app(store=str(tmp_path), max_predict_seconds=0.5, poll_interval=0) as application:
        client = webtest.TestApp(application)
        began = time.monotonic()
        answers = [client.post_json("/models/slow/predict", {"instances": ROWS}, expect_errors=True)
                   for _ in range(2)]       # the request that starts the load, and one that finds it loading
        waited = time.monotonic() - began
        for answer in answers:
            assert answer.status_int == 503 and answer.headers["Retry-After"] == "1", answer
            assert "still loading" in answer.json["error"], answer.json
        assert waited < 2 * 0.5 + 2, f"answered after {waited:.1f} s"
        wait_until(lambda: client.post_json("/models/slow/predict", {"instances": ROWS},
                                            expect_errors=True).status_int == 200, timeout=30, what="the load")
        assert client.post_json("/models/slow/predict", {"instances": ROWS}).json["predictions"] == \
            model.predict(np.array(ROWS)).tolist()


@pytest.mark.slow
def test_a_load_that_never_ends_neither_holds_its_requests_nor_the_shutdown(tmp_path):
    """Issue 21's shutdown repro, whole: its request waited on a load that never ended, and so did SIGTERM.  Now
    each request waiting on that load gets its 503 within --max-predict-seconds (and a margin), whatever route
    made it wait (a prediction, any protocol's metadata, V2's repository load, gRPC's metadata, a reload whose
    new artifact loads forever: LOADING), the server goes on answering other models (the reloaded one with its
    previous artifact), and SIGTERM ends the process within --shutdown-timeout."""
    triton = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    model = LogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    write_artifact(tmp_path / "stuck.pkl", SlowToLoad(model, 3600), "pickle")
    write_artifact(tmp_path / "iris.pkl", model, "pickle")
    write_artifact(tmp_path / "swapped.pkl", model, "pickle")
    port, grpc_port, limit = free_port(), free_port(), 1.0
    command = service_command(tmp_path, port, "--max-predict-seconds", str(limit), "--shutdown-timeout", "2",
                              "--poll-interval", "0", "--preload", "iris,swapped", "--grpc-port", str(grpc_port),
                              "--admin-token", "admin-token-0123456789")
    body = json.dumps({"instances": ROWS}).encode()
    admin = {"Authorization": "Bearer admin-token-0123456789"}

    def grpc_metadata():
        try:
            triton.InferenceServerClient(f"127.0.0.1:{grpc_port}").get_model_metadata("stuck")
        except InferenceServerException as refusal:
            return refusal.status(), refusal.message().encode()
        return "OK", b""

    waiting = {                     # each route that waits on a load: (status, body) of one call
        "predict": lambda: http_call(port, "POST", "/models/stuck/predict", body, JSON_HEADERS)[::2],
        "V1 metadata": lambda: http_call(port, "GET", "/v1/models/stuck/metadata")[::2],
        "V2 metadata": lambda: http_call(port, "GET", "/v2/models/stuck")[::2],
        "V2 repository load": lambda: http_call(port, "POST", "/v2/repository/models/stuck/load", b"{}",
                                                {**JSON_HEADERS, **admin})[::2],
        "gRPC metadata": grpc_metadata}
    with LiveServer(command, port) as server:
        wait_until(lambda: http_call(port, "POST", "/models/iris/predict", body, JSON_HEADERS).status == 200,
                   what="iris to load")
        for route, call in [("predict", waiting["predict"])] + list(waiting.items()):   # the first starts the load
            began = time.monotonic()
            status, text = call()
            assert status in (503, "StatusCode.UNAVAILABLE"), (route, status, text)
            assert b"still loading" in text and b"--max-predict-seconds" in text, (route, text)
            assert time.monotonic() - began < limit + 3, f"{route}: answered at the limit, not when the load ends"
        write_artifact(tmp_path / "swapped.pkl", SlowToLoad(model, 3600), "pickle")
        began = time.monotonic()
        answer = http_call(port, "POST", "/models/swapped/reload", b"", admin)
        assert answer.status == 200 and json.loads(answer.body)["reload"] == {"1": "LOADING"}, answer
        assert time.monotonic() - began < limit + 3, "the reload answered when the load ended, not at the limit"
        for name in ("iris", "swapped"):
            answer = http_call(port, "POST", f"/models/{name}/predict", body, JSON_HEADERS)
            assert answer.status == 200 and json.loads(answer.body)["predictions"] == model.predict(ROWS).tolist()
        assert_stops_within(server, 2)


@pytest.mark.slow
def test_kill_9_of_a_gunicorn_worker_fails_at_most_its_requests_in_flight(tmp_path):
    """gunicorn, 2 gthread workers, 4 clients looping on 0.1 s predictions of version 2; one worker is killed
    with SIGKILL: at most 4 requests fail (one per client, those in flight), the master respawns the worker,
    the new worker alone (the other one stopped) serves version 2, then every request succeeds."""
    pytest.importorskip("gunicorn")
    for version in (1, 2):
        write_artifact(tmp_path / "slow" / str(version) / "model.pkl", SlowModel(0.1), "pickle")
    port = free_port()
    environment = {"MODEL_SERVICE_STORE": str(tmp_path), "MODEL_SERVICE_PRELOAD": "all",
                   "MODEL_SERVICE_POLL_INTERVAL": "0"}
    command = gunicorn_command(port, "-w", "2", "-k", "gthread", "--threads", "2")
    expected = IRIS_Y[[0]].tolist()
    clients, stop, results = 4, threading.Event(), collections.defaultdict(list)

    def predict():
        try:
            answer = http_call(port, "POST", "/models/slow/predict", GOOD_BODY,
                               {**JSON_HEADERS, "Connection": "close"}, timeout=30)
        except (OSError, http.client.HTTPException) as error:
            return type(error).__name__
        body = check_answer(answer)
        return (answer.status, body.get("version"), body.get("predictions") == expected)

    def client(number):
        while not stop.is_set():
            started = time.monotonic()
            result = predict()
            results[number].append((started, time.monotonic(), result))

    def successes(after=0.0):
        return min(sum(1 for started, _, result in results[n] if started > after and result == (200, "2", True))
                   for n in range(clients))
    with LiveServer(command, port, env=environment) as server:
        master = server.pid
        wait_until(lambda: len(child_pids(master)) == 2, 30, "two workers", interval=0.05)
        for _ in range(6):       # both workers up and loaded
            assert predict() == (200, "2", True)
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: successes() >= 3, 30, "load on both workers", interval=0.05)
            workers = child_pids(master)
            victim = workers[0]
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: len(child_pids(master)) == 2 and victim not in child_pids(master), 30, "a new worker",
                       interval=0.05)
            respawned_at = time.monotonic()
            wait_until(lambda: successes(after=respawned_at) >= 3, 30, "load after the respawn", interval=0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=35)
        survivor, = set(workers) - {victim}
        newcomer, = set(child_pids(master)) - {survivor}
        os.kill(survivor, signal.SIGSTOP)          # only the new worker accepts now
        try:
            alone = [predict() for _ in range(5)]
        finally:
            os.kill(survivor, signal.SIGCONT)
        after = [predict() for _ in range(10)]
    outcomes = [entry for n in range(clients) for entry in results[n]]
    failures = [(started - killed_at, ended - killed_at, result) for started, ended, result in outcomes
                if result != (200, "2", True)]
    assert len(failures) <= clients, f"(started, ended) relative to the kill, outcome: {failures}"
    assert all(started < 0 <= ended for started, ended, _ in failures), f"not in flight at the kill: {failures}"
    assert alone == [(200, "2", True)] * 5, f"the respawned worker {newcomer}: {alone}"
    assert after == [(200, "2", True)] * 10, after
    assert server.returncode == 0, server.output()
