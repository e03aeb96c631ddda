"""Tracing: OpenTelemetry spans when the OTEL_* variables ask for them, nothing (and no import) otherwise."""

import json
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import service
from support import ROOT

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("environ, wanted", [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "OTLP"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
])
def test_traces_are_on_only_when_the_standard_variables_ask_for_them(environ, wanted):
    assert service.trace_exporter_wanted(environ) == wanted


def test_an_exporter_the_service_does_not_have_is_refused_by_name():
    with pytest.raises(ValueError, match="zipkin"):
        service.trace_exporter_wanted({"OTEL_TRACES_EXPORTER": "zipkin"})
    tracing = service.Tracing.from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert not tracing.enabled and "zipkin" in tracing.problem


def test_off_by_default_and_then_nothing_of_opentelemetry_is_imported():
    code = ("import sys, service; tracing = service.Tracing.from_environment({}); "
            "assert not tracing.enabled and tracing.span('x') is tracing.request('y', {}); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_request_span_continues_the_callers_trace_and_holds_its_children():
    exporter = InMemorySpanExporter()
    tracing = service.Tracing(exporter)
    headers = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "vendor=opaque"}
    with tracing.request("POST /models/{name}/predict", headers, model="iris") as server:
        with tracing.span("decode"):
            pass
        header = service.traceparent(server)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request, decode = spans["POST /models/{name}/predict"], spans["decode"]
    assert request.kind == SpanKind.SERVER and request.attributes["model"] == "iris"
    assert f"{request.context.trace_id:032x}" == PARENT_TRACE and f"{request.parent.span_id:016x}" == PARENT_SPAN
    assert request.context.trace_state.get("vendor") == "opaque"
    assert decode.parent.span_id == request.context.span_id and decode.context.trace_id == request.context.trace_id
    assert header == f"00-{PARENT_TRACE}-{request.context.span_id:016x}-01"


def test_without_a_caller_a_request_starts_a_trace_of_its_own():
    exporter = InMemorySpanExporter()
    tracing = service.Tracing(exporter)
    with tracing.request("GET /healthz", {"traceparent": "not a traceparent"}):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.context.trace_id != 0


# -- the request path, traced ---------------------------------------------------------------------------------

import io  # noqa: E402
import logging  # noqa: E402

import requests  # noqa: E402
import webtest  # noqa: E402

from support import ROWS, LiveServer, collector, exported_spans, free_port, wait_until, write_artifact  # noqa: E402

CALLER = {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"}


@pytest.fixture
def traced(tmp_path, iris_classifier):
    """(a WebTest client of an app whose spans go to an in-memory exporter, the exporter)."""
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    exporter = InMemorySpanExporter()
    config = service.Config(store=str(tmp_path), poll_interval=0)
    app = service.create_app(config=config, registry=service.ModelRegistry(config, tracing=service.Tracing(exporter)))
    try:
        yield webtest.TestApp(app), exporter
    finally:
        app.registry.stop_watching()


def by_name(exporter):
    return {span.name: span for span in exporter.get_finished_spans()}


def test_a_prediction_is_one_server_span_with_its_stages_as_children(traced, iris_classifier):
    client, exporter = traced
    answer = client.post_json("/models/iris/predict", {"instances": ROWS, "method": "predict_proba"}, headers=CALLER)
    spans = by_name(exporter)
    server = spans["POST /models/{name}/predict"]
    assert f"{server.context.trace_id:032x}" == PARENT_TRACE and f"{server.parent.span_id:016x}" == PARENT_SPAN
    assert answer.headers["traceparent"] == service.traceparent(server)
    assert {key: server.attributes[key] for key in ("model", "version", "protocol", "method", "rows",
                                                     "http.response.status_code", "http.route")} == {
        "model": "iris", "version": "1", "protocol": "native", "method": "predict_proba", "rows": 3,
        "http.response.status_code": 200, "http.route": "/models/{name}/predict"}
    for stage in ("read", "decode", "predict", "encode"):
        assert spans[stage].parent.span_id == server.context.span_id, stage
    assert spans["predict"].attributes["predictor"] in (service.NATIVE, service.SKLEARN)
    assert spans["predict"].attributes["method"] == "predict_proba"


def test_every_protocol_names_itself_on_its_span_and_refusals_keep_their_status(traced):
    client, exporter = traced
    client.post_json("/v2/models/iris/infer", {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                                           "data": ROWS[0]}]})
    client.post_json("/v1/models/iris:predict", {"instances": ROWS})
    client.post_json("/models/nosuch/predict", {"instances": ROWS}, expect_errors=True)
    spans = by_name(exporter)
    assert spans["POST /v2/models/{name}/infer"].attributes["protocol"] == "v2"
    assert spans["POST /v1/models/{name}:predict"].attributes["protocol"] == "tf"
    refused = [span for span in exporter.get_finished_spans()
               if span.attributes.get("http.response.status_code") == 404]
    assert refused and refused[0].status.is_ok


def test_a_batched_request_has_a_batch_span_around_its_call(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    exporter = InMemorySpanExporter()
    config = service.Config(store=str(tmp_path), poll_interval=0, max_batch_size=8)
    app = service.create_app(config=config, registry=service.ModelRegistry(config, tracing=service.Tracing(exporter)))
    try:
        webtest.TestApp(app).post_json("/models/iris/predict", {"instances": ROWS})
    finally:
        app.registry.stop_watching()
    spans = by_name(exporter)
    assert spans["batch"].attributes["batch_size"] == 1
    assert spans["predict"].parent.span_id == spans["batch"].context.span_id


def test_json_log_lines_written_during_a_request_carry_its_trace_id(traced):
    client, exporter = traced
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(service.JsonLogFormatter())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        client.post_json("/models/iris/predict", {"instances": ROWS}, headers=CALLER)   # loads iris: logged
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    loaded = [json.loads(line) for line in lines.getvalue().splitlines() if "loaded model" in line]
    assert loaded and loaded[0]["trace_id"] == PARENT_TRACE, lines.getvalue()


@pytest.mark.slow
def test_a_live_server_exports_its_spans_over_otlp_http_to_a_collector(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port = free_port()
    with collector() as received:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{received.server_address[1]}",
               "OTEL_SERVICE_NAME": "iris-service", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--log-format", "json"]
        with LiveServer(command, port, env=env) as live:
            answer = requests.post(live.base + "/models/iris/predict", json={"instances": ROWS}, headers=CALLER, timeout=30)
            assert answer.status_code == 200
            wait_until(lambda: any(span.name == "POST /models/{name}/predict" for _, span in exported_spans(received)),
                       timeout=30, what="the request's span at the collector")
        spans = exported_spans(received)
    assert all(path == "/v1/traces" for path, _ in received.received)
    resource, server = next((r, s) for r, s in spans if s.name == "POST /models/{name}/predict")
    names = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert names["service.name"] == "iris-service"
    assert server.trace_id.hex() == PARENT_TRACE and server.parent_span_id.hex() == PARENT_SPAN
    assert answer.headers["traceparent"] == f"00-{PARENT_TRACE}-{server.span_id.hex()}-01"
    children = {s.name for _, s in spans if s.parent_span_id == server.span_id}
    assert {"read", "decode", "predict", "encode"} <= children
    logged = [json.loads(line) for line in live.output().splitlines() if line.startswith("{")]
    assert any(line.get("trace_id") == PARENT_TRACE for line in logged), live.output()


@pytest.mark.parametrize("environ, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "pip install '.[otel]'"),
])
def test_asked_for_traces_it_cannot_export_the_command_exits_2_with_one_line(tmp_path, environ, message):
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; import service; "     # as if the SDK were missing
            f"sys.exit(service.main(['--store', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**__import__('os').environ, **environ})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
