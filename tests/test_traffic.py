"""Traffic management: weighted and sticky routing between a model's versions.

Every model is a real estimator trained on scikit-learn's bundled data, written into a tmp_path store.
The routing of keys (shares, stickiness) is measured in-process on a registry on a hand-moved clock; that
requests reach it, by every protocol, through a real server (`serve_store`); the settings' checks and what
stays in force after a refused file go through the registry too.
"""

import collections
import concurrent.futures
import threading

import pytest
import requests

import service

from support import (ROWS, assert_error, clocked_registry, metric_value, strict_json, versioned_store,
                     wait_until, write_settings)

SPLIT = {"version_policy": "all", "labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 60, "canary": 30, "3": 10}}
WEIGHTS = {"1": 0.6, "2": 0.3, "3": 0.1}


@pytest.fixture
def three_versions(tmp_path, iris_classifier):
    """m/1, m/2, m/3 (the same classifier: answers differ only in the version that served them) with SPLIT."""
    return versioned_store(tmp_path, [iris_classifier] * 3, SPLIT)


def shares(versions):
    counts = collections.Counter(versions)
    return {version: count / len(versions) for version, count in counts.items()}


def predict_version(session, base, key=None, path="/models/m/predict"):
    headers = {"X-Routing-Key": key} if key is not None else {}
    with session.post(base + path, json={"instances": ROWS[:1]}, headers=headers, timeout=10) as response:
        return strict_json(response)["version"]


def predict_many(base, keys, threads=4):
    """The version that answered each key, from `threads` keep-alive sessions in parallel."""
    local = threading.local()

    def one(key):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return predict_version(local.session, base, key)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, keys))


# -- weighted and sticky routing ----------------------------------------------------------------------------

def test_ten_thousand_routing_keys_spread_by_the_weights_and_each_sticks_to_its_version(three_versions):
    """The routing itself, a pure function of the key and the split, in-process: 10,000 keys."""
    registry = clocked_registry(three_versions)
    registry.refresh()
    keys = [f"user-{number}" for number in range(10_000)]
    first = [str(registry.slot("m", routing_key=key).ref.version) for key in keys]
    registry.poll()
    assert [str(registry.slot("m", routing_key=key).ref.version) for key in keys] == first     # each key sticks
    for version, share in shares(first).items():
        assert abs(share - WEIGHTS[version]) <= 0.02, shares(first)
    assert set(shares(first)) == set(WEIGHTS)


def test_a_routing_key_reaches_the_version_the_split_gives_it_through_a_real_server(three_versions, serve_store):
    """The X-Routing-Key header reaches that routing: 50 keys over HTTP, each twice, answered by their version."""
    registry = clocked_registry(three_versions)
    registry.refresh()
    keys = [f"user-{number}" for number in range(50)]
    expected = [str(registry.slot("m", routing_key=key).ref.version) for key in keys]
    assert set(expected) == set(WEIGHTS), "the keys reach every version"
    with serve_store(three_versions, "--threads", "4") as server:
        assert predict_many(server.base, keys) == expected
        assert predict_many(server.base, keys) == expected


def test_without_a_key_routing_is_random_by_weight_and_every_protocol_follows_it(three_versions, serve_store):
    with serve_store(three_versions) as server, requests.Session() as session:
        base = server.base
        versions = [predict_version(session, base) for _ in range(1500)]
        for version, share in shares(versions).items():
            assert abs(share - WEIGHTS[version]) <= 0.05, shares(versions)   # > 5 standard deviations
        # the same key routes every protocol alike: header for all, "parameters" for V2
        key = next(k for k in (f"k{n}" for n in range(100)) if predict_version(session, base, k) == "3")
        tf = session.post(base + "/v1/models/m:predict", json={"instances": ROWS[:1]},
                          headers={"X-Routing-Key": key}, timeout=10)
        assert tf.status_code == 200
        v2 = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[0]}],
              "parameters": {"routing_key": key}}
        assert strict_json(session.post(base + "/v2/models/m/infer", json=v2, timeout=10))["model_version"] == "3"
        refused = session.post(base + "/v2/models/m/infer", json={**v2, "parameters": {"routing_key": 7}},
                               timeout=10)
        assert_error(refused, 400, "routing_key")
        # naming a version or a label bypasses the split
        assert {predict_version(session, base, key, "/models/m/versions/2/predict") for _ in range(20)} == {"2"}
        assert {predict_version(session, base, None, "/models/m/labels/stable/predict") for _ in range(20)} == {"1"}
        metrics = session.get(base + "/metrics", timeout=10).text
        status = strict_json(session.get(base + "/models/m", timeout=10))
    for version in WEIGHTS:
        assert metric_value(metrics, "model_service_requests_total", model="m", version=version, method="predict",
                            protocol="native", status="200")
    assert status["traffic"] == [{"target": "stable", "version": "1", "share": 0.6},
                                 {"target": "canary", "version": "2", "share": 0.3},
                                 {"target": "3", "version": "3", "share": 0.1}]


def test_a_new_split_takes_effect_at_the_next_poll_without_a_failed_request(tmp_path, iris_classifier, serve_store):
    root = versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all", "traffic": {"1": 1}})
    answers, stop = [], threading.Event()

    def hammer(base):
        with requests.Session() as session:
            while not stop.is_set():
                with session.post(base + "/models/m/predict", json={"instances": ROWS}, timeout=10) as response:
                    answers.append((response.status_code, response.json().get("version")))

    with serve_store(root, "--poll-interval", "0.2") as server:
        base = server.base
        worker = threading.Thread(target=hammer, args=(base,))
        worker.start()
        try:
            wait_until(lambda: len(answers) > 20, what="requests on the first split")
            write_settings(root / "m", {"version_policy": "all", "traffic": {"1": 0, "2": 5}})
            wait_until(lambda: answers[-1] == (200, "2") and len(answers) > 20, what="the new split")
            seen = len(answers)
            wait_until(lambda: len(answers) > seen + 20, what="requests on the new split")
        finally:
            stop.set()
            worker.join()
    assert {status for status, _ in answers} == {200}
    switched = [version for _, version in answers].index("2")
    assert set(version for _, version in answers[:switched]) == {"1"}
    assert set(version for _, version in answers[switched:]) == {"2"}


# -- the settings' checks -----------------------------------------------------------------------------------

INVALID_TRAFFIC = [
    ({"labels": {"stable": 1}, "traffic": {"beta": 1}}, "'beta' is neither a version nor a defined label"),
    ({"version_policy": {"specific": [1, 2]}, "traffic": {"3": 1}}, "version 3 is not in the version policy"),
    ({"version_policy": {"latest": 2}, "traffic": {"1": 1}}, "version 1, which is not served (the version policy "
                                                             "and labels serve 3, 2)"),
    ({"version_policy": "latest", "labels": {"old": 9}, "traffic": {"old": 1}},       # (a label keeps a version
     "label 'old' names version 9, which is not served (the version policy and labels serve 3)"),   # on disk)
    ({"version_policy": "all", "traffic": {"1": -1, "2": 2}}, "the weight of 1 must be a number >= 0"),
    ({"version_policy": "all", "traffic": {"1": True}}, "the weight of 1 must be a number >= 0"),
    ({"version_policy": "all", "traffic": {"1": "10"}}, "the weight of 1 must be a number >= 0"),
    ('{"version_policy": "all", "traffic": {"1": Infinity}}', "Infinity is not a JSON value"),   # read strictly
    ('{"version_policy": "all", "traffic": {"1": 1e308, "2": %d}}' % 10 ** 400, "the weight of 2 must be a number"),
    ('{"version_policy": "all", "traffic": {"1": 1e308, "2": 1e309}}', "out of a float's range"),
    ({"version_policy": "all", "traffic": {"1": 0, "2": 0.0}}, "every weight is 0"),
    ({"version_policy": "all", "traffic": [1, 2]}, '"traffic" must map labels or versions to weights'),
]


@pytest.mark.parametrize("document, fragment", INVALID_TRAFFIC)
def test_an_invalid_split_refuses_the_file_and_the_previous_split_stays(tmp_path, iris_classifier, caplog,
                                                                       document, fragment):
    versioned_store(tmp_path, [iris_classifier] * 3, {"version_policy": "all", "traffic": {"2": 1}})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    write_settings(tmp_path / "m", document)
    registry.poll()
    registry.poll()
    status = registry.describe("m")
    assert fragment in status["settings_error"], status["settings_error"]
    assert status["traffic"] == [{"target": "2", "version": "2", "share": 1.0}]
    assert {registry.slot("m", routing_key=str(key)).ref.version for key in range(50)} == {2}
    assert any(fragment in record.getMessage() and "the previous settings stay" in record.getMessage()
               for record in caplog.records)


def test_a_split_of_zero_and_positive_weights_leaves_zero_weighted_targets_out(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all", "traffic": {"1": 0, "2": 3}})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    assert registry.describe("m")["traffic"] == [{"target": "2", "version": "2", "share": 1.0}]
    assert {registry.slot("m").ref.version for _ in range(200)} == {2}


def test_a_label_in_the_split_follows_the_label_when_it_moves(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier] * 2,
                    {"version_policy": "all", "labels": {"stable": 1}, "traffic": {"stable": 1}})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    assert registry.slot("m", routing_key="a").ref.version == 1
    write_settings(tmp_path / "m", {"version_policy": "all", "labels": {"stable": 2}, "traffic": {"stable": 1}})
    registry.poll()
    registry.poll()
    assert registry.slot("m", routing_key="a").ref.version == 2
    assert registry.describe("m")["traffic"] == [{"target": "stable", "version": "2", "share": 1.0}]


def test_a_first_request_loads_the_version_its_split_picked_however_the_next_pick_falls(three_versions, make_client,
                                                                                        monkeypatch):
    """Loading on demand must not pick again: three picks of three unloaded versions once answered 503."""
    points = iter([0.05, 0.65, 0.95] * 10)                  # one pick of each version, in turn
    monkeypatch.setattr(service.random, "random", lambda: next(points))
    client = make_client(three_versions, poll_interval=0)
    answer = strict_json(client.post_json("/models/m/predict", {"instances": ROWS[:1]}))
    assert answer["version"] == "1"
    assert [v["state"] for v in strict_json(client.get("/models/m"))["versions"]].count("AVAILABLE") == 1
