"""Tracing: OpenTelemetry spans when the OTEL_* variables ask for them, nothing (and no import) otherwise."""

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import service
from conftest import ROOT

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
    assert not service.Tracing.from_environment({"OTEL_TRACES_EXPORTER": "zipkin"}).enabled


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
