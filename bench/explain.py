"""Explanations per row, in-process: service.py's Explainer beside shap's own, on the same models and rows.

Usage: python bench/explain.py [--passes N] [--calls N]

For the benchmark's 100-tree forest of depth 10 (make_models.train: 20 features, 5,000 rows) and its
iris LogisticRegression, each figure is the time of one explanation call of 1 or 64 rows: service.py's
`Explainer.explain` and shap's `TreeExplainer.shap_values` (path-dependent, the same values) or
`LinearExplainer.shap_values` (a one-row background at the zero the service measures from), built once
each, then called in interleaved passes so that a neighbour's load hits both alike; the table gives the
median of the passes and the ratio of the medians.  Both answers are compared first (to 1e-9).  shap
is the test extra's (pip install '.[test]'); service.py never imports it.

With --http, over the service's routes instead: `python service.py` on a store of the same two models,
one client on one kept-alive connection, POST /models/NAME/explain beside POST /models/NAME/predict with
the same rows, interleaved the same way; the explanation is checked against the in-process Explainer
first (to 1e-9).  The ratio says what asking for the explanation costs over asking for the prediction.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import make_models  # noqa: E402


def milliseconds(call, count):
    """Milliseconds per call of `call()`, the best of three runs of `count` calls."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            call()
        best = min(best, (time.perf_counter() - started) / count * 1e3)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=7, help="interleaved passes (default 7)")
    parser.add_argument("--calls", type=int, default=20, help="1-row calls per pass (64 rows: a tenth; default 20)")
    parser.add_argument("--http", action="store_true", help="over the service's explain and predict routes")
    args = parser.parse_args(argv)
    if args.http:
        return over_http(args)

    import numpy as np
    import shap

    import service

    models = make_models.train()
    print("| model | rows | service.py ms/call | shap ms/call | ratio (service / shap) | service.py µs/row |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (model, X) in models.items():
        ours = service.Explainer(model, X.shape[1])
        if name == "rf":
            theirs = shap.TreeExplainer(model).shap_values
        else:
            theirs = shap.LinearExplainer(model, np.zeros((1, X.shape[1]))).shap_values
        for rows in (1, 64):
            batch = np.ascontiguousarray(X[:rows])
            mine, reference = ours.explain(batch)[1], np.asarray(theirs(batch))
            if np.abs(mine - reference.reshape(mine.shape)).max() > 1e-9:
                raise SystemExit(f"{name}: service.py and shap differ on {rows} rows")
            count = args.calls if rows == 1 else max(1, args.calls // 10)
            figures = {"service": [], "shap": []}
            for _ in range(args.passes):
                figures["service"].append(milliseconds(lambda: ours.explain(batch), count))
                figures["shap"].append(milliseconds(lambda: theirs(batch), count))
            service_ms, shap_ms = statistics.median(figures["service"]), statistics.median(figures["shap"])
            print(f"| {name} | {rows} | {service_ms:.3f} | {shap_ms:.3f} | {service_ms / shap_ms:.2f} | "
                  f"{service_ms * 1e3 / rows:,.1f} |", flush=True)


def over_http(args):
    """The --http table: explain beside predict, per request, over a live `python service.py`."""
    import joblib
    import numpy as np

    import service

    with tempfile.TemporaryDirectory() as store:
        models = make_models.train()
        for name, (model, _) in models.items():
            joblib.dump(model, os.path.join(store, f"{name}.joblib"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "service.py"), "--store", store,
                                   "--port", str(port), "--log-level", "WARNING"])
        try:
            connection = wait_for_service(port, server)
            print("| model | rows | explain ms/request | predict ms/request | explain / predict |")
            print("|---|---:|---:|---:|---:|")
            for name, (model, X) in models.items():
                for rows in (1, 64):
                    body = json.dumps({"instances": X[:rows].tolist()})
                    answer = post(connection, f"/models/{name}/explain", body)["explanations"]
                    expected = service.Explainer(model, X.shape[1]).explain(X[:rows])[1]
                    if np.abs(np.array(answer["contributions"]) - expected).max() > 1e-9:
                        raise SystemExit(f"{name}: the route's explanation differs from the Explainer's on {rows} rows")
                    count = args.calls if rows == 1 else max(1, args.calls // 10)
                    figures = {"explain": [], "predict": []}
                    for _ in range(args.passes):
                        for route in figures:
                            figures[route].append(milliseconds(
                                lambda: post(connection, f"/models/{name}/{route}", body), count))
                    explain_ms, predict_ms = (statistics.median(figures[route]) for route in ("explain", "predict"))
                    print(f"| {name} | {rows} | {explain_ms:.2f} | {predict_ms:.2f} | {explain_ms / predict_ms:.1f} |",
                          flush=True)
        finally:
            server.terminate()
            server.wait(30)


def wait_for_service(port, server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with {server.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            return connection
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the service did not answer /healthz")


def post(connection, path, body):
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200:
        raise SystemExit(f"POST {path}: {response.status} {answer[:200]!r}")
    return json.loads(answer)


if __name__ == "__main__":
    main()
