"""Helpers the test modules share, imported `from support import ...` (conftest.py keeps the fixtures).

- example data: ROWS (and ROW, the first), DIABETES_ROWS, IRIS_FEATURES, the artifact formats' EXTENSIONS;
- models and stores: write_artifact, publish, write_settings, versioned_store;
- answers: strict_json, assert_error, metric_value, for WebTest and requests responses alike;
- waiting: wait_until (a bounded poll for a condition) and stays_true (a condition that must hold for a while),
  instead of sleeping and then asserting;
- in-process apps: service_app, the one way to build an app, which always stops its registry's watcher; a
  registry on a hand-moved clock (ManualClock, clocked_registry);
- live servers: LiveServer (a server process on a free loopback port, its output and exit code),
  service_command and gunicorn_command (what it runs), free_port, http_call (one raw HTTP request).

Server processes find the repository and this folder on PYTHONPATH, so they unpickle the test doubles of
tests/doubles.py as the tests do.
"""

import collections
import contextlib
import http.client
import http.server
import itertools
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import joblib
import pytest
import requests
from sklearn.datasets import load_diabetes

import service

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TIMEOUT = 30                         # seconds a request to a live server may take
EXTENSIONS = {"joblib": ".joblib", "pickle": ".pkl", "json": ".json"}
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]   # a setosa, a virginica, a versicolor
ROW = ROWS[:1]                       # the instances of a one-row request
DIABETES_ROWS = load_diabetes().data[:3].tolist()


# -- models and stores ---------------------------------------------------------------------------------------

def write_artifact(path, estimator, artifact_format):
    """Write an estimator in one of the three formats; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if artifact_format == "joblib":
        joblib.dump(estimator, path)
    elif artifact_format == "pickle":
        with open(path, "wb") as handle:
            pickle.dump(estimator, handle)
    else:
        service.save_json_model(estimator, path)
    return path


def publish(path, estimator):
    """Write-then-rename a joblib artifact, as README asks publishers to do, with an mtime a second ahead."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    joblib.dump(estimator, temporary)
    os.replace(temporary, path)
    stamp = time.time_ns() + 10**9
    os.utime(path, ns=(stamp, stamp))       # a new mtime even on coarse file systems


_stamps = itertools.count(1)


def write_settings(folder, document):
    """Write model-settings.json as a publisher should: write-then-rename, with a new mtime each time."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, service.SETTINGS_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(document if isinstance(document, str) else json.dumps(document))
    os.replace(temporary, path)
    stamp = time.time_ns() + next(_stamps) * 10**9
    os.utime(path, ns=(stamp, stamp))


def versioned_store(root, estimators, settings=None):
    """root/m/<n>/model.joblib for each estimator (versions 1..n), plus optional settings."""
    for number, estimator in enumerate(estimators, start=1):
        write_artifact(root / "m" / str(number) / "model.joblib", estimator, "joblib")
    if settings is not None:
        write_settings(root / "m", settings)
    return root


# -- answers -------------------------------------------------------------------------------------------------

def _parts(response):
    """(status, headers, body text) of a WebTest or a requests response."""
    if isinstance(response, requests.Response):
        return response.status_code, response.headers, response.content.decode("utf-8")
    return response.status_int, response.headers, response.body.decode("utf-8")


def strict_json(response):
    """The body of a JSON answer, parsed as a browser would: NaN/Infinity tokens are errors.

    `response` is a WebTest or requests response, whose Content-Type must be application/json and which
    must carry X-Content-Type-Options: nosniff; or the body alone (bytes or str), for callers that check
    the headers themselves.
    """
    if isinstance(response, (bytes, str)):
        text = response.decode("utf-8") if isinstance(response, bytes) else response
    else:
        _, headers, text = _parts(response)
        content_type = headers.get("Content-Type", "")
        assert content_type.split(";")[0].strip() == "application/json", content_type
        assert headers.get("X-Content-Type-Options") == "nosniff", dict(headers)

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def metric_value(text, name, **labels):
    """The value of the sample `name` with exactly these labels in a /metrics text; None if it has none.

    Parsed (prometheus_client's parser), since the exposition orders labels and writes numbers its own way."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return item.value
    return None


def assert_error(response, status, *fragments, store=None, code=None):
    """The one error envelope: `status`, strict JSON with a non-empty `error` (holding each fragment) and
    `code` (this one, when given), and no HTML, traceback or path (nor the `store` folder or its parent, when
    given).  -> body."""
    actual, _, text = _parts(response)
    assert actual == status, text
    body = strict_json(response)
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"] and body["code"] == (code or body["code"]), body
    for fragment in fragments:
        assert fragment in body["error"], body
    lowered = text.lower()
    assert "traceback" not in lowered and "<html" not in lowered and 'file "' not in lowered, text
    assert "/tmp" not in text, text
    if store is not None:
        assert os.fspath(store) not in text and os.path.dirname(os.fspath(store)) not in text, text
    return body


# -- waiting -------------------------------------------------------------------------------------------------

def wait_until(condition, timeout=30, what=None, interval=0.01):
    """Poll until condition() is true; fail after `timeout` seconds (saying `what` was awaited)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(interval)


def stays_true(condition, seconds, what=None, interval=0.005):
    """Check condition() again and again for `seconds`: for something that must *not* happen, fail as soon
    as it does rather than sleep and look once."""
    deadline = time.monotonic() + seconds
    while True:
        assert condition(), f"no longer true: {what or condition}"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


# -- in-process apps and registries --------------------------------------------------------------------------

@contextlib.contextmanager
def service_app(**options):
    """service.create_app(**options), whose registry's watcher thread is stopped on exit, whatever happened.

    The one way tests build an app in-process (conftest's make_app and make_client are built on it); a
    module- or session-scoped fixture uses it directly in a `with`.
    """
    app = service.create_app(**options)
    try:
        yield app
    finally:
        app.registry.stop_watching()


class ManualClock:
    """A monotonic clock the test moves by hand, injected into the registry."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def clocked_registry(root, **options):
    """A registry on a ManualClock without a watcher; registry.poll() moves the clock 1 s and refreshes."""
    clock = ManualClock()
    options.setdefault("poll_interval", 1.0)
    registry = service.ModelRegistry(service.Config(store=str(root), **options), clock=clock, watch=False)

    def poll():
        clock.now += 1.0
        registry.refresh()
    registry.poll = poll
    registry.clock_ = clock
    return registry


# -- live servers --------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_command(store, port, *flags):
    """`python service.py --store STORE --port PORT FLAGS`."""
    return [sys.executable, os.path.join(ROOT, "service.py"), "--store", os.fspath(store), "--port", str(port),
            *flags]


def gunicorn_command(port, *options):
    """`gunicorn service:app` on 127.0.0.1:port with `options`; skips the test where gunicorn is not installed."""
    pytest.importorskip("gunicorn")
    from gunicorn.config import Config as GunicornConfig

    command = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-b", f"127.0.0.1:{port}",
               "--graceful-timeout", "5", *options]
    if any("--no-control-socket" in (setting.cli or []) for setting in GunicornConfig().settings.values()):
        command.append("--no-control-socket")      # else newer gunicorn makes ~/.gunicorn/gunicorn.ctl
    return command + ["service:app"]


class LiveServer:
    """A server process on 127.0.0.1:`port`, as a context manager: entering starts it and waits until /healthz
    answers (failing with its output if it exits first), leaving stops it (SIGTERM, then SIGKILL after 15 s).

    Its environment is this one without MODEL_SERVICE_* variables, plus `env`, with PYTHONPATH set to
    `pythonpath` (the repository and this folder, where tests/doubles.py is) and unbuffered output.  Its
    output is read as it comes (a full pipe would block the server at its next log line): output() while it
    runs and after; `returncode` once stopped.
    """

    def __init__(self, command, port, env=None, cwd=ROOT, pythonpath=(ROOT, TESTS), timeout=60):
        self.command, self.port, self.cwd, self.timeout = command, port, cwd, timeout
        self.base = f"http://127.0.0.1:{port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(service.ENV_PREFIX)}
        self.env.pop("PYTHONPATH", None)
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join(map(os.fspath, pythonpath))
        self.env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        self.process, self.returncode, self._lines, self._reader = None, None, [], None

    @property
    def pid(self):
        return self.process.pid

    def output(self):
        return "".join(self._lines)

    def __enter__(self):
        self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace")
        self._reader = threading.Thread(target=lambda: self._lines.extend(self.process.stdout), daemon=True)
        self._reader.start()
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exception):
        self.stop()

    def wait_until_healthy(self):
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                self._reader.join(timeout=10)
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(requests.ConnectionError):
                with requests.get(self.base + "/healthz", timeout=2) as response:
                    if response.status_code == 200:
                        return
            assert time.monotonic() < deadline, f"server did not start in {self.timeout} s:\n{self.output()}"
            time.sleep(0.05)

    def stop(self, timeout=15):
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; then its output is complete."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        self.process.stdout.close()
        self.returncode = self.process.returncode


Answer = collections.namedtuple("Answer", "status headers body")


def http_call(port, method, target, body=None, headers=None, chunks=None, timeout=10):
    """One request on a fresh connection -> Answer(status, {lower-case header: value}, body bytes).

    The target is sent exactly as given (http.client does not normalise `..`); `chunks` sends the body with
    Transfer-Encoding: chunked and no Content-Length."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        headers = dict(headers or {})
        if chunks is not None:
            headers["Transfer-Encoding"] = "chunked"
        elif body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        if chunks is not None:
            for chunk in chunks:
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
        elif body:
            connection.send(body)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


# -- an OpenTelemetry collector -----------------------------------------------------------------------------

class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: each POST /v1/traces body, decoded, into the server's `requests`."""

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, ExportTraceServiceRequest.FromString(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def collector():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def exported_spans(server):
    return [(resource, span) for _, request in list(server.received) for resource in request.resource_spans
            for scope in resource.scope_spans for span in scope.spans]
