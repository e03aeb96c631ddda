#!/usr/bin/env python3
"""This service.py against another one (an earlier commit's), on the same point, interleaved.

    git show HEAD~1:service.py > /tmp/before.py
    python bench/versus.py /tmp/before.py --model rf --concurrency 8,32 --rounds 5 -- --max-batch-size 32 \
        --max-latency-ms 5 --threads 32

Both run at once on bench/run.py's reference models, with the flags after `--`, each checked to answer
what the model predicts; then every round takes each concurrency on both, in a random order, with wrk
(3 s a point by default). It prints each round's figures and, per concurrency, the median req/s and p99
of each and the ratio (this ÷ other) round by round: a change's effect on one point, measured on the
same machine at the same time (bench/run.py measures one service.py against other servers).
"""
import argparse
import os
import random
import statistics
import sys
import tempfile

import make_models
import run as bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="the other service.py")
    parser.add_argument("--model", default="rf", choices=("iris", "rf"), help="reference model (default rf)")
    parser.add_argument("--rows", type=int, default=1, choices=(1, 64), help="rows per request (default 1)")
    parser.add_argument("--concurrency", default="8,32", help="comma-separated (default 8,32)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per point (default 3)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1:]     # flags of both services, after --
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    folder = tempfile.mkdtemp(prefix="model-service-versus-")
    built = make_models.build(folder)
    body, expected = built["bodies"][(args.model, args.rows)], built["expected"][(args.model, args.rows)]
    path = f"/models/{args.model}/predict"
    with open(body, "rb") as handle:
        sanity = handle.read()
    ports = {}
    try:
        for name, script in (("this", bench.SERVICE), ("other", os.path.abspath(args.other))):
            port = bench.free_port()
            proc = bench.PROCS.start([sys.executable, script, "--store", built["store"], "--port", str(port)]
                                     + flags, bench.clean_env(), bench.REPO,
                                     os.path.join(folder, f"{name}.log"))
            bench.wait_until(proc, lambda: bench.check_prediction(port, path, sanity, expected) or True, 60, name)
            bench.run_wrk(f"http://{bench.HOST}:{port}{path}", body, 8, 1)       # warm-up
            ports[name] = port
        figures = {}
        for number in range(args.rounds):
            for concurrency in concurrencies:
                for name in random.sample(list(ports), len(ports)):
                    result = bench.run_wrk(f"http://{bench.HOST}:{ports[name]}{path}", body, concurrency,
                                           args.duration)
                    figures.setdefault((name, concurrency), []).append(result)
                    print(f"round {number + 1} c={concurrency} {name}: {result['rps']:,.0f} req/s, p50 "
                          f"{result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, {result['errors']} errors",
                          flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        for concurrency in concurrencies:
            this, other = figures[("this", concurrency)], figures[("other", concurrency)]
            ratios = [a["rps"] / b["rps"] for a, b in zip(this, other)]
            print(f"c={concurrency}: this {statistics.median(r['rps'] for r in this):,.0f} req/s (p99 "
                  f"{statistics.median(r['p99'] for r in this):.1f} ms), other "
                  f"{statistics.median(r['rps'] for r in other):,.0f} req/s (p99 "
                  f"{statistics.median(r['p99'] for r in other):.1f} ms); this ÷ other by round: "
                  + ", ".join(f"{ratio:.2f}" for ratio in ratios) + f" (median {statistics.median(ratios):.2f})")
    finally:
        bench.PROCS.stop_all()


if __name__ == "__main__":
    main()
