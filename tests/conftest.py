"""Shared fixtures: real small models trained on scikit-learn's bundled data, written
into temporary stores in each artifact format, and helpers to run the real server."""

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import joblib
import numpy as np
import pytest
import requests
import webtest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENSIONS = {"joblib": ".joblib", "pickle": ".pkl", "json": ".json"}
IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


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
def make_client():
    """make_client(store, **options) -> WebTest client over create_app; watchers stop at teardown."""
    apps = []

    def make(store_path, **options):
        apps.append(service.create_app(store=store_path, **options))
        return webtest.TestApp(apps[-1])
    yield make
    for app in apps:
        app.config["service.registry"].stop_watching()


@pytest.fixture
def client(store, make_client):
    return make_client(store)


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


@contextlib.contextmanager
def running(command, port, env=None, cwd=ROOT, timeout=30):
    """Start a server process, wait until /healthz answers, yield its base URL, then stop it.

    Its output is read as it comes (a full pipe would block the server at its next log line) and
    left in running.output, with its exit code in running.returncode.
    """
    environment = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
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
