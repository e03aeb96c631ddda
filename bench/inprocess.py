"""Per-request cost in-process, no network: the minimal Bottle app beside service.py on the same model and body.

Usage: python bench/inprocess.py [--requests N] [--profile N] [--native-passes N]

Both WSGI apps are called directly, N times each (after a warm-up), for the benchmark's iris
LogisticRegression and 100-tree forest with 1-row and 64-row bodies, and for a do-nothing model
(the same fitted iris model with `predict` answering zeros), which leaves only what each app costs
around the model.  `--profile N` then prints the N functions where service.py's request spends most
of its own time (cProfile, do-nothing model).  This is the measurement behind the lean request path
(README, "Benchmark"): it shows where a request's time goes without the load generator and the
server sharing the machine.

`--native-passes N` (default 5) then compares service.py's native predictor with scikit-learn on the
same loaded model (its proved predictor switched off and on between passes, the two interleaved so that
a neighbour's load hits both alike): per request through the app, and per `LoadedModel.call` alone, for
the iris LogisticRegression (1 row) and the forest (1 and 64 rows); each figure is the median of the passes.

`--anchors DIR` then measures against the limit: `predict_proba` of a 100-tree forest grown to full depth,
a 100-iteration histogram gradient boosting and a typical tabular pipeline (make_models.train_limits), on 1
and 64 rows, by scikit-learn (one OpenMP and BLAS thread), by the service's native predictor
(LoadedModel.call, from the rows the service makes of a request), and by ONNX Runtime (skl2onnx, one thread,
float32 and float64 inputs) and Treelite's GTIL (one thread), with each contender's fidelity to
scikit-learn (bit-exact, or the largest difference).  The anchors are benchmark-only: they run in their own
virtual environment DIR (created on first use with `python -m venv` and pip: onnxruntime, skl2onnx,
treelite and this run's scikit-learn, numpy and scipy), through bench/anchors.py; `--no-install` skips
the install.  Interleaved: every pass measures each contender once, in turn; medians of `--native-passes`.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE, os.path.join(HERE, "peers")]

import make_models  # noqa: E402


def wsgi_call(app, path, body):
    """One POST through a WSGI app; the answer must be 200."""
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    status = []
    answer = b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
    if not status[0].startswith("200"):
        raise SystemExit(f"{path} answered {status[0]}: {answer[:200]!r}")
    return answer


def per_request(app, path, body, count):
    """Microseconds per request: the best of three runs of `count` calls."""
    wsgi_call(app, path, body)
    return min(microseconds(lambda: wsgi_call(app, path, body), count) for _ in range(3))


def microseconds(call, count):
    """Microseconds per call of `call()`, over `count` calls."""
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count * 1e6


def native_versus_sklearn(app, registry, built, passes, count):
    """The table of --native-passes: scikit-learn and the native predictor on the same model, interleaved."""
    import json
    import statistics

    import numpy as np

    print("\n| model | body | measured | scikit-learn µs | native µs | ratio (native / scikit-learn) |")
    print("|---|---|---|---:|---:|---:|")
    for name, rows in (("iris", 1), ("rf", 1), ("rf", 64)):
        with open(built["bodies"][name, rows], "rb") as handle:
            body = handle.read()
        inputs = np.array(json.loads(body)["instances"], dtype=np.float64)
        loaded = registry.get(name)
        proved, calls = loaded.native, count if name != "rf" else max(20, count // 40)
        measures = {"request": lambda: wsgi_call(app, f"/models/{name}/predict", body),
                    "LoadedModel.call": lambda: loaded.call("predict", inputs)}
        for measured, call in measures.items():
            figures = {False: [], True: []}
            for _ in range(passes):
                for native in (False, True):
                    loaded.native = proved if native else None
                    call()
                    figures[native].append(microseconds(call, calls))
            loaded.native = proved
            sklearn, native = statistics.median(figures[False]), statistics.median(figures[True])
            print(f"| {name} | {rows} row{'s' if rows > 1 else ''} | {measured} | {sklearn:,.0f} | {native:,.0f} | "
                  f"1/{sklearn / native:.1f} |", flush=True)


ANCHOR_PACKAGES = ("onnxruntime", "skl2onnx", "treelite")


def anchor_environment(folder, install):
    """The python of the anchors' virtual environment in `folder`, made (with a message) if needed; None if it
    cannot be had."""
    import numpy
    import scipy
    import sklearn

    python = os.path.join(folder, "bin", "python")
    if os.path.exists(python):
        return python
    if not install:
        print(f"(anchors: {folder} holds no environment, and --no-install)", file=sys.stderr)
        return None
    requirements = list(ANCHOR_PACKAGES) + [f"scikit-learn=={sklearn.__version__}", f"numpy=={numpy.__version__}",
                                            f"scipy=={scipy.__version__}"]
    print(f"anchors: creating {folder} and installing {' '.join(requirements)} (a few minutes)", file=sys.stderr)
    for argv in ([sys.executable, "-m", "venv", folder], [python, "-m", "pip", "install", "-q"] + requirements):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            print(f"(anchors not installed: {done.stderr.strip()[-300:]})", file=sys.stderr)
            return None
    return python


def against_the_limit(folder, python, passes):
    """The --anchors table: scikit-learn, the native predictor and the anchors on the same rows, interleaved."""
    import joblib
    import numpy as np
    import threadpoolctl

    import service

    anchors = None if python is None else subprocess.Popen(
        [python, os.path.join(HERE, "anchors.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    names = ("ONNX Runtime float32", "ONNX Runtime float64", "Treelite GTIL")
    print("\n| model | rows | scikit-learn µs | native µs | native ÷ scikit-learn | " +
          " | ".join(f"{name} µs (fidelity)" for name in names) + " | native ÷ ONNX Runtime float32 |")
    print("|---|---:|---:|---:|---:|" + "---|" * len(names) + "---:|")
    for name, (estimator, rows) in make_models.train_limits().items():
        path = os.path.join(folder, f"{name}.joblib")
        joblib.dump(estimator, path)
        model = service.LoadedModel(service.ArtifactRef(name, 1, path, name, ".joblib", 0, 0), estimator, "", 0, 0.0)
        service.attach_native(model, True)
        for count in (1, 64):
            inputs = service.model_inputs(model, rows[:count] if name == "tabular" else rows[:count].tolist(), 64)
            given = model.sklearn_inputs(inputs)
            with threadpoolctl.threadpool_limits(1):
                expected = estimator.predict_proba(given)
            assert service._same_outputs(expected, model.call("predict_proba", inputs))
            np.save(os.path.join(folder, "rows.npy"), inputs)
            np.save(os.path.join(folder, "expected.npy"), expected)
            figures = {"scikit-learn": [], "native": []}
            found = {}
            for _ in range(passes):
                with threadpoolctl.threadpool_limits(1):
                    figures["scikit-learn"].append(microseconds(lambda: estimator.predict_proba(given), 20))
                figures["native"].append(microseconds(lambda: model.call("predict_proba", inputs), 400))
                if anchors is not None and name != "tabular":       # skl2onnx and Treelite take numbers only
                    anchors.stdin.write(json.dumps({"model": path, "rows": os.path.join(folder, "rows.npy"),
                                                    "expected": os.path.join(folder, "expected.npy"),
                                                    "calls": 400}) + "\n")
                    anchors.stdin.flush()
                    for anchor, result in json.loads(anchors.stdout.readline()).items():
                        found[anchor] = result
                        figures.setdefault(anchor, []).append(result.get("us"))
            median = {key: statistics.median(values) for key, values in figures.items() if None not in values}
            cells = [f"{median[anchor]:,.1f} ({found[anchor]['fidelity']})" if anchor in median else
                     ("not measured" if anchor not in found else f"n/a: {found[anchor]['error'][:60]}")
                     for anchor in names]
            versus = f"{median['native'] / median[names[0]]:.2f}×" if names[0] in median else "–"
            print(f"| {name} | {count} | {median['scikit-learn']:,.1f} | {median['native']:,.1f} | "
                  f"{median['native'] / median['scikit-learn']:.3f}× | " + " | ".join(cells) + f" | {versus} |",
                  flush=True)
    if anchors is not None:
        anchors.stdin.close()
        anchors.wait()


def do_nothing(estimator):
    """The fitted model with predict answering zeros: what remains is the app's own cost."""
    import numpy as np

    estimator.predict = lambda rows: np.zeros(len(rows), dtype=np.int64)
    return estimator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="calls per measurement (default 2000)")
    parser.add_argument("--native-passes", type=int, default=5, metavar="N",
                        help="passes of the native vs scikit-learn comparison (0: skip it)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive functions of service.py's own request path")
    parser.add_argument("--anchors", metavar="DIR",
                        help="also measure against ONNX Runtime and Treelite, installed into the virtual "
                             "environment DIR (created on first use)")
    parser.add_argument("--only-anchors", action="store_true", help="with --anchors, only that table")
    parser.add_argument("--no-install", action="store_true", help="do not create the anchors' environment")
    args = parser.parse_args(argv)
    if args.anchors and args.only_anchors:
        with tempfile.TemporaryDirectory() as folder:
            against_the_limit(folder, anchor_environment(os.path.abspath(args.anchors), not args.no_install),
                              args.native_passes)
        return

    with tempfile.TemporaryDirectory() as folder:
        built = make_models.build(folder)
        os.environ["MODEL_SERVICE_POLL_INTERVAL"] = "0"
        os.environ["MODEL_PATH"] = built["artifacts"]["iris"]      # the floor loads it at import
        import bottle_floor  # noqa: E402  (its model is swapped per case below)
        import joblib

        import service

        app = service.create_app(store=built["store"])
        registry = app.registry
        registry.refresh()                                  # the first scan (a request would do it)
        print("| model | body | Bottle floor µs/request | service.py µs/request | ratio (floor / service) |")
        print("|---|---|---:|---:|---:|")
        cases = [(name, rows) for name in make_models.MODELS for rows in (1, 64)] + [("do-nothing", 1)]
        for name, rows in cases:
            model_name = "iris" if name == "do-nothing" else name
            with open(built["bodies"][model_name, rows], "rb") as handle:
                body = handle.read()
            bottle_floor.model = joblib.load(built["artifacts"][model_name])
            loaded = registry.get(model_name)
            if name == "do-nothing":
                do_nothing(bottle_floor.model)
                do_nothing(loaded.estimator)
                loaded.native = None        # the replaced predict answers, not the one compiled at load
            count = args.requests if name != "rf" else max(20, args.requests // 40)
            floor = per_request(bottle_floor.app, "/predict", body, count)
            ours = per_request(app, f"/models/{model_name}/predict", body, count)
            print(f"| {name} | {rows} row{'s' if rows > 1 else ''} | {floor:,.0f} | {ours:,.0f} | {floor / ours:.2f} |")
        if args.native_passes:
            registry.reload("iris")                     # the do-nothing case replaced its predict
            native_versus_sklearn(app, registry, built, args.native_passes, args.requests)
        if args.profile:
            with open(built["bodies"]["iris", 1], "rb") as handle:
                body = handle.read()
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.requests):
                wsgi_call(app, "/models/iris/predict", body)
            profile.disable()
            print(f"\nservice.py, do-nothing model, {args.requests} requests, by own time (cProfile):\n")
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
        registry.stop_watching()
        if args.anchors:
            against_the_limit(folder, anchor_environment(os.path.abspath(args.anchors), not args.no_install),
                              args.native_passes)


if __name__ == "__main__":
    main()
