"""Model lifecycle on live servers over loopback: graceful shutdown of `python service.py`, hot
reload inside gunicorn's forked workers, --max-loaded under load, half-written artifacts and
single-flight first loads.  Real processes, real models trained on scikit-learn's bundled data,
no mocks; every server binds 127.0.0.1 on a free port."""

import concurrent.futures
import contextlib
import http.client
import itertools
import json
import os
import pickle
import random
import re
import signal
import socket
import threading
import time

import pytest
import requests
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from doubles import SlowModel, SlowToLoad
from support import (ROWS, TIMEOUT, LiveServer, free_port, gunicorn_command, publish, service_command, stays_true,
                     wait_until, write_artifact)

pytestmark = pytest.mark.slow          # every test runs its own server processes for seconds

BUSY_STATES = ("AVAILABLE", "LOADING", "UNLOADING")     # states that hold (or are about to hold) memory

###############################################################################
# Helpers
###############################################################################


def start_slow_request(pool, server):
    """Submit a predict on the slow model and return its future once the server counts it in flight."""
    slow = pool.submit(requests.post, server.base + "/models/slow/predict", json={"instances": ROWS},
                       timeout=60)
    wait_until(lambda: version_info(requests.get(server.base + "/models/slow", timeout=TIMEOUT).json(),
                                    "1")["in_flight"] == 1)
    return slow


@contextlib.contextmanager
def a_long_request_in_flight(tmp_path, *flags):
    """`python service.py FLAGS` over a model that takes 20 s to answer, with a request to it in flight:
    yields (the server, the request's future, when it was sent)."""
    store = tmp_path / "store"
    write_artifact(store / "slow.pkl", SlowModel(20.0), "pickle")
    port = free_port()
    with LiveServer(service_command(store, port, *flags), port) as server, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        yield server, start_slow_request(pool, server), started


def get_json(connection, path):
    """GET over an already open http.client connection (kept alive) -> (status, JSON body)."""
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def refused(port):
    """True once nothing listens on the port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def read_by_the_server(port, client):
    """True once the server on `port` has accepted `client`'s connection and read all it was sent: in the
    kernel's table of TCP sockets (Linux), the server's end has an owner and an empty receive queue."""
    server_end, client_end = f"0100007F:{port:04X}", f"0100007F:{client.getsockname()[1]:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()          # sl, local, remote, state, tx_queue:rx_queue, ..., inode (10th)
            if fields[1] == server_end and fields[2] == client_end:
                return fields[9] != "0" and int(fields[4].split(":")[1], 16) == 0
    return False


def version_info(status, version):
    return {v["version"]: v for v in status["versions"]}.get(version)


###############################################################################
# Graceful shutdown of `python service.py` (waitress)
###############################################################################

SLOW_SECONDS = 2.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_the_request_in_flight_refuses_new_connections_and_exits_0(tmp_path, signum):
    """Proves the documented drain: once signalled, /readyz answers 503 on an open keep-alive connection,
    the listening socket closes (connections refused) while a slow request is still running, that request
    then completes with 200 and the right answer, and the process exits with code 0."""
    store = tmp_path / "store"
    write_artifact(store / "slow.pkl", SlowModel(SLOW_SECONDS), "pickle")
    port = free_port()
    with LiveServer(service_command(store, port), port) as server:
        keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            assert get_json(keepalive, "/readyz")[0] == 200
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                slow = pool.submit(requests.post, server.base + "/models/slow/predict",
                                   json={"instances": ROWS}, timeout=60)
                wait_until(lambda: version_info(get_json(keepalive, "/models/slow")[1], "1")["in_flight"] == 1)
                server.process.send_signal(signum)

                status, body = get_json(keepalive, "/readyz")
                assert status == 503 and body["ready"] is False and "shutting down" in body["error"], body
                wait_until(lambda: refused(port), timeout=10)
                assert not slow.done(), "the listening socket must close while the request is still in flight"
                response = slow.result(timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["predictions"] == [0, 0, 0] and response.json()["version"] == "1"
            assert server.process.wait(timeout=TIMEOUT) == 0
        finally:
            keepalive.close()
    output = server.output()
    assert f"{signal.Signals(signum).name}: finishing requests in flight" in output
    assert "Traceback" not in output and "still busy" not in output


def test_shutdown_timeout_bounds_the_wait_for_a_request_in_flight(tmp_path):
    """Proves --shutdown-timeout is a bound: with a 20 s request in flight and --shutdown-timeout 0.5,
    SIGTERM makes the process exit with code 0 well before the request could finish; the cut request
    gets no response (its connection is closed) and the log says so."""
    with a_long_request_in_flight(tmp_path, "--shutdown-timeout", "0.5") as (server, slow, started):
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.process.wait(timeout=TIMEOUT) == 0
        exited = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            slow.result(timeout=60)
    assert exited - signalled < 8, f"exit took {exited - signalled:.2f} s after SIGTERM"
    assert exited - started < 15, "the process waited for the 20 s request"
    assert "shutdown timeout: 1 connection(s) still busy are closed" in server.output()


def test_a_second_signal_stops_at_once(tmp_path):
    """Proves the documented escape hatch: after a first SIGTERM starts draining a 20 s request (with
    --shutdown-timeout 30 s), a second SIGTERM stops the process at once with code 0."""
    with a_long_request_in_flight(tmp_path, "--shutdown-timeout", "30") as (server, slow, started):
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(server.port), timeout=10)         # draining: the first signal was handled
        assert server.process.poll() is None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=TIMEOUT) == 0
        exited = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            slow.result(timeout=60)
    assert exited - started < 15, "the second signal did not stop the drain"
    assert "stopped at once" in server.output()


def test_a_request_whose_body_is_still_arriving_at_the_signal_is_let_finish(tmp_path, iris, iris_classifier):
    """Proves a request in flight while its body is still being uploaded is drained like any other:
    headers and part of the body are sent, SIGTERM arrives, the listening socket closes, then the rest
    of the body comes and the request is answered 200.  (Regression test: an earlier serve() counted
    only complete requests as busy and closed such a connection without an answer.)"""
    store = tmp_path / "store"
    write_artifact(store / "iris.joblib", iris_classifier, "joblib")
    rows = iris[0][:3]
    body = json.dumps({"instances": rows.tolist()}).encode()
    head = (f"POST /models/iris/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    port = free_port()
    with LiveServer(service_command(store, port), port) as server:
        warm = requests.post(server.base + "/models/iris/predict", json={"instances": rows.tolist()},
                             timeout=TIMEOUT)
        assert warm.status_code == 200, warm.text                  # loaded: the drain waits for nothing else
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as upload:
            upload.sendall(head + body[:10])
            wait_until(lambda: read_by_the_server(port, upload), what="the server to read the headers")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(port), timeout=10)
            stays_true(lambda: server.process.poll() is None, 0.3,    # the drain waits for the body
                       what="the server waits for the rest of the body")
            try:
                upload.sendall(body[10:])
                chunks = []
                while chunk := upload.recv(65536):
                    chunks.append(chunk)
            except ConnectionError:
                chunks = []
        answer = b"".join(chunks)
        assert server.process.wait(timeout=TIMEOUT) == 0
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["predictions"] == iris_classifier.predict(rows).tolist()


###############################################################################
# gunicorn: hot reload in every forked worker
###############################################################################

ACCESS_FORMAT = "%(p)s %({x-test-id}i)s %(s)s"
ACCESS_LINE = re.compile(r"<(\d+)> (\S+) (\d{3})")


def logged_gunicorn_command(port, access_log):
    """gunicorn with 2 sync workers, each logging the requests it serves (pid, X-Test-Id, status) to access_log."""
    return gunicorn_command(port, "-w", "2", "-k", "sync", "--access-logfile", os.fspath(access_log),
                            "--access-logformat", ACCESS_FORMAT)


def access_log(path):
    """[(worker pid, X-Test-Id, status)] in the order each worker served them (sync workers log in order)."""
    if not os.path.exists(path):
        return []
    return [(int(m[1]), m[2], int(m[3])) for m in map(ACCESS_LINE.fullmatch, path.read_text().splitlines()) if m]


def test_gunicorn_workers_all_swap_to_a_published_version_without_failing_a_request(tmp_path, iris_classifier,
                                                                                     named_labels_classifier):
    """Proves hot reload works in every forked gunicorn worker under load: 4 clients predict without
    pause while version 2 is published (write-then-rename); no request fails, every answer matches
    the version it names, both workers served version 1 and then switch to 2, and -- per worker, in the
    order it served requests (gunicorn's access log, with the worker's pid) -- never go back to 1."""
    store = tmp_path / "store"
    publish(store / "m" / "1" / "model.joblib", iris_classifier)
    expected = {"1": [0, 2], "2": ["setosa", "virginica"]}
    log_path = tmp_path / "access.log"
    port = free_port()
    env = {"MODEL_SERVICE_STORE": os.fspath(store), "MODEL_SERVICE_POLL_INTERVAL": "0.2"}
    results, stop = {}, threading.Event()

    def client(index):
        for number in itertools.count():
            if stop.is_set():
                return number
            test_id = f"c{index}-{number}"
            response = requests.post(f"http://127.0.0.1:{port}/models/m/predict", json={"instances": ROWS[:2]},
                                     headers={"X-Test-Id": test_id}, timeout=TIMEOUT)
            body = response.json() if response.status_code == 200 else response.text
            results[test_id] = (response.status_code, body)

    def workers_versions():
        """{pid: [version, ...]} for the requests whose answer the clients have recorded."""
        served = {}
        for pid, test_id, _ in access_log(log_path):
            if test_id in results:
                status, body = results[test_id]
                served.setdefault(pid, []).append(body["version"] if status == 200 else None)
        return served

    with LiveServer(logged_gunicorn_command(port, log_path), port, env=env) as server:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, index) for index in range(4)]
            try:
                wait_until(lambda: len(workers_versions()) == 2, timeout=TIMEOUT)   # both workers serve v1
                publish(store / "m" / "2" / "model.joblib", named_labels_classifier)
                wait_until(lambda: all(versions[-1] == "2" for versions in workers_versions().values()),
                           timeout=TIMEOUT)
                wait_until(lambda: all(versions.count("2") >= 10 for versions in workers_versions().values()),
                           timeout=TIMEOUT, what="each worker to answer with version 2 a while")
            finally:
                stop.set()
            sent = sum(future.result() for future in clients)
        wait_until(lambda: sum(test_id in results for _, test_id, _ in access_log(log_path)) == sent)
    assert "Traceback" not in server.output()

    assert len(results) == sent > 20
    failures = {test_id: result for test_id, result in results.items() if result[0] != 200}
    assert failures == {}
    for status, body in results.values():
        assert body["predictions"] == expected[body["version"]], body
    served = workers_versions()
    assert len(served) == 2, f"expected 2 gunicorn workers, saw pids {sorted(served)}"
    for pid, versions in served.items():
        assert versions[0] == "1" and versions[-1] == "2", f"worker {pid}: {versions}"
        assert versions == sorted(versions), f"worker {pid} went back from version 2 to 1: {versions}"


def test_gunicorn_workers_load_a_published_version_in_the_background_without_requests(tmp_path, iris_classifier,
                                                                                      named_labels_classifier):
    """Proves the watcher thread runs in each forked gunicorn worker: with MODEL_SERVICE_PRELOAD=all,
    after each worker has answered once, a version published while no request at all arrives is
    loaded by every worker on its own -- the very first status each worker gives afterwards already
    shows version 2 AVAILABLE and answering (a request-driven rescan would only just have seen it)."""
    store = tmp_path / "store"
    publish(store / "m" / "1" / "model.joblib", iris_classifier)
    log_path = tmp_path / "access.log"
    port = free_port()
    env = {"MODEL_SERVICE_STORE": os.fspath(store), "MODEL_SERVICE_POLL_INTERVAL": "0.2",
           "MODEL_SERVICE_PRELOAD": "all"}
    counter = itertools.count()

    def ask_every_worker(base, phase, done):
        """GET /models/m, several at a time, until done({pid: latest status}); -> {pid: first status}.

        Which worker served which request comes from the access log; a sync worker logs in order."""
        answers = {}

        def ask(_):
            test_id = f"{phase}-{next(counter)}"
            response = requests.get(base + "/models/m", headers={"X-Test-Id": test_id}, timeout=TIMEOUT)
            assert response.status_code == 200, response.text
            answers[test_id] = response.json()

        deadline = time.monotonic() + 60
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            while True:
                list(pool.map(ask, range(8)))
                first, latest = {}, {}
                for pid, test_id, _ in access_log(log_path):
                    if test_id in answers:
                        first.setdefault(pid, answers[test_id])
                        latest[pid] = answers[test_id]
                if done(latest):
                    return first
                assert time.monotonic() < deadline, json.dumps(latest, indent=1)
                time.sleep(0.1)

    def both_preloaded_v1(latest):
        return len(latest) == 2 and all(version_info(s, "1")["state"] == "AVAILABLE" for s in latest.values())

    # gunicorn leaves the service's INFO log unconfigured; this config file (run in the master before it
    # forks) sends it to the server's output, where each worker's load can be awaited without a request.
    logging_config = tmp_path / "gunicorn_logging.py"
    logging_config.write_text("import logging\nlogging.basicConfig(level=logging.INFO)\n")
    command = logged_gunicorn_command(port, log_path)
    command[-1:-1] = ["-c", os.fspath(logging_config)]
    with LiveServer(command, port, env=env) as server:
        before = ask_every_worker(server.base, "before", both_preloaded_v1)   # each worker has v1 in memory
        publish(store / "m" / "2" / "model.joblib", named_labels_classifier)
        wait_until(lambda: server.output().count("loaded model 'm' version 2") >= 2, timeout=TIMEOUT,
                   what="both workers' logs to show version 2 loaded")    # no request: only the watchers can act
        after = ask_every_worker(server.base, "after", lambda latest: len(latest) == 2)
        assert set(after) == set(before), "a worker was replaced"
        for pid, status in after.items():
            v2 = version_info(status, "2")
            assert v2 is not None and v2["state"] == "AVAILABLE" and v2["loads"] == 1, (pid, status)
            assert status["latest_version"] == "2" and v2["preloaded"] is True, (pid, status)
        for _ in range(6):                  # and every worker answers with it
            response = requests.post(server.base + "/models/m/predict", json={"instances": ROWS[:2]},
                                     timeout=TIMEOUT)
            assert response.status_code == 200 and response.json()["version"] == "2", response.text
            assert response.json()["predictions"] == ["setosa", "virginica"]
    assert "Traceback" not in server.output()


###############################################################################
# --max-loaded under concurrent load (waitress)
###############################################################################


def test_max_loaded_bounds_the_versions_in_memory_under_concurrent_load(tmp_path, iris, iris_classifier,
                                                                       named_labels_classifier, record_property):
    """Proves --max-loaded 2 holds under load: 6 clients ask 4 served versions at random for ~3 s; every
    answer is a correct prediction of the version asked, or (rarely) 503 with Retry-After when every
    resident version is busy; a monitor polling GET /models never sees more than 2 versions
    AVAILABLE, LOADING or UNLOADING at once; versions really are evicted and loaded again."""
    features, target = iris
    estimators = {"1": iris_classifier, "2": named_labels_classifier,
                  "3": DecisionTreeClassifier(max_depth=2, random_state=0).fit(features, target),
                  "4": KNeighborsClassifier(3).fit(features, target)}
    store = tmp_path / "store"
    for version, estimator in estimators.items():
        write_artifact(store / "m" / version / "model.joblib", estimator, "joblib")
    (store / "m" / "model-settings.json").write_text('{"version_policy": "all"}')
    expected = {version: estimator.predict(features).tolist() for version, estimator in estimators.items()}
    port = free_port()
    stop = threading.Event()

    def client(seed):
        rng, outcomes, session = random.Random(seed), [], requests.Session()
        with session:
            while not stop.is_set():
                version, rows = rng.choice(sorted(estimators)), rng.sample(range(len(features)), 5)
                response = session.post(f"{base}/models/m/versions/{version}/predict",
                                        json={"instances": features[rows].tolist()}, timeout=TIMEOUT)
                if response.status_code == 200:
                    body = response.json()
                    ok = body["version"] == version and body["predictions"] == [expected[version][r] for r in rows]
                    outcomes.append(200 if ok else ("wrong", version, rows, body))
                elif response.status_code == 503 and response.headers.get("Retry-After") == "1" \
                        and response.json()["code"] == "model_unavailable":
                    outcomes.append(503)
                    time.sleep(0.1)     # a polite client backs off (shorter than Retry-After, to keep the test short)
                else:
                    outcomes.append((response.status_code, dict(response.headers), response.text))
        return outcomes

    def monitor():
        counts, session = [], requests.Session()
        with session:
            while not stop.is_set():
                models = session.get(f"{base}/models", timeout=TIMEOUT).json()["models"]
                counts.append(sum(v["state"] in BUSY_STATES for m in models for v in m["versions"]))
                time.sleep(0.005)
        return counts

    with LiveServer(service_command(store, port, "--max-loaded", "2", "--threads", "8"), port) as server:
        base = server.base
        for version in sorted(estimators):      # warm up: the first load imports scikit-learn (seconds)
            response = requests.post(f"{base}/models/m/versions/{version}/predict",
                                     json={"instances": features[:2].tolist()}, timeout=TIMEOUT)
            assert response.status_code == 200, response.text
        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            watcher = pool.submit(monitor)
            clients = [pool.submit(client, seed) for seed in range(6)]
            time.sleep(3.0)
            stop.set()
            outcomes = [outcome for future in clients for outcome in future.result()]
            counts = watcher.result()
        status = requests.get(base + "/models/m", timeout=TIMEOUT).json()
        ready = requests.get(base + "/readyz", timeout=TIMEOUT).json()
    unavailable = outcomes.count(503)
    record_property("requests", len(outcomes))
    record_property("http_503", unavailable)
    print(f"--max-loaded 2 under load: {unavailable} of {len(outcomes)} requests answered 503")
    assert [o for o in outcomes if o not in (200, 503)] == []
    assert len(outcomes) > 50 and unavailable <= 0.2 * len(outcomes), f"{unavailable} of {len(outcomes)} were 503"
    assert len(counts) > 10 and max(counts) <= 2, f"monitor saw up to {max(counts)} versions in memory"
    assert ready["loaded"] <= 2
    assert sum(v["loads"] for v in status["versions"]) > 8, "few versions were evicted: the bound was hardly tested"
    assert "evicted (least recently used; --max-loaded 2)" in server.output()


###############################################################################
# Half-written artifacts and first loads (waitress)
###############################################################################


def test_a_half_written_artifact_is_never_loaded_by_a_live_server(tmp_path, iris_classifier,
                                                                 named_labels_classifier):
    """Proves the two-looks rule on a live server (--poll-interval 0.3): a version 2 artifact written
    slowly under its final name (no rename) never shows as LOADING, AVAILABLE or FAILED while it grows,
    predictions keep succeeding on version 1 meanwhile, and once complete version 2 loads and serves."""
    store = tmp_path / "store"
    publish(store / "m" / "1" / "model.joblib", iris_classifier)
    data = pickle.dumps(named_labels_classifier)
    chunks = [data[i:i + len(data) // 15 + 1] for i in range(0, len(data), len(data) // 15 + 1)]
    port = free_port()
    stop, complete, answers = threading.Event(), [], []

    def client():
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(f"http://127.0.0.1:{port}/models/m/predict",
                                        json={"instances": ROWS[:2]}, timeout=TIMEOUT)
                answers.append((time.monotonic(), response.status_code, response.json()))

    with LiveServer(service_command(store, port, "--poll-interval", "0.3"), port) as server:
        status = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                predictions = pool.submit(client)
                try:
                    wait_until(lambda: get_json(status, "/models/m")[1]["versions"][0]["state"] == "AVAILABLE")
                    path = store / "m" / "2" / "model.pkl"
                    os.makedirs(path.parent)
                    seen = []
                    with open(path, "wb") as handle:
                        for chunk in chunks:
                            handle.write(chunk)
                            handle.flush()
                            until = time.monotonic() + 0.1
                            while time.monotonic() < until:
                                body = get_json(status, "/models/m")[1]
                                v2 = version_info(body, "2")
                                seen.append((body["latest_version"], v2 and v2["state"]))
                                time.sleep(0.02)
                    complete.append(time.monotonic())
                    assert len(seen) > 20
                    assert {state for _, state in seen} <= {None, "UNLOADED"}, seen
                    assert {latest for latest, _ in seen} == {"1"}, seen
                    wait_until(lambda: get_json(status, "/models/m")[1]["latest_version"] == "2")
                    wait_until(lambda: predictions.done() or [a[2].get("version") for a in answers[-5:]] == ["2"] * 5,
                               what="five answers from version 2")
                finally:
                    stop.set()
                predictions.result()
            body = get_json(status, "/models/m")[1]
        finally:
            status.close()
    assert version_info(body, "2")["state"] == "AVAILABLE" and version_info(body, "2")["loads"] == 1
    assert version_info(body, "1")["state"] == "UNLOADED" and version_info(body, "2")["last_error"] is None
    assert [a for a in answers if a[1] != 200] == []
    versions = [a[2]["version"] for a in answers]
    assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "2"
    assert all(when > complete[0] for when, _, answer in answers if answer["version"] == "2")
    assert all(answer["predictions"] == ([0, 2] if answer["version"] == "1" else ["setosa", "virginica"])
               for _, _, answer in answers)
    assert "failed to load" not in server.output()


def test_concurrent_first_requests_on_a_live_server_load_once(tmp_path, iris, iris_classifier):
    """Proves single-flight loading on a live server: 16 requests hit an unloaded model at the same time
    while its artifact takes ~1 s to load; all succeed with the right predictions, and the version
    reports loads == 1 (the log shows one load)."""
    store = tmp_path / "store"
    write_artifact(store / "iris.pkl", SlowToLoad(iris_classifier, 1.0), "pickle")
    features = iris[0][::10]
    threads = 16
    port = free_port()
    with LiveServer(service_command(store, port, "--threads", str(threads)), port) as server:
        barrier = threading.Barrier(threads)

        def first_request(_):
            barrier.wait(TIMEOUT)
            return requests.post(server.base + "/models/iris/predict", json={"instances": features.tolist()},
                                 timeout=TIMEOUT)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            responses = list(pool.map(first_request, range(threads)))
        assert [r.status_code for r in responses] == [200] * threads, [r.text for r in responses]
        assert all(r.json()["predictions"] == iris_classifier.predict(features).tolist() for r in responses)
        version = requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()["versions"][0]
        assert version["state"] == "AVAILABLE" and version["loads"] == 1
    assert server.output().count("loaded model 'iris' version 1") == 1


###############################################################################
# A label keeps its version served when a newer one is published
###############################################################################


def test_publishing_a_version_past_the_policy_keeps_the_labels_version_visibly(tmp_path, iris):
    """README's "Publishing a version safely" on a live server: {"latest": 2} with stable -> 1 and canary -> 2,
    then version 3 published.  `stable` keeps answering with version 1, and the status, the log and the metrics
    say so; moving the label lets version 1 go, and the log says why."""
    from support import write_settings
    features, target = iris
    trees = [DecisionTreeClassifier(max_depth=depth, random_state=0).fit(features, target) for depth in (1, 2, 3)]
    store = tmp_path / "store"
    for number, tree in enumerate(trees[:2], start=1):
        write_artifact(store / "iris" / str(number) / "model.joblib", tree, "joblib")
    write_settings(store / "iris", {"version_policy": {"latest": 2}, "labels": {"stable": 1, "canary": 2}})
    port = free_port()
    with LiveServer(service_command(store, port, "--poll-interval", "0.1"), port) as server:
        publish(store / "iris" / "3" / "model.joblib", trees[2])
        wait_until(lambda: requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()["latest_version"] == "3",
                   what="version 3 to serve")
        answer = requests.post(server.base + "/models/iris/labels/stable/predict", json={"instances": ROWS},
                               timeout=TIMEOUT).json()
        assert answer["version"] == "1" and answer["predictions"] == trees[0].predict(ROWS).tolist()
        status = requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()
        assert status["served_versions"] == ["3", "2", "1"] and status["labels"] == {"stable": "1", "canary": "2"}
        assert version_info(status, "1")["kept_by_labels"] == ["stable"]
        assert version_info(status, "3")["kept_by_labels"] == []
        metrics = requests.get(server.base + "/metrics", timeout=TIMEOUT).text
        assert 'model_service_label_version{label="stable",model="iris",version="1"} 1.0' in metrics
        wait_until(lambda: "model 'iris' version 1 stays served although its version policy does not select it: "
                           "label(s) stable name it" in server.output(), what="the log line")
        write_settings(store / "iris", {"version_policy": {"latest": 2}, "labels": {"stable": 2, "canary": 3}})
        wait_until(lambda: requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()["served_versions"]
                   == ["3", "2"], what="version 1 to leave service")
        wait_until(lambda: "model 'iris' version 1 is no longer kept in service by label(s) stable: no label names "
                           "it now" in server.output(), what="the log line")
        # the label answers with version 1 until version 2 has loaded (promoted), and the metric follows it
        wait_until(lambda: 'model_service_label_version{label="stable",model="iris",version="2"} 1.0' in
                   requests.get(server.base + "/metrics", timeout=TIMEOUT).text, what="the metric to follow")
        metrics = requests.get(server.base + "/metrics", timeout=TIMEOUT).text
        assert 'version="1"' not in metrics.split("# TYPE model_service_label_version")[-1]


def test_readmes_publishing_procedure_runs_verbatim_on_the_demo_store(tmp_path):
    """The ```sh block under README's "Publishing a version safely", run as written in a copy of the demo store's
    folder while the service runs: version 3 serves, and `stable` still answers with version 1, as README says."""
    import shutil
    import subprocess
    from support import ROOT
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme[readme.index("**Publishing a version safely**"):]
    commands = re.search(r"^```sh\n(.*?)^```", section, re.M | re.S).group(1)
    assert "/path/to" not in commands, "no placeholder left to fill"
    shutil.copytree(os.path.join(ROOT, "model_store"), tmp_path / "model_store")
    port = free_port()
    with LiveServer(service_command(tmp_path / "model_store", port, "--poll-interval", "0.1"), port) as server:
        subprocess.run(["bash", "-euc", commands], cwd=tmp_path, check=True, timeout=TIMEOUT)
        wait_until(lambda: requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()["latest_version"] == "3",
                   what="version 3 to serve")
        status = requests.get(server.base + "/models/iris", timeout=TIMEOUT).json()
        assert status["served_versions"] == ["3", "2", "1"] and version_info(status, "1")["kept_by_labels"] == ["stable"]
        answer = requests.post(server.base + "/models/iris/labels/stable/predict", json={"instances": ROWS},
                               timeout=TIMEOUT).json()
        assert answer["version"] == "1"
