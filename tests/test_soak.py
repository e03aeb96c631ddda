"""Bounded soak test (item 20 of the hardening checklist): a real `python service.py` (waitress)
under steady load from real HTTP clients while new versions are published again and again.  Its
memory, descriptors and threads must stay flat, and no request may fail or stall.

Duration: MODEL_SERVICE_SOAK_SECONDS (default 75, at least 60) is how long the load runs, and
MODEL_SERVICE_SOAK_SWAP_SECONDS (default 10, at least 3) how often a new version is published.
For a long soak:

    MODEL_SERVICE_SOAK_SECONDS=1800 MODEL_SERVICE_SOAK_SWAP_SECONDS=30 python -m pytest -q tests/test_soak.py -s

Only this test reads the variables; the server it starts gets an environment without any
MODEL_SERVICE_* variable.  The default run takes about 85 s.  With `-s` the figures are
printed (each swap as it happens, the rest at the end); pytest also shows them when the test fails.

What runs.  A store holds `iris/1/model.joblib`, served by `python service.py --poll-interval 0.5`
on 127.0.0.1 with the default version policy (latest only) and the default 4 threads.  CLIENTS
client threads each keep one HTTP/1.1 keep-alive connection (http.client) and send a 4-row predict
request on a fixed schedule of CLIENT_RATE a second.  That is 150 req/s in all, steady; at 3-5 ms
of server CPU per request it is about half of what the service can answer, so latency measures the
service and not a queue.  Every SWAP_SECONDS the test publishes the next version the way README
says (write `<store>/iris/<n>/model.joblib.tmp`, then os.replace it into place).  It waits until a
client is answered by that version, then moves the folder of the version before the previous one
out of the store.  That is a retention policy: the store and the catalogue stay the same size however long the
soak runs, and removing a version gets exercised too.  Every second a sampler reads the server's
/proc entries: VmRSS and Threads from status, the entries of fd/, and CPU time from stat.

Why k-nearest-neighbours and not a LogisticRegression.  An iris LogisticRegression is a few KiB,
so a server that never freed an old version would not show it in its RSS.  Each version here is a
KNeighborsClassifier fitted on iris resampled to 200,000 jittered rows.  It holds about 16 MiB
(the rows, the KD-tree's copy and index, the labels), as a nearest-neighbour model really does.
Three such models are fitted and serialised once, before the load starts, and published in turn.
Fitting and pickling 16 MiB in the test process during the load would stall its client threads on
the GIL.

Budgets, and why.  The figures count from the end of a warm-up of max(25 s, 20 % of the run, three
swaps and 5 s).  By then the first requests and the first three swaps have set the allocator's
high-water mark (glibc keeps the heap of a freed model for the next one: RSS climbs by one or two
models over the first swaps, then stays flat; in one CI run it took the third swap, so a warm-up of
two swaps measured that step as growth).  The measured samples are split in quarters: the first
quarter is "early", the last "late".  In the default run two swaps lie between them.  Each
"Checked" below is a run of this test against a copy of service.py with that defect put in.
  * Memory: median late RSS <= median early RSS + max(16 MiB, 10 %).  If old versions leaked, RSS
    would grow ~16 MiB per swap, which fails after two swaps.  A per-request leak fails above
    about 5 KiB per request (the ~29 MiB budget over the ~30 s between the two medians at 150 req/s).  The check uses medians
    because RSS rises by one model for the moment a new version loads beside the old one.  A hard
    ceiling, max RSS <= early median + that budget + 3 models, catches a transient blow-up.
    (Checked: keeping every retired model fails with +80 MiB.)
  * Threads: late median <= early median + 1, and never more than early median + 4 (a loader
    thread exists only while a version loads).  (Checked: one thread left per swap fails with +5.)
  * Descriptors: late median <= early median + 1, and never more than early median + 8, so one
    descriptor left open per swap (an artifact) or per request fails.  The descriptors that
    appeared or went are printed.  (Checked: one artifact left open per swap fails with +5, and
    the open artifacts are named.)
  * Requests: no failures at all.  Every answer is 200, names model iris, and gives the
    predictions of the version it names (checked against the model the test published).  For each
    client the version never goes back.  Every published version answers some request, and does so
    within SWAP_TIMEOUT s of being published.  At the end the old version is UNLOADED and /readyz
    counts 1 loaded.  The server's log has no traceback and no ERROR line, and there is one
    "now answers with version" line per swap.  The server exits 0 on SIGTERM.
  * Latency, from send to answer: after the warm-up, p99 <= 250 ms, and every 10 s window's p99
    <= 500 ms.  No request of the run takes more than 1 s (the stall budget).  In runs here, beside
    the rest of the test suite or benchmarks, p50 was 3-12 ms and p99 13-40 ms (a 10 s window at
    most 65 ms), so a busy shared machine has 4x room or more.  A broad slowdown (GC over a leaked
    heap, lock contention) still fails, and so does any stall of a second: a swap that blocks
    requests while a version loads, or a stuck worker.  (Checked: holding the registry's lock for
    1.5 s at each swap fails, with a slowest request of 1540 ms.)  Latency is also measured from
    when each request was due on the schedule: a client that falls behind sends at once until it
    catches up.  That p99 must stay under 2 s, which means the service kept up with the offered
    load.
  * CPU: the server's CPU time per request in the late quarter <= 2x the early quarter's.  Unlike
    wall-clock latency this hardly depends on what else runs (3.6-5.3 ms per window in a 300 s run
    beside the full test suite), so a per-request cost that grows with the run fails even on a
    noisy machine.  An example is work that grows with every swap.
  * Not a verdict: waitress's "Task queue depth" warnings are counted and shown.  waitress counts
    a worker busy until it has looped back to wait, so on a starved machine a worker that has
    answered but not yet run again makes the next request look queued.  Depth-1 warnings appear
    even with 3 connections for 4 threads: 5 in 40 s at load average 4.  Stuck workers would show
    in the latency budgets.
"""

import bisect
import collections
import gc
import http.client
import io
import json
import os
import shutil
import statistics
import threading
import time

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.neighbors import KNeighborsClassifier

from support import LiveServer, free_port, service_command

pytestmark = pytest.mark.slow          # minutes of load: `python -m pytest -m "not slow"` leaves it out

SOAK_SECONDS_VARIABLE = "MODEL_SERVICE_SOAK_SECONDS"
SWAP_SECONDS_VARIABLE = "MODEL_SERVICE_SOAK_SWAP_SECONDS"
DEFAULT_SOAK_SECONDS = 75
DEFAULT_SWAP_SECONDS = 10
POLL_INTERVAL = 0.5
CLIENTS = 3                        # fewer connections than the server's 4 threads
CLIENT_RATE = 50.0                 # requests per second per client
SAMPLE_SECONDS = 1.0
WINDOW_SECONDS = 10.0
SWAP_TIMEOUT = 15.0                # a published version must answer within this (2 looks 0.5 s apart + a load)
REQUEST_TIMEOUT = 30.0
TRAINING_ROWS = 200_000            # ~16 MiB per version in memory
MODEL_POOL = 3

MEMORY_BUDGET_MIB = 16.0
MEMORY_BUDGET_FRACTION = 0.10
THREAD_SLACK, THREAD_CEILING = 1, 4
FD_SLACK, FD_CEILING = 1, 8
P99_BUDGET_MS = 250.0
WINDOW_P99_BUDGET_MS = 500.0
STALL_BUDGET_MS = 1000.0
SCHEDULE_P99_BUDGET_MS = 2000.0
CPU_GROWTH = 2.0

IRIS = load_iris()
ROWS = IRIS.data[[0, 70, 77, 133]]     # a setosa, and versicolor/virginica rows near their border
BODY = json.dumps({"instances": ROWS.tolist()}).encode()
HEADERS = {"Content-Type": "application/json"}


def seconds_from_environment(variable, default, minimum):
    text = os.environ.get(variable, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        pytest.fail(f"{variable}={text!r}: expected a number of seconds")
    if value < minimum:
        pytest.fail(f"{variable}={text!r}: at least {minimum} seconds")
    return value


@pytest.fixture(scope="module")
def model_pool():
    """[(joblib bytes, predictions on ROWS)]: three KNN models of ~16 MiB each, serialised once."""
    pool = []
    for seed, neighbours in zip(range(MODEL_POOL), (1, 5, 15)):
        rng = np.random.default_rng(seed)
        index = rng.integers(0, len(IRIS.target), TRAINING_ROWS)
        features = IRIS.data[index] + rng.normal(0.0, 0.05, (TRAINING_ROWS, 4))
        model = KNeighborsClassifier(n_neighbors=neighbours).fit(features, IRIS.target[index])
        buffer = io.BytesIO()
        joblib.dump(model, buffer)
        pool.append((buffer.getvalue(), model.predict(ROWS).tolist()))
    return pool


###############################################################################
# Helpers
###############################################################################


def publish(store, version, data):
    """README's way: write under a temporary name in the version's folder, then rename into place."""
    final = os.path.join(store, "iris", str(version), "model.joblib")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with open(final + ".tmp", "wb") as handle:
        handle.write(data)
    os.replace(final + ".tmp", final)


def proc_sample(pid):
    """(RSS MiB, threads, open fds, CPU seconds, what the fds are) of a live process, from /proc."""
    rss = threads = None
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:     # closed meanwhile
            continue
        targets.append(target.partition(":[")[0] if target.startswith(("socket:", "pipe:")) else target)
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime
    return rss, threads, len(targets), cpu, tuple(sorted(targets))


def call(port, method, path, body=None, headers=None):
    """One request on a connection of its own, closed after: (status, body text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def percentile(values, fraction):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median_of(samples, column):
    return statistics.median(sample[column] for sample in samples)


class Client(threading.Thread):
    """One keep-alive connection sending predict requests on a fixed schedule; records every outcome.

    The schedule is CLIENT_RATE requests a second from `offset` on.  It is kept whatever happens: a
    client that falls behind sends at once until it catches up.  records: (due at, in seconds since
    the start; seconds from sent to answered; status or None; version or None; error text or None;
    seconds from due to answered).  An exception is recorded as a failure and the connection reopened.
    """

    def __init__(self, port, start, offset, stop, expected, newest):
        super().__init__(daemon=True)
        self.port, self.start_time, self.offset, self.stop = port, start, offset, stop
        self.expected, self.newest = expected, newest
        self.records = []

    def run(self):
        interval = 1.0 / CLIENT_RATE
        connection = None
        due = self.start_time + self.offset
        while not self.stop.is_set():
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            sent = time.monotonic()
            status = version = error = None
            try:
                connection.request("POST", "/models/iris/predict", body=BODY, headers=HEADERS)
                response = connection.getresponse()
                payload = response.read()
                answered = time.monotonic()
                status = response.status
                body = json.loads(payload)
                version = body.get("version")
                if status != 200:
                    error = payload[:300].decode(errors="replace")
                elif body.get("model") != "iris" or version not in self.expected:
                    error = f"unexpected answer: {payload[:300]!r}"
                elif body.get("predictions") != self.expected[version]:
                    error = f"version {version} predicted {body.get('predictions')}, expected {self.expected[version]}"
                else:
                    with self.newest[1]:
                        self.newest[0] = max(self.newest[0], int(version))
            except Exception as problem:  # recorded, never raised: a thread's exception would be lost
                answered = time.monotonic()
                error = f"{type(problem).__name__}: {problem}"
                connection.close()
                connection = None
            self.records.append((due - self.start_time, answered - sent, status, version, error, answered - due))
            due += interval
        if connection is not None:
            connection.close()


class Sampler(threading.Thread):
    """Samples the server every SAMPLE_SECONDS: (seconds since the start, *proc_sample(pid))."""

    def __init__(self, pid, start, stop):
        super().__init__(daemon=True)
        self.pid, self.start_time, self.stop = pid, start, stop
        self.samples, self.error = [], None

    def run(self):
        while True:
            try:
                self.samples.append((time.monotonic() - self.start_time, *proc_sample(self.pid)))
            except Exception as problem:  # the process went away: reported by the test
                self.error = f"{type(problem).__name__}: {problem}"
                return
            if self.stop.wait(SAMPLE_SECONDS):
                return


###############################################################################
# The soak
###############################################################################


def test_soak_memory_descriptors_threads_stay_flat_and_no_request_fails_while_versions_swap(
        tmp_path, model_pool, record_property):
    duration = seconds_from_environment(SOAK_SECONDS_VARIABLE, DEFAULT_SOAK_SECONDS, 60)
    swap_every = seconds_from_environment(SWAP_SECONDS_VARIABLE, DEFAULT_SWAP_SECONDS, 3)
    warmup = max(25.0, 0.2 * duration, 3 * swap_every + 5.0)
    if warmup > duration - 20:
        pytest.fail(f"{SOAK_SECONDS_VARIABLE}={duration:g} with a version every {swap_every:g} s leaves under "
                    f"20 s after the {warmup:g} s warm-up")

    store = tmp_path / "store"
    retired = tmp_path / "retired"         # same file system: taking a folder out of the store is one rename
    retired.mkdir()
    expected = {}                          # version -> its predictions on ROWS

    def publish_version(number):
        data, predictions = model_pool[(number - 1) % len(model_pool)]
        expected[str(number)] = predictions
        publish(store, number, data)

    publish_version(1)
    port = free_port()
    server = LiveServer(service_command(store, port, "--poll-interval", str(POLL_INTERVAL)), port)
    lines = []

    def say(text=""):
        lines.append(text)
        print(text, flush=True)

    stop = threading.Event()
    newest = [1, threading.Lock()]         # the highest version a client was answered by, and its lock
    clients, sampler, swaps = [], None, []  # swaps: (version, seconds from publishing to its first answer, or None)
    status = ready = metrics_start = metrics_end = None
    say()
    with server:
        process = server.process
        try:
            gc.collect()                        # requests' last response holds its connection until collected
            code, text = call(port, "POST", "/models/iris/predict", BODY, HEADERS)
            assert code == 200 and json.loads(text)["version"] == "1", text     # loaded: the imports are done
            metrics_start = len(call(port, "GET", "/metrics")[1].splitlines())

            start = time.monotonic()
            sampler = Sampler(process.pid, start, stop)
            sampler.start()
            clients = [Client(port, start, index / (CLIENT_RATE * CLIENTS), stop, expected, newest)
                       for index in range(CLIENTS)]
            for client in clients:
                client.start()

            version = 1
            while start + version * swap_every <= start + duration - 3 and process.poll() is None:
                time.sleep(max(0.0, start + version * swap_every - time.monotonic()))
                version += 1
                published = time.monotonic()
                publish_version(version)
                deadline = published + SWAP_TIMEOUT
                while newest[0] < version and time.monotonic() < deadline and process.poll() is None:
                    time.sleep(0.02)
                seen = newest[0] >= version
                swaps.append((version, time.monotonic() - published if seen else None))
                say(f"{published - start:6.1f} s: published version {version}, " + (
                    f"answering after {swaps[-1][1]:.2f} s" if seen else f"NOT answering after {SWAP_TIMEOUT:g} s"))
                if seen:                        # keep the served version and the one before it in the store
                    for old in sorted(int(p.name) for p in (store / "iris").iterdir() if p.name.isdigit()):
                        if old < version - 1:
                            os.replace(store / "iris" / str(old), retired / str(old))
                            shutil.rmtree(retired / str(old))
            time.sleep(max(0.0, start + duration - time.monotonic()))
        finally:
            stop.set()
            for thread in clients + ([sampler] if sampler else []):
                thread.join(timeout=REQUEST_TIMEOUT + 10)
            if process.poll() is None and clients:
                try:
                    status = json.loads(call(port, "GET", "/models/iris")[1])
                    ready = json.loads(call(port, "GET", "/readyz")[1])
                    metrics_end = len(call(port, "GET", "/metrics")[1].splitlines())
                except Exception as problem:  # shown below with the figures
                    status = ready = {"error": f"{type(problem).__name__}: {problem}"}
            alive_at_the_end = process.poll() is None
    elapsed = time.monotonic() - start
    returncode = server.returncode
    server_log = server.output()

    # -- figures ------------------------------------------------------------------
    records = sorted((record for client in clients for record in client.records), key=lambda record: record[0])
    due_times = [record[0] for record in records]

    def due_between(begin, end):
        """The records due in [begin, end) (records are sorted by due time)."""
        return records[bisect.bisect_left(due_times, begin):bisect.bisect_left(due_times, end)]

    failures = [record for record in records if record[4] is not None or record[2] != 200]
    samples = sampler.samples
    measured = [s for s in samples if s[0] >= warmup]
    quarter = max(3, len(measured) // 4)
    early, late = measured[:quarter], measured[-quarter:]
    assert len(measured) >= 12 and sampler.error is None and alive_at_the_end, \
        f"the server died during the soak ({sampler.error}):\n{server_log[-3000:]}\n" + "\n".join(lines)

    def cpu_per_request(chosen):
        """Server CPU milliseconds per request due between the first and the last sample chosen."""
        if len(chosen) < 2:
            return float("nan")
        count = len(due_between(chosen[0][0], chosen[-1][0]))
        return (chosen[-1][4] - chosen[0][4]) * 1000 / count if count else float("nan")

    say(f"soak: {duration:g} s of load ({elapsed:.1f} s in all), {CLIENTS} clients x {CLIENT_RATE:g} req/s, "
        f"a version every {swap_every:g} s, warm-up {warmup:g} s; server pid {process.pid}")
    say(f"requests: {len(records)} ({len(records) / duration:.1f} req/s), failed: {len(failures)}")
    say("window        requests  req/s  p50 ms  p99 ms  max ms  p99 due ms  failed  RSS MiB  thr  fds  cpu ms/req")
    windows = []
    for begin in np.arange(0.0, duration, WINDOW_SECONDS):
        inside = due_between(begin, begin + WINDOW_SECONDS)
        latencies = [r[1] * 1000 for r in inside]
        bad = sum(1 for r in inside if r[4] is not None or r[2] != 200)
        windows.append((begin, percentile(latencies, 0.99)))
        span = min(WINDOW_SECONDS, duration - begin)
        chosen = [s for s in samples if begin <= s[0] < begin + WINDOW_SECONDS]
        process_figures = (f"{median_of(chosen, 1):8.1f} {max(s[2] for s in chosen):4d} "
                           f"{max(s[3] for s in chosen):4d} {cpu_per_request(chosen):11.2f}") if chosen else ""
        say(f"{begin:5.0f}-{begin + span:<5.0f} {len(inside):10d} {len(inside) / span:6.1f} "
            f"{percentile(latencies, 0.5):7.1f} {windows[-1][1]:7.1f} {max(latencies, default=float('nan')):7.1f} "
            f"{percentile([r[5] * 1000 for r in inside], 0.99):11.1f} {bad:7d} {process_figures}")
    steady = [r[1] * 1000 for r in records if r[0] >= warmup]
    steady_p50, steady_p99 = percentile(steady, 0.5), percentile(steady, 0.99)
    schedule_p99 = percentile([r[5] * 1000 for r in records if r[0] >= warmup], 0.99)
    slowest = max(r[1] * 1000 for r in records)
    say(f"after the warm-up: {len(steady)} requests, p50 {steady_p50:.1f} ms, p99 {steady_p99:.1f} ms "
        f"(from due: p99 {schedule_p99:.1f} ms); slowest request of the run {slowest:.1f} ms")
    swap_times = [seconds for _, seconds in swaps if seconds is not None]
    say(f"swaps: {len(swaps)} published, {len(swap_times)} answering within {SWAP_TIMEOUT:g} s"
        + (f" (publish to first answer: median {statistics.median(swap_times):.2f} s, max {max(swap_times):.2f} s)"
           if swap_times else ""))
    say("samples (s, RSS MiB, threads, fds, CPU s):")
    for label, chosen in (("start", samples[:3]), ("early", early[:3]), ("end", samples[-3:])):
        say(f"  {label:5s} " + "; ".join(f"{s[0]:.0f} s {s[1]:.1f} MiB {s[2]} thr {s[3]} fd {s[4]:.2f} cpu"
                                         for s in chosen))
    rss_early, rss_late = median_of(early, 1), median_of(late, 1)
    rss_budget = max(MEMORY_BUDGET_MIB, MEMORY_BUDGET_FRACTION * rss_early)
    rss_max = max(s[1] for s in measured)
    rss_trend = np.polyfit([s[0] for s in measured], [s[1] for s in measured], 1)[0] * 60 * 1024   # KiB/min
    model_mib = len(model_pool[0][0]) / 2**20
    threads_early, threads_late, threads_max = median_of(early, 2), median_of(late, 2), max(s[2] for s in measured)
    fds_early, fds_late, fds_max = median_of(early, 3), median_of(late, 3), max(s[3] for s in measured)
    cpu_early, cpu_late = cpu_per_request(early), cpu_per_request(late)
    early_fds = collections.Counter(target.replace(os.fspath(tmp_path), "<tmp>") for target in early[0][5])
    late_fds = collections.Counter(target.replace(os.fspath(tmp_path), "<tmp>") for target in late[-1][5])
    opened, closed = late_fds - early_fds, early_fds - late_fds
    say(f"RSS: early median {rss_early:.1f} MiB, late median {rss_late:.1f} MiB (growth {rss_late - rss_early:+.1f}, "
        f"budget {rss_budget:.1f}), max {rss_max:.1f} MiB, trend {rss_trend:+.0f} KiB/min; "
        f"a version is {model_mib:.1f} MiB")
    say(f"threads: early {threads_early:g}, late {threads_late:g}, max {threads_max}; "
        f"fds: early {fds_early:g}, late {fds_late:g}, max {fds_max} "
        f"(at {late[-1][0]:.0f} s vs {early[0][0]:.0f} s: more {dict(opened) or '-'}, fewer {dict(closed) or '-'})")
    say(f"server CPU per request: early {cpu_early:.2f} ms, late {cpu_late:.2f} ms")
    queued = [line for line in server_log.splitlines() if "Task queue depth" in line]
    warned = [line for line in server_log.splitlines() if " WARNING " in line and "Task queue depth" not in line]
    say(f"server: exit code {returncode}; latest version {status and status.get('latest_version')}; readyz {ready}; "
        f"/metrics {metrics_start} lines after the first request, {metrics_end} at the end")
    say(f"server log: {len(server_log.splitlines())} lines, {len(queued)} queue-depth warnings, "
        f"{len(warned)} other warnings" + "".join(f"\n  {line}" for line in (queued + warned)[:6]))
    for key, value in (("requests", len(records)), ("failed", len(failures)), ("p99_ms", round(steady_p99, 1)),
                       ("swaps", len(swaps)), ("rss_growth_mib", round(rss_late - rss_early, 1))):
        record_property(key, value)
    figures = "\n".join(lines)

    # -- verdicts -----------------------------------------------------------------
    assert all(not thread.is_alive() for thread in clients), f"a client did not stop\n{figures}"
    assert len(records) > 0.5 * CLIENTS * CLIENT_RATE * duration, f"too few requests were sent\n{figures}"
    assert failures == [], f"{len(failures)} failed requests, the first: {failures[:5]}\n{figures}"
    for client in clients:
        seen = [int(r[3]) for r in client.records]
        assert seen == sorted(seen), f"a client saw the version go back: {seen}\n{figures}"
    assert len(swaps) >= int(duration / swap_every) - 1, f"too few swaps\n{figures}"
    assert all(seconds is not None for _, seconds in swaps), \
        f"versions not answering within {SWAP_TIMEOUT:g} s of publishing: {swaps}\n{figures}"
    assert {r[3] for r in records} == set(expected), f"not every published version answered\n{figures}"
    assert "error" not in status and status["latest_version"] == str(version), f"{status}\n{figures}"
    states = {v["version"]: v["state"] for v in status["versions"]}
    assert states == {str(version - 1): "UNLOADED", str(version): "AVAILABLE"}, f"{states}\n{figures}"
    assert ready["ready"] is True and ready["loaded"] == 1, f"{ready}\n{figures}"

    assert rss_late - rss_early <= rss_budget, \
        f"memory grew {rss_late - rss_early:.1f} MiB (budget {rss_budget:.1f})\n{figures}"
    assert rss_max <= rss_early + rss_budget + 3 * model_mib, f"memory peaked at {rss_max:.1f} MiB\n{figures}"
    assert threads_late <= threads_early + THREAD_SLACK and threads_max <= threads_early + THREAD_CEILING, \
        f"threads grew\n{figures}"
    assert fds_late <= fds_early + FD_SLACK and fds_max <= fds_early + FD_CEILING, f"descriptors grew\n{figures}"

    assert slowest <= STALL_BUDGET_MS, f"a request took {slowest:.0f} ms\n{figures}"
    assert steady_p99 <= P99_BUDGET_MS, f"p99 {steady_p99:.1f} ms after the warm-up\n{figures}"
    slow_windows = [(begin, round(p99, 1)) for begin, p99 in windows if p99 > WINDOW_P99_BUDGET_MS]
    assert slow_windows == [], f"windows with p99 over {WINDOW_P99_BUDGET_MS:g} ms: {slow_windows}\n{figures}"
    assert schedule_p99 <= SCHEDULE_P99_BUDGET_MS, f"the clients fell behind their schedule\n{figures}"
    assert cpu_late <= CPU_GROWTH * cpu_early, \
        f"server CPU per request grew from {cpu_early:.2f} to {cpu_late:.2f} ms\n{figures}"

    assert returncode == 0, f"the server exited with {returncode}\n{server_log[-3000:]}\n{figures}"
    problems = [line for line in server_log.splitlines() if "Traceback" in line or " ERROR " in line]
    assert problems == [], f"the server's log: {problems[:10]}\n{figures}"
    assert server_log.count("now answers with version") == len(swaps), f"{server_log[-3000:]}\n{figures}"
