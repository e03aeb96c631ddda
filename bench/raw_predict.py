"""The floor: in-process cost of model.predict, no HTTP.

Usage: python bench/raw_predict.py [OUTDIR] [--quick]   (OUTDIR made by make_models.py; default ./bench-models)

Adapted from the reference harness (shared/bench/raw_predict.py), same cases: predict on 1 row
(numpy, already shaped); the same plus the JSON work a server must do anyway (json.loads ->
np.asarray -> predict -> tolist -> json.dumps); a 64-row batch, whole call and per row. Each figure
is the median over repeats of timeit loops; the loop count is chosen so that one repeat lasts about
0.1 s (0.03 s with --quick) instead of the reference's fixed counts.
"""
import json
import os
import statistics
import sys
import timeit


def _median_us(fn, repeats, target_s):
    fn()                                             # first call outside the timing (lazy set-up)
    t0 = timeit.default_timer()
    fn()
    once = max(timeit.default_timer() - t0, 1e-7)
    number = max(1, int(target_s / once))
    times = timeit.repeat(fn, number=number, repeat=repeats)
    return statistics.median(times) / number * 1e6


def measure(artifacts, bodies, quick=False):
    """[{model, case, us}] for each model in `artifacts` ({name: joblib path}); `bodies` maps
    (name, rows) to a request body file."""
    import joblib
    import numpy as np

    repeats, target = (5, 0.03) if quick else (9, 0.1)
    out = []
    for name, path in artifacts.items():
        model = joblib.load(path)
        with open(bodies[(name, 1)]) as f:
            body1 = f.read()
        with open(bodies[(name, 64)]) as f:
            body64 = f.read()
        x1 = np.asarray(json.loads(body1)["instances"], dtype=np.float64)
        x64 = np.asarray(json.loads(body64)["instances"], dtype=np.float64)

        def full(body):
            X = np.asarray(json.loads(body)["instances"], dtype=np.float64)
            return json.dumps({"predictions": model.predict(X).tolist()})

        p64 = _median_us(lambda: model.predict(x64), repeats, target)
        j64 = _median_us(lambda: full(body64), repeats, target)
        out += [
            {"model": name, "case": "predict, 1 row (numpy in)", "us": _median_us(lambda: model.predict(x1), repeats, target)},
            {"model": name, "case": "json -> predict -> json, 1 row", "us": _median_us(lambda: full(body1), repeats, target)},
            {"model": name, "case": "predict, 64 rows (whole call)", "us": p64},
            {"model": name, "case": "predict, 64 rows (per row)", "us": p64 / 64},
            {"model": name, "case": "json -> predict -> json, 64 rows (per row)", "us": j64 / 64},
        ]
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    d = os.path.abspath(args[0] if args else "./bench-models")
    names = ("iris", "rf")
    arts = {n: os.path.join(d, "store", n, "1", "model.joblib") for n in names}
    bods = {(n, r): os.path.join(d, "bodies", f"{n}_{r}.json") for n in names for r in (1, 64)}
    print(f"{'model':6} {'case':44} {'median_us':>10}")
    for row in measure(arts, bods, quick="--quick" in sys.argv):
        print(f"{row['model']:6} {row['case']:44} {row['us']:10.1f}")
