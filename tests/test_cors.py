"""CORS (--cors-origins) and the Host allow-list (--allowed-hosts): preflights, headers on every answer
(errors included), refusals, and the defaults (no CORS, any Host)."""

import pytest

import service
from support import ROW, write_artifact


@pytest.fixture
def client(tmp_path, iris_classifier, make_client):
    """client(**options) -> a WebTest client over an iris store, without rescans."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    return lambda **options: make_client(tmp_path, poll_interval=0, **options)


def test_without_cors_origins_no_cors_header_is_sent_and_preflights_are_refused(client):
    app = client()
    answer = app.post_json("/models/iris/predict", {"instances": ROW}, headers={"Origin": "https://app.example"})
    assert "Access-Control-Allow-Origin" not in answer.headers
    refused = app.options("/models/iris/predict", headers={"Origin": "https://app.example",
                                                          "Access-Control-Request-Method": "POST"}, status=403)
    assert refused.json["code"] == "forbidden" and "--cors-origins" in refused.json["error"]


def test_an_allowed_origin_gets_a_preflight_and_headers_on_answers_and_errors(client):
    app = client(cors_origins=("https://app.example", "http://localhost:3000"))
    origin = {"Origin": "http://localhost:3000"}
    preflight = app.options("/models/iris/predict", headers={**origin, "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Headers": "content-type"},
                            status=204)
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert preflight.headers["Allow"] == "GET, POST, OPTIONS" and preflight.headers["Vary"] == "Origin"
    for response in (app.post_json("/models/iris/predict", {"instances": ROW}, headers=origin),
                     app.post_json("/models/iris/predict", {"instances": [[1]]}, headers=origin, status=400),
                     app.get("/no/such/route", headers=origin, status=404),
                     app.delete("/models", headers=origin, status=405)):
        assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000", response.status
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    other = app.get("/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    app.options("/models", headers={"Origin": "https://evil.example"}, status=403)


@pytest.mark.parametrize("origins", [("https://app.example",), ("*",)])
def test_every_answer_varies_by_origin_so_a_shared_cache_never_mixes_them(client, origins):
    """With CORS on, an answer depends on Origin whether or not this request's origin matched."""
    app = client(cors_origins=origins)
    for headers in ({}, {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}):
        for response in (app.get("/models", headers=headers),
                         app.post_json("/models/iris/predict", {"instances": ROW}, headers=headers),
                         app.get("/no/such/route", headers=headers, status=404)):
            assert response.headers.getall("Vary") == ["Origin"], (headers, response.status)
    assert "Vary" not in client().get("/models").headers, "no CORS, nothing varies"


def test_a_preflight_lists_only_the_methods_the_path_has(client):
    app = client(cors_origins=("*",))
    assert app.options("/models", headers={"Origin": "https://a.example"}).headers["Allow"] == "GET, OPTIONS"
    assert app.options("/admin/rescan", headers={"Origin": "https://a.example"}).headers["Allow"] == "POST, OPTIONS"
    app.options("/no/such/route", status=404)


def test_star_allows_any_origin_without_echoing_it(client):
    app = client(cors_origins=("*",))
    answer = app.get("/models", headers={"Origin": "https://anyone.example"})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("localhost:8080", True), ("127.0.0.1:80", True), ("[::1]:8080", True),
    ("LOCALHOST:8080", True), ("evil.example", False), ("evil.example:8080", False), ("localhost.evil.example", False),
    ("", False),
])
def test_allowed_hosts_refuses_other_host_headers(client, host, allowed):
    app = client(allowed_hosts=("localhost", "127.0.0.1", "::1"))
    answer = app.get("/models", headers={"Host": host}, expect_errors=True)
    if allowed:
        assert answer.status_int == 200
    else:
        assert answer.status_int == 400 and answer.json["code"] == "bad_request"
        assert "--allowed-hosts" in answer.json["error"]


def test_any_host_is_accepted_by_default(client):
    assert client().get("/models", headers={"Host": "models.internal:9000"}).status_int == 200


@pytest.mark.parametrize("flag, value, fragment", [
    ("--cors-origins", "app.example", "is not an origin"),
    ("--cors-origins", "https://app.example/path", "is not an origin"),
    ("--allowed-hosts", "evil host", "is not a host name"),
])
def test_bad_values_are_refused_at_start(flag, value, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        service.main(["--store", str(tmp_path), flag, value], serve=lambda app, config: None)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err
