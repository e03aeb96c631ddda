"""Shared fixtures and helpers; test modules import the helpers with `from conftest import ...` and never
from one another.

- models and stores: real small models trained on scikit-learn's bundled data, written into temporary
  stores in each artifact format (write_artifact, publish);
- answers: strict_json and assert_error, for WebTest and requests responses alike;
- in-process apps: service_app / make_app / make_client, the one way to build an app, which always stops
  its registry's watcher; a registry on a hand-moved clock (ManualClock, clocked_registry);
- waiting: wait_until (a bounded poll for a condition) and stays_true (a condition that must hold for a while),
  instead of sleeping and then asserting;
- live servers: free_port, running, serve_store, stop_process, wait_until_healthy.

One OpenMP and one BLAS thread per process for the whole session (below).

Tests marked `slow` (the soak, the longest live-server and subprocess tests) are left out by
`python -m pytest -m "not slow"`, the quick development loop; CI runs everything.
"""

import os

# One OpenMP and one BLAS thread per process, set before numpy and scikit-learn load (pytest imports this file
# first) so that the server processes the tests start inherit it too.  On a small machine the tests and their
# servers already use every core: more threads per process only make OpenMP's barriers spin against each other
# (histogram boosting's one-row calls took seconds instead of milliseconds).  Answers do not depend on it: a
# test that compares with scikit-learn calls it in the same process or with the same setting.  A variable set
# in the environment beforehand wins, to run the suite under other settings on purpose.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import joblib  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import webtest  # noqa: E402
from sklearn.datasets import load_diabetes, load_iris  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import service  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSIONS = {"joblib": ".joblib", "pickle": ".pkl", "json": ".json"}
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]   # a setosa, a virginica, a versicolor


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


def assert_error(response, status, *fragments, store=None):
    """The one error envelope: `status`, strict JSON with a non-empty `error` (holding each fragment) and
    `code`, and no HTML, traceback or path (nor the `store` folder or its parent, when given).  -> body."""
    actual, _, text = _parts(response)
    assert actual == status, text
    body = strict_json(response)
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"], body
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

    The one way tests build an app in-process (make_app and make_client are built on it); a module- or
    session-scoped fixture uses it directly in a `with`.
    """
    app = service.create_app(**options)
    try:
        yield app
    finally:
        app.config["service.registry"].stop_watching()


@pytest.fixture
def make_app():
    """make_app(**create_app options) -> the app; every app made stops its watcher at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(service_app(**options))


@pytest.fixture
def make_client(make_app):
    """make_client(store, **options) -> a WebTest client over make_app(store=store, **options)."""
    def make(store_path, **options):
        return webtest.TestApp(make_app(store=store_path, **options))
    return make


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


# -- models and stores ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def iris():
    data = load_iris()
    return data.data, data.target


@pytest.fixture(scope="session")
def iris_classifier(iris):
    """Multiclass LogisticRegression on plain arrays (no feature names), integer classes."""
    features, target = iris
    return LogisticRegression(max_iter=1000).fit(features, target)


@pytest.fixture(scope="session")
def named_labels_classifier(iris):
    """Tells itself apart from iris_classifier: string labels ("setosa", ...) instead of integers."""
    features, target = iris
    return LogisticRegression(max_iter=1000).fit(features, load_iris().target_names[target])


@pytest.fixture(scope="session")
def named_iris_classifier():
    """StandardScaler + LogisticRegression fitted on a DataFrame: knows feature names; string classes."""
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        frame, data.target_names[data.target])


@pytest.fixture(scope="session")
def diabetes_regressor():
    data = load_diabetes()
    return make_pipeline(StandardScaler(), Ridge(alpha=0.5)).fit(data.data, data.target)


@pytest.fixture(params=sorted(EXTENSIONS))
def artifact_format(request):
    return request.param


@pytest.fixture
def store(tmp_path, artifact_format, iris_classifier, named_iris_classifier, diabetes_regressor):
    """A store in one format: flat iris (v1), versioned diabetes (v1, v2, both served) and named-feature flowers."""
    ext = EXTENSIONS[artifact_format]
    root = tmp_path / "store"
    write_artifact(root / f"iris{ext}", iris_classifier, artifact_format)
    write_artifact(root / "diabetes" / "1" / f"model{ext}", diabetes_regressor, artifact_format)
    write_artifact(root / "diabetes" / "2" / f"model{ext}", diabetes_regressor, artifact_format)
    (root / "diabetes" / "model-settings.json").write_text('{"version_policy": "all"}')
    write_artifact(root / "flowers" / "1" / f"model{ext}", named_iris_classifier, artifact_format)
    return root


@pytest.fixture
def client(store, make_client):
    return make_client(store)


# -- live servers --------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process, timeout=15):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(process, base, timeout, output):
    """Poll base/healthz until it answers 200; fail with output() if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{output()}")
        try:
            with requests.get(base + "/healthz", timeout=2) as response:
                if response.status_code == 200:
                    return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "server did not start in time"
        time.sleep(0.1)


def gunicorn_command(port, *options):
    """`gunicorn service:app` on 127.0.0.1:port with `options`; skips the test where gunicorn is not installed."""
    pytest.importorskip("gunicorn")
    from gunicorn.config import Config as GunicornConfig

    command = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-b", f"127.0.0.1:{port}",
               "--graceful-timeout", "5", *options]
    if any("--no-control-socket" in (setting.cli or []) for setting in GunicornConfig().settings.values()):
        command.append("--no-control-socket")      # else newer gunicorn makes ~/.gunicorn/gunicorn.ctl
    return command + ["service:app"]


@contextlib.contextmanager
def running(command, port, env=None, cwd=ROOT, timeout=30):
    """Start a server process, wait until /healthz answers, yield its base URL, then stop it.

    Its output is read as it comes (a full pipe would block the server at its next log line):
    running.so_far() while it runs, running.output once stopped, with its exit code in running.returncode;
    running.pid is its process id.
    """
    environment = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    running.so_far = lambda: "".join(lines)
    running.pid = process.pid
    try:
        wait_until_healthy(process, base, timeout, lambda: "".join(lines))
        yield base
    finally:
        stop_process(process)
        reader.join(timeout=10)
        running.output = "".join(lines)
        running.returncode = process.returncode
        process.stdout.close()


@pytest.fixture
def serve_store():
    """serve_store(store, *flags, env=None) -> context manager running `python service.py` on a free port."""
    def start(store_path, *flags, env=None):
        port = free_port()
        command = [sys.executable, os.path.join(ROOT, "service.py"), "--store", os.fspath(store_path),
                   "--port", str(port), *flags]
        return running(command, port, env=env)
    return start
