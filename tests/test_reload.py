"""Hot reload: new, changed and removed artifacts are noticed; what serves is replaced only by what loaded."""

import concurrent.futures
import os
import threading

import numpy as np
import pytest
import requests

import service
from support import ROWS, ManualClock, clocked_registry, publish, wait_until

PAIR = np.array(ROWS[:2])       # a setosa and a virginica


def corrupt(path):
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(b"not a model")
    os.replace(temporary, path)


def labels(model):
    return model.predict("predict", PAIR).tolist()


@pytest.fixture
def registry(tmp_path):
    return clocked_registry(tmp_path, load_retry_seconds=5)


def test_a_new_model_appears_once_its_artifact_is_stable(tmp_path, registry, iris_classifier):
    publish(tmp_path / "a.joblib", iris_classifier)
    registry.refresh()
    publish(tmp_path / "b.joblib", iris_classifier)
    registry.refresh()
    assert registry.names() == ["a"], "no rescan before poll_interval"
    registry.poll()
    assert registry.names() == ["a"], "seen once: maybe still being written"
    registry.poll()
    assert registry.names() == ["a", "b"]
    assert labels(registry.get("b")) == [0, 2]


def test_a_growing_artifact_is_never_loaded(tmp_path, registry, iris_classifier):
    publish(tmp_path / "a.joblib", iris_classifier)
    registry.refresh()
    path = tmp_path / "b.joblib"
    for size in range(1, 4):                # written slowly under its final name
        path.write_bytes(b"x" * size)
        registry.poll()
        assert registry.names() == ["a"]


def test_a_removed_version_and_model_disappear(tmp_path, registry, iris_classifier):
    publish(tmp_path / "m" / "1" / "model.joblib", iris_classifier)
    publish(tmp_path / "m" / "2" / "model.joblib", iris_classifier)
    publish(tmp_path / "gone.joblib", iris_classifier)
    registry.refresh()
    held = registry.get("m", 2)
    os.remove(tmp_path / "m" / "2" / "model.joblib")
    os.rmdir(tmp_path / "m" / "2")
    os.remove(tmp_path / "gone.joblib")
    registry.poll()
    assert registry.names() == ["m"]
    with pytest.raises(service.NotFound):
        registry.get("m", 2)
    with pytest.raises(service.NotFound):
        registry.get("gone")
    wait_until(lambda: registry.slot("m").ref.version == 1)     # once 1 has loaded: 2 answered till then
    assert labels(held) == [0, 2], "a request holding the removed version finishes on it"


def test_a_changed_artifact_of_an_unused_version_is_simply_replaced(tmp_path, registry, iris_classifier,
                                                                      named_labels_classifier):
    publish(tmp_path / "m.joblib", iris_classifier)
    registry.refresh()
    publish(tmp_path / "m.joblib", named_labels_classifier)
    registry.poll()
    registry.poll()
    assert labels(registry.get("m")) == ["setosa", "virginica"]


def test_a_changed_artifact_in_use_loads_beside_the_old_then_swaps(tmp_path, registry, iris_classifier,
                                                                   named_labels_classifier):
    publish(tmp_path / "m.joblib", iris_classifier)
    registry.refresh()
    old = registry.get("m")
    publish(tmp_path / "m.joblib", named_labels_classifier)
    registry.poll()
    assert registry.get("m") is old
    registry.poll()                         # stable now: loads in the background
    wait_until(lambda: registry.slot("m").replacing is None)
    assert labels(registry.get("m")) == ["setosa", "virginica"]
    assert registry.slot("m").loads == 2 and registry.slot("m").error is None


def test_a_corrupt_change_keeps_the_old_model_serving_until_fixed(tmp_path, registry, iris_classifier,
                                                                  named_labels_classifier):
    publish(tmp_path / "m.joblib", iris_classifier)
    registry.refresh()
    old = registry.get("m")
    corrupt(tmp_path / "m.joblib")
    registry.poll()
    registry.poll()
    wait_until(lambda: registry.slot("m").replacing is None)
    slot = registry.slot("m")
    assert registry.get("m") is old and "previous one still serves" in slot.error
    for _ in range(3):                       # the same broken file is not retried at every poll
        registry.poll()
        assert slot.replacing is None
    publish(tmp_path / "m.joblib", named_labels_classifier)
    registry.poll()
    registry.poll()
    wait_until(lambda: registry.slot("m").replacing is None)
    assert labels(registry.get("m")) == ["setosa", "virginica"] and slot.error is None


def test_a_new_version_of_a_model_in_use_serves_only_once_loaded(tmp_path, registry, iris_classifier,
                                                                 named_labels_classifier):
    publish(tmp_path / "m" / "1" / "model.joblib", iris_classifier)
    registry.refresh()
    registry.get("m")
    os.makedirs(tmp_path / "m" / "2")
    corrupt(tmp_path / "m" / "2" / "model.joblib")
    registry.poll()
    registry.poll()
    wait_until(lambda: registry.slot("m", 2).state == "FAILED")
    assert registry.slot("m").ref.version == 1, "a failed version never replaces a working one"
    publish(tmp_path / "m" / "2" / "model.joblib", named_labels_classifier)
    registry.poll()
    registry.poll()
    wait_until(lambda: registry.slot("m").ref.version == 2)
    assert labels(registry.get("m")) == ["setosa", "virginica"]


def test_poll_interval_zero_turns_reload_off(tmp_path, iris_classifier):
    clock = ManualClock()
    registry = service.ModelRegistry(service.Config(store=str(tmp_path), poll_interval=0), clock=clock)
    publish(tmp_path / "a.joblib", iris_classifier)
    registry.refresh()
    publish(tmp_path / "b.joblib", iris_classifier)
    for _ in range(3):
        clock.now += 100
        registry.refresh()
    assert registry.names() == ["a"]


@pytest.mark.slow
def test_swaps_under_load_fail_no_request_and_versions_only_move_forward(tmp_path, serve_store, iris_classifier,
                                                                         named_labels_classifier):
    """Clients predict without pause while v2 is published, a corrupt v3 appears, v3 is fixed, v1 is removed."""
    store = tmp_path / "store"
    publish(store / "m" / "1" / "model.joblib", iris_classifier)
    with serve_store(store, "--poll-interval", "0.2", "--threads", "8") as server:
        base = server.base
        stop = threading.Event()
        answered = [0] * 4                 # answers each client has had so far

        def client(index):
            def count(version):
                answered[index] += 1
                return version
            return poll(base, stop, count)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, index) for index in range(4)]

            def every_client_answered(count=5):
                """Wait until each client has had `count` more answers (or one has stopped: result() tells why)."""
                mark = list(answered)
                wait_until(lambda: all(now >= then + count for now, then in zip(answered, mark))
                           or any(future.done() for future in clients), what=f"{count} answers per client")
            try:
                def state(version):
                    versions = requests.get(base + "/models/m", timeout=30).json()["versions"]
                    return {v["version"]: v["state"] for v in versions}.get(version)
                every_client_answered()
                publish(store / "m" / "2" / "model.joblib", named_labels_classifier)
                wait_until(lambda: state("2") == "AVAILABLE")
                os.makedirs(store / "m" / "3")
                corrupt(store / "m" / "3" / "model.joblib")
                wait_until(lambda: state("3") == "FAILED")
                every_client_answered()
                publish(store / "m" / "3" / "model.joblib", iris_classifier)
                wait_until(lambda: state("3") == "AVAILABLE")
                os.remove(store / "m" / "1" / "model.joblib")
                os.rmdir(store / "m" / "1")
                wait_until(lambda: state("1") is None)
                every_client_answered()
            finally:
                stop.set()
            results = [future.result() for future in clients]
    for seen, failures in results:
        assert failures == []
        assert seen == sorted(seen), "a client saw an older version after a newer one"
        assert seen[-1] == 3 and len(seen) > 10


# -- a serving version's folder renamed: availability is kept, and no route moves backwards ------------------

def poll(base, stop, seen_as):
    """A client posting PAIR until `stop` is set: (seen_as(version) of each answer, the failures)."""
    seen, failures, session = [], [], requests.Session()
    while not stop.is_set():
        response = session.post(base + "/models/m/predict", json={"instances": PAIR.tolist()}, timeout=30)
        if response.status_code != 200:
            failures.append((response.status_code, response.text))
        else:
            seen.append(seen_as(int(response.json()["version"])))
    return seen, failures


def rename_version(root, old, new):
    os.rename(root / "m" / str(old), root / "m" / str(new))


def test_a_renamed_serving_version_answers_until_its_successor_loads(tmp_path, registry, iris_classifier,
                                                                     named_labels_classifier):
    """`mv m/5 m/6`: for one scan 5 is gone and 6 has not settled; 5 keeps answering, 4 never does."""
    publish(tmp_path / "m" / "4" / "model.joblib", iris_classifier)
    publish(tmp_path / "m" / "5" / "model.joblib", named_labels_classifier)
    registry.refresh()
    serving = registry.get("m")
    rename_version(tmp_path, 5, 6)
    registry.poll()                                       # 5 left, 6 seen once
    assert registry.slot("m").ref.version == 5
    assert registry.get("m") is serving and labels(serving) == ["setosa", "virginica"]
    registry.poll()                                       # 6 settled: it loads beside 5, then takes over
    wait_until(lambda: registry.slot("m").ref.version == 6)
    assert labels(registry.get("m")) == ["setosa", "virginica"]
    assert registry.entry("m").versions[4].loads == 0, "the older version was never needed"
    assert registry.loaded_count() == 1, "the departed version left memory once its successor served"


def test_a_renamed_version_not_in_memory_is_503_until_its_successor_settles(tmp_path, registry, iris_classifier,
                                                                          named_labels_classifier):
    publish(tmp_path / "m" / "4" / "model.joblib", iris_classifier)
    publish(tmp_path / "m" / "5" / "model.joblib", named_labels_classifier)
    registry.refresh()
    rename_version(tmp_path, 5, 6)
    registry.poll()
    with pytest.raises(service.ModelUnavailable) as refused:
        registry.acquire("m")
    assert refused.value.retry_after == 1 and "left the store" in str(refused.value)
    registry.poll()
    assert labels(registry.get("m")) == ["setosa", "virginica"] and registry.slot("m").ref.version == 6
    assert registry.entry("m").versions[4].loads == 0


def test_a_model_whose_only_version_is_renamed_never_disappears(tmp_path, registry, iris_classifier):
    publish(tmp_path / "m" / "1" / "model.joblib", iris_classifier)
    registry.refresh()
    serving = registry.get("m")
    rename_version(tmp_path, 1, 2)
    registry.poll()
    assert registry.names() == ["m"] and registry.get("m") is serving
    registry.poll()
    wait_until(lambda: registry.slot("m").ref.version == 2)
    assert labels(registry.get("m")) == [0, 2]


def test_clients_polling_through_a_rename_see_no_failure_and_no_older_version(tmp_path, serve_store,
                                                                              iris_classifier,
                                                                              named_labels_classifier):
    store = tmp_path / "store"
    publish(store / "m" / "4" / "model.joblib", iris_classifier)
    publish(store / "m" / "5" / "model.joblib", named_labels_classifier)
    with serve_store(store, "--poll-interval", "0.1", "--threads", "8") as server:
        base = server.base
        stop, renamed = threading.Event(), threading.Event()

        def client():
            return poll(base, stop, lambda version: (version, renamed.is_set()))

        def latest():
            return requests.get(base + "/models/m", timeout=30).json()["latest_version"]

        def state(version):
            versions = requests.get(base + "/models/m", timeout=30).json()["versions"]
            return {v["version"]: v["state"] for v in versions}.get(version)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(client) for _ in range(3)]
            try:
                wait_until(lambda: state("5") == "AVAILABLE")        # answering, not loading, when renamed
                rename_version(store, 5, 6)
                renamed.set()
                wait_until(lambda: latest() == "6")
                last = requests.post(base + "/models/m/predict", json={"instances": PAIR.tolist()}, timeout=30)
                assert last.json()["version"] == "6"
            finally:
                stop.set()
            results = [future.result() for future in clients]
    for seen, failures in results:
        assert failures == []
        versions = [version for version, _ in seen]
        assert min(versions) >= 5 and versions == sorted(versions), "a client saw an older version"
        assert any(after for _, after in seen), "the client kept polling through the rename"
