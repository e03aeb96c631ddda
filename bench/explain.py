"""Explanations per row, in-process: service.py's Explainer beside shap's own, on the same models and rows.

Usage: python bench/explain.py [--passes N] [--calls N]

For the benchmark's 100-tree forest of depth 10 (make_models.train: 20 features, 5,000 rows) and its
iris LogisticRegression, each figure is the time of one explanation call of 1 or 64 rows: service.py's
`Explainer.explain` and shap's `TreeExplainer.shap_values` (path-dependent, the same values) or
`LinearExplainer.shap_values` (a one-row background at the zero the service measures from), built once
each, then called in interleaved passes so that a neighbour's load hits both alike; the table gives the
median of the passes and the ratio of the medians.  Both answers are compared first (to 1e-9).  shap
is the test extra's (pip install '.[test]'); service.py never imports it.
"""
import argparse
import os
import statistics
import sys
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
