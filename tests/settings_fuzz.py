"""A fuzzer for model-settings.json: whatever one settings file holds, it is that file's refusal or its
settings, never a failed scan, a 500 or a stopped server.

Each mutant starts from a valid settings document (every key of the format is used by some base
document) and changes what an author or a forger could: values replaced by other types, huge integers
(400 digits), floats at the edge of range (1e308, 5e-324, -0.0), long and odd strings, deep nesting (up
to 30,000 brackets), keys deleted, added or named twice, versions and labels retargeted; or, on the text,
truncation, flipped and inserted bytes, invalid UTF-8, NaN and Infinity tokens, a byte-order mark and
padding past the size bound.  The mutant is published as the settings file of model "m" (three versions)
in a store that also holds model "ok" with valid settings, and checked three ways:

- ModelSettings.read gives settings or a ValueError with a short message, nothing else; accepted
  settings describe themselves as strict JSON;
- through the app (a real registry and WSGI app, on a clock the fuzzer moves): the store scan goes on,
  GET /models answers 200, "m" shows the refusal in `settings_error` with its previous settings still in
  force (or the new ones when accepted; a traffic split's shares are finite and sum to 1), predictions of
  "m" answer 200, 400, 404 or 503, never a 500, and "ok" keeps answering 200 with scikit-learn's answer;
- no step takes longer than the time limit (a SIGALRM in the fuzzing process: a hang is a finding).

tests/test_settings_fuzz.py runs a bounded sample; the documented run is

    python tests/settings_fuzz.py --mutations 5000 --seed 1

which prints the count of each outcome and every finding (with --save DIR, the findings' files too).
"""

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINE = ("refused", "accepted")
FINDINGS = ("error", "hang")
ROW = [5.1, 3.5, 1.4, 0.2]
MESSAGE_LIMIT = 1000         # a refusal names what is wrong; it never echoes a whole file

BASE_DOCUMENTS = [
    {},
    {"version_policy": "all", "labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 90, "canary": 10}},
    {"version_policy": {"latest": 2}, "labels": {"stable": 2}, "shadow": "stable", "native": False},
    {"version_policy": {"specific": [1, 3]}, "labels": {"old": "1"}, "traffic": {"1": 0.5, "3": 1.5},
     "redact": ["sepal_length", "petal_width"]},
    {"version_policy": "latest", "batching": {"max_batch_size": 8, "max_latency_ms": 2.5}, "safe_pickle": False,
     "warmup": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]},
    {"version_policy": "all", "batching": False, "warmup": False, "sha256": {"9": "0" * 64},
     "traffic": {"1": 1e308, "2": 1e308, "3": 5e-324}},
]

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2, 3, 4, 10 ** 18, 10 ** 400, -10 ** 400, 1e308, -1e308, 5e-324, -0.0, 0.5,
    "", "1", "01", "3", "9" * 19, "stable", "canary", "all", "latest", "\ud800", "\u0000", "a" * 5000,
    "é" * 100, [], [1], [1, 3], [[1, 2, 3, 4]], [[1e308] * 4], [[10 ** 400, 1, 1, 1]], [["x"] * 4], [{}],
    [{"sepal_length": 1}], {}, {"latest": 10 ** 400}, {"specific": [10 ** 400]}, {"specific": [-1]},
    {"stable": 10 ** 400}, {"1": 10 ** 400, "2": 1.5}, {"1": 1e308, "2": 1e308}, {"max_batch_size": 10 ** 400},
    {"max_batch_size": 1, "max_latency_ms": 1e308},
]


# -- the mutator ------------------------------------------------------------------------------------


def _sites(node, path=()):
    """Every (path) in a JSON value, the root included."""
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _sites(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _sites(value, path + (index,))


def _replaced(document, path, value, delete=False):
    """A copy of `document` with the value at `path` replaced (or deleted)."""
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    holder = copy
    for step in path[:-1]:
        holder = holder[step]
    if delete:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return copy


def _nested(rng):
    depth = rng.choice((15, 16, 17, 100, 999, 1000, 5000, 30000))
    return "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth


def mutate_value(document, rng):
    """One change to the parsed document; (new document, description)."""
    paths = list(_sites(document))
    path = rng.choice(paths)
    what = rng.random()
    if what < 0.45:
        value = rng.choice(HOSTILE_VALUES)
        return _replaced(document, path, value), f"{list(path)} = {json.dumps(value)[:60]}"
    if what < 0.6 and path:
        return _replaced(document, path, None, delete=True), f"delete {list(path)}"
    if what < 0.75 and isinstance(document, dict):
        key = rng.choice(["version_policy", "labels", "traffic", "shadow", "redact", "warmup", "batching",
                          "sha256", "native", "safe_pickle", "lables", "", "\ud800", "x" * 300])
        value = rng.choice(HOSTILE_VALUES)
        return {**document, key: value}, f"set {key[:20]!r} = {json.dumps(value)[:60]}"
    if what < 0.85:
        labels = {rng.choice(["stable", "canary", "x", "1bad"]): rng.choice([1, 2, 3, 4, "2", 10 ** 400])
                  for _ in range(rng.randint(1, 3))}
        traffic = {rng.choice(["stable", "canary", "1", "2", "3", "4", "x"]): rng.choice(HOSTILE_VALUES[:16])
                   for _ in range(rng.randint(1, 3))}
        return {**(document if isinstance(document, dict) else {}), "labels": labels, "traffic": traffic}, \
            f"labels {labels}, traffic {traffic}"[:160]
    value = rng.choice(paths)
    return _replaced(document, path, _get(document, value)), f"{list(path)} = the value at {list(value)}"


def _get(document, path):
    for step in path:
        document = document[step]
    return document


def mutate_text(text, rng):
    """One change to the file's bytes; (new bytes, description)."""
    data = text.encode("utf-8", "surrogatepass")
    what = rng.randrange(9)
    at = rng.randrange(len(data) + 1)
    if what == 0:
        return data[:at], f"truncated at {at}"
    if what == 1 and data:
        index = rng.randrange(len(data))
        return data[:index] + bytes([rng.randrange(256)]) + data[index + 1:], f"byte {index} changed"
    if what == 2:
        return data[:at] + os.urandom(rng.randint(1, 8)) + data[at:], f"random bytes at {at}"
    if what == 3:
        return data[:at] + b"\xff\xfe\xc0" + data[at:], f"invalid UTF-8 at {at}"
    if what == 4:
        token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 400, b"-0", b"1E+308"])
        return data.replace(b"1", token, 1), f"a 1 became {token[:20].decode()}"
    if what == 5:
        return b"\xef\xbb\xbf" + data, "byte-order mark"
    if what == 6:
        return data + b" " * (64 * 1024), "padded past 64 KiB"
    if what == 7:
        nested = _nested(rng).encode()
        return data.replace(b"1", nested, 1) if b"1" in data else nested, "deep nesting"
    return data[:at] + data[at:at + rng.randint(1, 50)] * rng.randint(2, 50) + data[at:], f"repeated at {at}"


def named_twice(document, rng):
    """The document's text with one object's member written twice (the second with another value)."""
    objects = [path for path in _sites(document) if isinstance(_get(document, path), dict) and _get(document, path)]
    if not objects:
        return json.dumps(document), "no object to name a member twice in"
    chosen = rng.choice(objects)

    def dump(node, path):
        if isinstance(node, dict):
            members = [f"{json.dumps(key)}: {dump(value, path + (key,))}" for key, value in node.items()]
            if path == chosen:
                key = next(iter(node))
                members.append(f"{json.dumps(key)}: {json.dumps(rng.choice(HOSTILE_VALUES))}")
            return "{" + ", ".join(members) + "}"
        if isinstance(node, list):
            return "[" + ", ".join(dump(value, path + (index,)) for index, value in enumerate(node)) + "]"
        return json.dumps(node)
    return dump(document, ()), f"a member of {list(chosen)} named twice"


def mutant(rng):
    """(file bytes, [changes]) for one mutant."""
    document, changes = rng.choice(BASE_DOCUMENTS), []
    for _ in range(rng.choice((1, 1, 2, 3))):
        document, change = mutate_value(document, rng)
        changes.append(change)
    text = json.dumps(document)
    if rng.random() < 0.1:
        text, change = named_twice(document, rng)
        changes.append(change)
    if rng.random() < 0.35:
        data, change = mutate_text(text, rng)
        changes.append(change)
    else:
        data = text.encode("utf-8", "surrogatepass")
    return data, changes


# -- the oracle -------------------------------------------------------------------------------------


class Hang(Exception):
    """A step took longer than the time limit."""


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM after `seconds`: a Python loop that never ends becomes a Hang."""
    def expire(signum, frame):
        raise Hang(f"no result within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Bench:
    """A store with "m" (three versions, the mutant's settings) and "ok", served by a registry and app on a
    clock the fuzzer moves."""

    def __init__(self, folder):
        import joblib
        import webtest
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        import service

        self.service = service
        data = load_iris()
        self.model = LogisticRegression(max_iter=1000).fit(data.data, data.target)
        self.expected = self.model.predict([ROW]).tolist()
        for name, version in (("m", 1), ("m", 2), ("m", 3), ("ok", 1)):
            os.makedirs(os.path.join(folder, name, str(version)))
            joblib.dump(self.model, os.path.join(folder, name, str(version), "model.joblib"))
        self.folder, self.path = folder, os.path.join(folder, "m", service.SETTINGS_FILE)
        self.stamp = time.time_ns()
        self.publish(os.path.join(folder, "ok", service.SETTINGS_FILE),
                     b'{"labels": {"stable": 1}, "traffic": {"stable": 1, "1": 1e308}, "redact": ["x"]}')
        self.now = [1000.0]
        config = service.Config(store=folder, poll_interval=1.0)
        self.registry = service.ModelRegistry(config, clock=lambda: self.now[0], watch=False)
        self.client = webtest.TestApp(service.create_app(config=config, registry=self.registry))
        self.in_force = None       # the last settings accepted, described

    def publish(self, path, data):
        """Write-then-rename, with a new mtime each time (coarse file systems)."""
        with open(path + ".tmp", "wb") as handle:
            handle.write(data)
        os.replace(path + ".tmp", path)
        self.stamp += 10 ** 9
        os.utime(path, ns=(self.stamp, self.stamp))

    def evaluate(self, data):
        """The outcome of one mutant: "refused" or "accepted", else raises AssertionError (a finding)."""
        service = self.service
        self.publish(self.path, data)
        ref = service.ArtifactRef("m", 0, self.path, "m/" + service.SETTINGS_FILE, ".json", len(data), 0)
        try:
            settings, problem = service.ModelSettings.read(ref, (1, 2, 3)), None
            service.dumps(settings.describe())
        except ValueError as error:
            settings, problem = None, str(error)
            assert len(problem) <= MESSAGE_LIMIT, f"a refusal of {len(problem)} characters"
        self.now[0] += 1.0
        models = self.client.get("/models")
        assert models.status_int == 200, models.text
        status = json.loads(self.client.get("/models/m").text, parse_constant=_no_constant)
        self._check_settings(status, settings, problem)
        self._check_predictions(status)
        return "refused" if problem else "accepted"

    def _check_settings(self, status, settings, problem):
        """The file's settings are in force, or its refusal is shown and the previous ones stay."""
        if settings is not None:
            assert status["settings_error"] is None, status["settings_error"]
            self.in_force = settings.describe()
        else:
            assert status["settings_error"] and problem in status["settings_error"], (status["settings_error"],
                                                                                      problem)
        if self.in_force is not None:
            held = self.registry.settings_for("m").describe()
            assert held == self.in_force, f"{held} in force, not {self.in_force}"
        if status["traffic"]:
            shares = [target["share"] for target in status["traffic"]]
            assert all(0.0 <= share <= 1.0 for share in shares) and abs(sum(shares) - 1.0) < 1e-5, shares

    def _check_predictions(self, status):
        paths = ["/models/m/predict", "/models/m/versions/1/predict"] + \
            [f"/models/m/labels/{label}/predict" for label in status["labels"]]
        for path in paths:
            answer = self.client.post_json(path, {"instances": [ROW]}, expect_errors=True,
                                           headers={"X-Routing-Key": "fuzz"})
            assert answer.status_int in (200, 400, 404, 503), (path, answer.status_int, answer.text)
        answer = self.client.post_json("/models/ok/predict", {"instances": [ROW]})
        assert answer.json["predictions"] == self.expected, answer.text


def _no_constant(token):
    raise AssertionError(f"non-standard JSON token {token} in an answer")


# -- the run ----------------------------------------------------------------------------------------


def run(mutations, seed, timeout=10.0, save=None, progress=None):
    """Fuzz; returns {"counts": {outcome: n}, "findings": [...], "seconds": s, "mutations": n}."""
    import logging

    service_logger, level = logging.getLogger("service"), logging.getLogger("service").level
    service_logger.setLevel(logging.CRITICAL)       # each refusal is logged: thousands of lines
    try:
        return _run(mutations, seed, timeout, save, progress)
    finally:
        service_logger.setLevel(level)


def _run(mutations, seed, timeout, save, progress):
    rng = random.Random(seed)
    counts, findings, started = collections.Counter(), [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="settings-fuzz-") as folder:
        bench = Bench(folder)
        for number in range(mutations):
            data, changes = mutant(rng)
            try:
                with time_limit(timeout):
                    outcome, detail = bench.evaluate(data), None
            except Hang as hang:
                outcome, detail = "hang", str(hang)
            except Exception as error:  # a finding: what the service let through
                outcome, detail = "error", f"{type(error).__name__}: {str(error)[:400]}"
            counts[outcome] += 1
            if outcome in FINDINGS:
                findings.append({"number": number, "outcome": outcome, "detail": detail, "changes": changes})
                if save:
                    os.makedirs(save, exist_ok=True)
                    with open(os.path.join(save, f"finding-{seed}-{number}.json"), "wb") as handle:
                        handle.write(data)
                bench = Bench(tempfile.mkdtemp(prefix="settings-fuzz-", dir=folder))   # a clean start
            if progress and (number + 1) % progress == 0:
                print(f"{number + 1} mutations, {dict(counts)}, {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
    return {"counts": dict(counts), "findings": findings, "seconds": time.monotonic() - started,
            "mutations": mutations}


def summary(report, seed):
    """The report as lines: every finding with the changes that made its mutant, then each outcome's count."""
    lines = [f"FINDING {finding['outcome']} #{finding['number']}: {finding['detail']}\n"
             f"    after: {'; '.join(finding['changes'])}" for finding in report["findings"]]
    counts = ", ".join(f"{outcome} {report['counts'].get(outcome, 0)}" for outcome in FINE + FINDINGS)
    return lines + [f"{report['mutations']} mutations in {report['seconds']:.0f} s (seed {seed}): {counts}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one step may take (default 10)")
    parser.add_argument("--save", metavar="DIR", help="write each finding's file here")
    options = parser.parse_args(argv)
    sys.path[:0] = [ROOT, HERE]
    report = run(options.mutations, options.seed, options.timeout, options.save, progress=500)
    print("\n".join(summary(report, options.seed)))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
