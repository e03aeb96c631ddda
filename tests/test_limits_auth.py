"""Bearer tokens for predictions (--auth-tokens), the bound on predictions at once (--max-inflight) and on
the request target (--max-url-bytes)."""

import concurrent.futures
import logging
import threading
import time

import pytest
import webtest

import service
from doubles import SlowModel
from support import ROW, wait_until, write_artifact

TOKEN, OTHER, ADMIN = "prediction-token-0123456789", "second-token-abcdefghijkl", "admin-token-zyxwvutsrqpo"


@pytest.fixture
def store(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    return tmp_path


@pytest.fixture
def make(store, make_client):
    """make(**options) -> a WebTest client over the iris store, without rescans, iris the default model."""
    return lambda **options: make_client(store, poll_interval=0, default_model="iris", **options)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


PROTECTED = [("get", "/models"), ("get", "/models/iris"), ("post", "/models/iris/predict"),
             ("post", "/predict"), ("get", "/v1/models/iris"), ("post", "/v1/models/iris:predict"),
             ("post", "/v2/models/iris/infer"), ("post", "/invocations"), ("get", "/metrics"),
             ("get", "/openapi.json"), ("get", "/v2/models/iris")]
OPEN = ["/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/ping", "/health"]


@pytest.mark.parametrize("method, path", PROTECTED)
def test_with_tokens_every_model_route_needs_one(make, method, path):
    app = make(auth_tokens=(TOKEN, OTHER))
    for headers in ({}, bearer("wrong-token-000000000000"), bearer(TOKEN[:-1]), {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        answer = getattr(app, method)(path, headers=headers, status=401)
        assert answer.json["code"] == "unauthorized" and answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_a_valid_token_of_the_list_is_let_through(make):
    app = make(auth_tokens=(TOKEN, OTHER))
    for token in (TOKEN, OTHER):
        assert app.post_json("/models/iris/predict", {"instances": ROW}, headers=bearer(token)).json["version"] == "1"
    assert app.get("/models", headers=bearer(OTHER)).status_int == 200


@pytest.mark.parametrize("path", OPEN)
def test_health_and_readiness_stay_open(make, path):
    assert make(auth_tokens=(TOKEN,)).get(path).status_int == 200


def test_admin_routes_take_the_admin_token_not_a_prediction_token(make):
    app = make(auth_tokens=(TOKEN,), admin_token=ADMIN)
    app.post("/admin/rescan", headers=bearer(TOKEN), status=401)
    assert app.post("/admin/rescan", headers=bearer(ADMIN)).json == {"models": ["iris"]}


def test_tokens_come_from_a_file_and_never_reach_a_log_or_the_config_repr(tmp_path, store, caplog, make_app):
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"# prediction clients\n{TOKEN}\n\n{OTHER}\n")
    config = service.Config.load({"auth_tokens": f"@{token_file}", "store": str(store)}, environ={})
    assert config.auth_tokens == (TOKEN, OTHER) and TOKEN not in repr(config)
    caplog.set_level(logging.DEBUG)
    app = webtest.TestApp(make_app(config=config))
    app.post_json("/models/iris/predict", {"instances": ROW}, headers=bearer(TOKEN))
    app.post_json("/models/iris/predict", {"instances": ROW}, headers=bearer(OTHER + "x"), status=401)
    assert TOKEN not in caplog.text and OTHER not in caplog.text


@pytest.mark.parametrize("value, fragment", [("short", "at least 16"), ("a b c d e f g h i j", "at least 16"),
                                             ("@/no/such/file", "cannot read the token file")])
def test_weak_or_unreadable_tokens_are_refused_at_start(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        service.Config.load({"auth_tokens": value}, environ={})


def test_a_request_target_over_the_limit_is_414(make):
    app = make(max_url_bytes=200)
    answer = app.get("/models/iris/predict?instances=" + "[" * 300, status=414)
    assert answer.json["code"] == "uri_too_long" and "--max-url-bytes" in answer.json["error"]
    assert app.get("/models/iris/predict?instances=[[5.1,3.5,1.4,0.2]]").status_int == 200


def test_beyond_max_inflight_predictions_answer_503_at_once_and_recover(tmp_path, make_client):
    write_artifact(tmp_path / "slow.pkl", SlowModel(0.5), "pickle")
    app = make_client(tmp_path, poll_interval=0, max_inflight=2)
    app.post_json("/models/slow/predict", {"instances": ROW})          # loaded
    start = threading.Barrier(6)

    def call(_):
        start.wait()
        began = time.perf_counter()
        answer = app.post_json("/models/slow/predict", {"instances": ROW}, expect_errors=True)
        return answer, time.perf_counter() - began
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    answered = [a for a, _ in results if a.status_int == 200]
    refused = [(a, t) for a, t in results if a.status_int == 503]
    assert len(answered) == 2 and len(refused) == 4
    for answer, elapsed in refused:
        assert answer.headers["Retry-After"] == "1" and "--max-inflight" in answer.json["error"]
        assert elapsed < 0.4, "refused at once, not after waiting"
    assert app.post_json("/models/slow/predict", {"instances": ROW}).status_int == 200, "recovers when load drops"


def test_a_prediction_over_the_time_limit_is_504_and_its_work_stays_counted_until_it_ends(tmp_path,
                                                                                         iris_classifier, make_app):
    """--max-predict-seconds: the caller gets 504 at the limit; the computation (a thread cannot be stopped)
    finishes in the background and keeps its --max-inflight slot until then, so abandoned work cannot pile up."""
    write_artifact(tmp_path / "slow.pkl", SlowModel(1.0), "pickle")
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    application = make_app(store=tmp_path, poll_interval=0, max_predict_seconds=0.2, max_inflight=1)
    app = webtest.TestApp(application)
    application.registry.refresh()      # a request waits as long for a load: 503 past it,
    application.registry.get("iris")    # so the models load first
    assert app.post_json("/models/iris/predict", {"instances": ROW}).json["predictions"] == \
        iris_classifier.predict(ROW).tolist(), "a prediction within the limit is answered as usual"
    application.registry.get("slow")                  # loading is not prediction time
    began = time.perf_counter()
    answer = app.post_json("/models/slow/predict", {"instances": ROW}, expect_errors=True)
    assert answer.status_int == 504 and answer.json["code"] == "prediction_timeout", answer.text
    assert "--max-predict-seconds" in answer.json["error"]
    assert 0.15 < time.perf_counter() - began < 0.9, "answered at the limit, not when the work ended"
    busy = app.post_json("/models/iris/predict", {"instances": ROW}, expect_errors=True)
    assert busy.status_int == 503 and "--max-inflight" in busy.json["error"], "the abandoned work holds its slot"
    wait_until(lambda: app.post_json("/models/iris/predict", {"instances": ROW}, expect_errors=True).status_int != 503,
               timeout=5, what="the slot to come back when the background work ended", interval=0.05)
    assert time.perf_counter() - began > 0.95
