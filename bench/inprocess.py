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
"""
import argparse
import cProfile
import io
import os
import pstats
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
