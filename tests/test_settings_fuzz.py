"""Settings files that no content can break (issue 21, class 6): one model-settings.json, whatever it holds,
refuses that file alone, with the reason in the model's status and the log; the previous settings stay, the
rest of the store is scanned and served, and the server never exits over it.

The fuzzer (tests/settings_fuzz.py) runs a bounded sample here; its documented run,
`python tests/settings_fuzz.py --mutations 5000 --seed 1`, and its figures are in README ("Security").
A live server is started on a store with hostile settings files, and more are published while it serves.
"""

import os

import pytest
import requests

import service
import settings_fuzz

from support import (ROWS, clocked_registry, publish, strict_json, versioned_store, wait_until, write_artifact,
                     write_settings)

DEEP = "[" * 30_000 + "]" * 30_000
HUGE_BESIDE_FLOAT = '{"version_policy": "all", "traffic": {"1": 1.5, "2": %d}}' % 10 ** 400


def test_a_bounded_sample_of_mutants_is_refused_or_accepted_never_an_error_or_a_hang():
    count = int(os.environ.get("SETTINGS_FUZZ_MUTATIONS", "300"))
    seed = int(os.environ.get("SETTINGS_FUZZ_SEED", "7"))
    report = settings_fuzz.run(count, seed)
    assert not report["findings"], "\n".join(settings_fuzz.summary(report, seed))
    assert report["counts"].get("refused") and report["counts"].get("accepted"), report["counts"]


def test_the_harness_turns_a_step_that_never_ends_into_a_hang():
    with pytest.raises(settings_fuzz.Hang):
        with settings_fuzz.time_limit(0.2):
            while True:
                pass


@pytest.mark.parametrize("document, reason", [
    (DEEP, "nested deeper than"),
    ('{"labels": %s}' % DEEP, "nested deeper than"),
    (HUGE_BESIDE_FLOAT, "the weight of 2 must be a number >= 0"),
    ('{"version_policy": "all", "traffic": {"1": 1e308, "2": 1e309}}', "out of a float's range"),
    ('{"version_policy": "all", "version_policy": "latest"}', 'names the member "version_policy" twice'),
    ('{"version_policy": {"latest": 2}, "labels": {"stable": 1}}\x00', "not valid JSON"),
    (b'{"version_policy": "all"\xff}', "not valid JSON"),
    ('{"version_policy": "all", "labels": {"stable": %d}, "traffic": {"stable": 1}}' % 10 ** 400,
     "is not a version"),                  # its 400 digits once made a 2,700-character refusal
])
def test_any_content_refuses_only_its_own_file_and_the_previous_settings_stay(tmp_path, iris_classifier, caplog,
                                                                            document, reason):
    versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all", "traffic": {"1": 1, "2": 3}})
    write_artifact(tmp_path / "other.joblib", iris_classifier, "joblib")
    registry = clocked_registry(tmp_path)
    registry.refresh()
    path = tmp_path / "m" / service.SETTINGS_FILE
    if isinstance(document, bytes):
        path.write_bytes(document)
        os.utime(path, ns=(10**18, 10**18))
    else:
        write_settings(tmp_path / "m", document)
    registry.poll()
    status = registry.describe("m")
    assert reason in status["settings_error"] and len(status["settings_error"]) < 600, status["settings_error"]
    assert status["version_policy"] == "all"
    assert status["traffic"] == [{"target": "1", "version": "1", "share": 0.25},
                                 {"target": "2", "version": "2", "share": 0.75}]
    assert registry.describe("other")["settings_error"] is None
    assert any(reason in record.getMessage() and "the previous settings stay" in record.getMessage()
               for record in caplog.records)


def test_any_content_at_start_leaves_that_model_unserved_and_every_other_served(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier] * 2, DEEP)
    write_artifact(tmp_path / "other.joblib", iris_classifier, "joblib")
    registry = clocked_registry(tmp_path)
    registry.refresh()                     # it raised RecursionError: the server exited with a traceback
    assert "nested deeper than" in registry.describe("m")["settings_error"]
    assert registry.describe("m")["served_versions"] == []
    assert registry.slot("other").ref.version == 1


def test_weights_at_the_top_of_a_floats_range_split_evenly(tmp_path, iris_classifier):
    """1e308 + 1e308 overflows to infinity: every request went to one version and both shares showed 0.0."""
    versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                                                      "traffic": {"stable": 1e308, "canary": 1e308}})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    assert registry.describe("m")["traffic"] == [{"target": "stable", "version": "1", "share": 0.5},
                                                 {"target": "canary", "version": "2", "share": 0.5}]
    versions = [registry.slot("m", routing_key=f"key-{number}").ref.version for number in range(2000)]
    assert abs(versions.count(1) / len(versions) - 0.5) < 0.05


def test_a_fault_with_one_model_during_a_scan_leaves_it_as_it_was_and_the_rest_goes_on(tmp_path, iris_classifier,
                                                                                       caplog, monkeypatch):
    """The scan's guard: whatever fails for one model (here an injected fault of the service's own), the others
    are still scanned, and that one keeps what it had."""
    versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all"})
    registry = clocked_registry(tmp_path)
    registry.refresh()
    real = service._plan_model

    def faulty(name, *args):
        if name == "m":
            raise ZeroDivisionError("a fault of our own")
        return real(name, *args)
    monkeypatch.setattr(service, "_plan_model", faulty)
    write_artifact(tmp_path / "late.joblib", iris_classifier, "joblib")
    registry.poll()
    registry.poll()                         # a new artifact is used once two scans saw it unchanged
    assert registry.describe("m")["served_versions"] == ["2", "1"]
    assert registry.slot("late").ref.version == 1
    assert any("scan failed on it" in record.getMessage() for record in caplog.records)


def predict(base, name, key=None):
    headers = {"X-Routing-Key": key} if key else {}
    return requests.post(f"{base}/models/{name}/predict", json={"instances": ROWS[:1]}, headers=headers, timeout=10)


def test_a_live_server_starts_on_hostile_settings_and_keeps_scanning_while_more_are_published(
        tmp_path, iris_classifier, serve_store):
    versioned_store(tmp_path, [iris_classifier] * 2, DEEP)                        # m: never valid
    write_artifact(tmp_path / "w" / "1" / "model.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "w" / "2" / "model.joblib", iris_classifier, "joblib")
    write_settings(tmp_path / "w", {"version_policy": "all", "labels": {"stable": 1, "canary": 2},
                                    "traffic": {"stable": 1e308, "canary": 1e308}})
    write_artifact(tmp_path / "gone.joblib", iris_classifier, "joblib")
    with serve_store(tmp_path, "--poll-interval", "0.2") as server:
        base = server.base
        assert "nested deeper than" in strict_json(requests.get(base + "/models/m", timeout=10))["settings_error"]
        assert predict(base, "m").status_code == 503
        split = strict_json(requests.get(base + "/models/w", timeout=10))["traffic"]
        assert [target["share"] for target in split] == [0.5, 0.5]
        assert {strict_json(predict(base, "w", f"k{number}"))["version"] for number in range(40)} == {"1", "2"}

        write_settings(tmp_path / "w", HUGE_BESIDE_FLOAT)                          # published while serving
        write_settings(tmp_path / "m", '{"labels": {"a": 1}, "labels": {"a": 2}}')
        publish(str(tmp_path / "late.joblib"), iris_classifier)
        os.remove(tmp_path / "gone.joblib")

        def scanned():
            return predict(base, "late").status_code == 200 and predict(base, "gone").status_code == 404
        wait_until(scanned, timeout=30, what="a model published and one removed, past the hostile files")
        status = strict_json(requests.get(base + "/models/w", timeout=10))
        assert "the weight of 2 must be a number" in status["settings_error"]
        assert [target["share"] for target in status["traffic"]] == [0.5, 0.5]      # the previous split stays
        assert "twice" in strict_json(requests.get(base + "/models/m", timeout=10))["settings_error"]

        write_settings(tmp_path / "m", {"version_policy": "all"})                  # fixed: served
        wait_until(lambda: predict(base, "m").status_code == 200, timeout=30, what="m served once fixed")
    assert "Traceback" not in server.output()
    assert "nested deeper than" in server.output() and "the weight of 2 must be a number" in server.output()
