"""The registry's plan (plan_catalogue): a store scan and the models' settings in, the catalogue to serve and
the loads that get there out, as plain function calls: no store on disk, no thread, no clock."""

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import service


@pytest.fixture(scope="module")
def estimator():
    data = load_iris()
    return LogisticRegression(max_iter=1000).fit(data.data, data.target)


def ref(name, version, size=100, mtime_ns=1):
    """An artifact as a scan reports it (the plan never opens it)."""
    return service.ArtifactRef(name, version, f"/store/{name}/{version}/model.joblib", f"{name}/{version}/model.joblib",
                               ".joblib", size, mtime_ns)


def found(name="m", versions=(1,), **sizes):
    return {name: {number: ref(name, number, sizes.get(f"v{number}", 100)) for number in versions}}


def record(document=None, error=None):
    """A SettingsRecord: the model's settings file parsed, or none (the defaults)."""
    settings = service.DEFAULT_SETTINGS if document is None else service.ModelSettings.parse(document)
    return service.SettingsRecord(None, settings, error)


def plan(scan, old=None, settings=None, unsettled=None, settle=False, preloaded=()):
    records = {name: settings or record() for name in scan}
    return service.plan_catalogue(scan, old or {}, records, unsettled or {}, settle, lambda name: name in preloaded)


def load(slot, estimator):
    """Give a slot a model in memory, as a load would (a real LoadedModel of a real estimator)."""
    slot.model = service.LoadedModel(slot.ref, estimator, "0" * 64, slot.ref.size, 0.0)
    slot.set(service.AVAILABLE)
    return slot


def test_a_first_scan_serves_the_highest_version_and_loads_nothing_ahead():
    first = plan(found(versions=(1, 2)))
    entry = first.catalogue["m"]
    assert entry.served == (2,) and entry.wanted == {None: 2} and entry.routes[None] is entry.versions[2]
    assert first.replace == [] and first.promote == [] and first.unsettled == {}
    assert entry.lookup() is entry.versions[2] and entry.lookup(version=2) is entry.versions[2]
    with pytest.raises(service.NotFound, match="does not serve version 1"):
        entry.lookup(version=1)


def test_labels_and_a_traffic_split_come_from_the_settings():
    settings = record({"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                       "traffic": {"stable": 3, "canary": 1}})
    entry = plan(found(versions=(1, 2)), settings=settings).catalogue["m"]
    assert entry.served == (2, 1) and entry.wanted == {None: 2, "stable": 1, "canary": 2}
    assert entry.split == ((0.75, 1.0), ("stable", "canary"))
    assert entry.lookup(label="stable") is entry.versions[1]
    assert entry.lookup(routing_key="user-7") is entry.lookup(routing_key="user-7"), "a routing key sticks"
    with pytest.raises(service.NotFound, match="is not defined"):
        entry.lookup(label="beta")


def test_a_label_moved_to_a_version_not_in_memory_stays_until_it_loads(estimator):
    scan = found(versions=(1, 2))
    before = plan(scan, settings=record({"version_policy": "all", "labels": {"stable": 1}})).catalogue
    load(before["m"].versions[1], estimator)
    moved = plan(scan, before, settings=record({"version_policy": "all", "labels": {"stable": 2}}))
    entry, target = moved.catalogue["m"], moved.catalogue["m"].versions[2]
    assert entry.wanted["stable"] == 2 and entry.routes["stable"] is entry.versions[1], "1 answers meanwhile"
    assert moved.promote == [("m", "stable", target)]
    load(target, estimator)
    after = plan(scan, moved.catalogue, settings=record({"version_policy": "all", "labels": {"stable": 2}}))
    assert after.catalogue["m"].routes["stable"] is target and after.promote == []


def test_a_label_whose_target_is_not_in_memory_moves_at_once():
    scan = found(versions=(1, 2))
    before = plan(scan, settings=record({"version_policy": "all", "labels": {"stable": 1}})).catalogue
    moved = plan(scan, before, settings=record({"version_policy": "all", "labels": {"stable": 2}}))
    assert moved.catalogue["m"].routes["stable"] is moved.catalogue["m"].versions[2] and moved.promote == []


def test_a_new_artifact_is_used_once_two_scans_saw_it_unchanged():
    first = plan(found(versions=(1,)))
    seen_once = plan(found(versions=(1, 2)), first.catalogue, settle=True)
    assert seen_once.unsettled == {("m", 2): ref("m", 2).fingerprint}
    assert sorted(seen_once.catalogue["m"].versions) == [1] and seen_once.catalogue["m"].served == (1,)
    seen_twice = plan(found(versions=(1, 2)), seen_once.catalogue, unsettled=seen_once.unsettled, settle=True)
    assert seen_twice.unsettled == {} and seen_twice.catalogue["m"].served == (2,)


def test_a_changed_artifact_in_memory_is_replaced_beside_it_one_not_in_memory_gets_a_new_slot(estimator):
    before = plan(found(versions=(1,))).catalogue
    loaded = load(before["m"].versions[1], estimator)
    changed = plan(found(versions=(1,), v1=200), before)
    assert changed.catalogue["m"].versions[1] is loaded, "the old model serves while the new one loads"
    assert changed.replace == [(loaded, ref("m", 1, 200))]
    idle = plan(found(versions=(1,))).catalogue
    fresh = plan(found(versions=(1,), v1=200), idle)
    assert fresh.replace == [] and fresh.catalogue["m"].versions[1] is not idle["m"].versions[1]
    assert fresh.departures.gone == [idle["m"].versions[1]], "the stale slot is never loaded again"


def test_renaming_the_serving_version_higher_holds_it_until_the_new_one_settles(estimator):
    before = plan(found(versions=(4, 5))).catalogue
    serving = load(before["m"].versions[5], estimator)
    renamed = plan(found(versions=(4, 6)), before, settle=True)              # `mv m/5 m/6`, seen once
    entry = renamed.catalogue["m"]
    assert entry.routes[None] is serving, "never 4 meanwhile"
    assert renamed.departures.gone == [serving] and renamed.departures.unserved == []
    assert renamed.departures.forgotten == []
    settled = plan(found(versions=(4, 6)), renamed.catalogue, unsettled=renamed.unsettled, settle=True)
    entry = settled.catalogue["m"]
    assert entry.served == (6,) and entry.routes[None] is serving, "5 answers from memory until 6 has loaded"
    assert settled.promote == [("m", None, entry.versions[6])]
    assert [(name, number) for name, number, _, _ in settled.departures.unserved] == [("m", 4)]
    load(entry.versions[6], estimator)
    moved = plan(found(versions=(4, 6)), settled.catalogue, settle=True)
    assert moved.catalogue["m"].routes[None] is entry.versions[6]
    assert ("m", 5, serving, True) in moved.departures.unserved and moved.departures.forgotten == [("m", 5)]


def test_a_model_that_leaves_the_store_departs_whole(estimator):
    before = plan({**found("a"), **found("b")}).catalogue
    load(before["b"].versions[1], estimator)
    after = plan(found("a"), before)
    assert list(after.catalogue) == ["a"]
    assert after.departures.gone == [before["b"].versions[1]]
    assert [(name, number, removed) for name, number, _, removed in after.departures.unserved] == [("b", 1, True)]
    assert after.departures.forgotten == [("b", 1)]


def test_a_plan_changes_nothing_it_was_given(estimator):
    before = plan({**found("a"), **found("b", versions=(1, 2))}).catalogue
    slots = [slot for entry in before.values() for slot in entry.versions.values()]
    load(slots[0], estimator)
    state = [(slot.gone, slot.pinned, slot.model, slot.replacing) for slot in slots]
    plan(found("b", versions=(2, 3)), before, settle=True, preloaded=("b",))
    assert [(slot.gone, slot.pinned, slot.model, slot.replacing) for slot in slots] == state
    assert sorted(before) == ["a", "b"] and sorted(before["b"].versions) == [1, 2]


def test_refused_settings_serve_nothing_and_say_why():
    entry = plan(found(), settings=service.SettingsRecord(None, None, "m/model-settings.json: not valid JSON")
                 ).catalogue["m"]
    assert entry.served == () and entry.routes == {}
    with pytest.raises(service.ModelUnavailable, match="not served: m/model-settings.json: not valid JSON"):
        entry.lookup()


def test_preloaded_models_pin_their_served_versions():
    catalogue = plan(found("a", versions=(1, 2)), preloaded=("a",)).catalogue
    catalogue["a"].pin()
    assert [catalogue["a"].versions[number].pinned for number in (1, 2)] == [False, True]


# -- a label keeps the version it names in service ------------------------------------------------------------

def test_publishing_past_the_policy_keeps_the_version_a_label_names():
    """README's "Publishing a version safely": version 3 published under {"latest": 2} with stable -> 1; the
    policy alone would drop 1, and with it `stable`.  The label keeps 1 served; the default route goes to 3."""
    settings = record({"version_policy": {"latest": 2}, "labels": {"stable": 1, "canary": 2}})
    entry = plan(found(versions=(1, 2, 3)), settings=settings).catalogue["m"]
    assert entry.served == (3, 2, 1) and entry.kept == {1: ["stable"]}
    assert entry.wanted == {None: 3, "stable": 1, "canary": 2}
    assert entry.lookup(label="stable") is entry.versions[1] and entry.lookup(version=1) is entry.versions[1]
    versions = {v["version"]: v for v in entry.describe(lambda: 0.0, {})["versions"]}
    assert versions["1"]["kept_by_labels"] == ["stable"] and versions["1"]["served"]
    assert versions["2"]["kept_by_labels"] == [] and versions["3"]["kept_by_labels"] == []


def test_a_version_kept_by_a_label_is_never_the_default_and_lets_go_when_the_label_moves():
    kept = plan(found(versions=(1, 2, 3)), settings=record({"version_policy": {"specific": [1]},
                                                            "labels": {"canary": 3}})).catalogue
    assert kept["m"].served == (3, 1) and kept["m"].wanted[None] == 1, "the policy alone picks the default"
    assert kept["m"].kept == {3: ["canary"]}
    moved = plan(found(versions=(1, 2, 3)), kept, settings=record({"version_policy": {"specific": [1]},
                                                                   "labels": {"canary": 1}}))
    assert moved.catalogue["m"].served == (1,) and moved.catalogue["m"].kept == {}
    assert ("m", 3) in [(name, number) for name, number, _, _ in moved.departures.unserved], "3 leaves memory"


def test_a_label_naming_a_version_not_on_disk_keeps_nothing_and_says_so():
    entry = plan(found(versions=(2,)), settings=record({"labels": {"stable": 1}})).catalogue["m"]
    assert entry.served == (2,) and entry.kept == {} and "stable" not in entry.routes
    with pytest.raises(service.NotFound, match="names version 1, which is not in the store"):
        entry.lookup(label="stable")


def test_a_traffic_split_may_name_a_version_a_label_keeps():
    settings = record({"version_policy": "latest", "labels": {"stable": 1, "canary": 2},
                       "traffic": {"stable": 3, "canary": 1}})
    settings.settings.check_served({1, 2})
    entry = plan(found(versions=(1, 2)), settings=settings).catalogue["m"]
    assert entry.served == (2, 1) and entry.split == ((0.75, 1.0), ("stable", "canary"))
