"""The JSON model fuzzer (tests/json_fuzz.py), on a bounded sample: forged models are refused or served,
never crash, hang or answer a 500.  The full run, `python tests/json_fuzz.py --mutations 10000 --seed N`,
and its figures are in docs/json-model-format.md."""

import os

import pytest

import json_fuzz

# Cases whose compiled code trusts the most state (trees, ensembles, histogram boosting, libsvm,
# neighbours, clustering, encoders, text) plus a sample of the rest, so the bounded run stays short.
CASES = ["DecisionTreeClassifier", "RandomForestRegressor", "GradientBoostingClassifier",
         "HistGradientBoostingClassifier (categorical)", "SVC", "KNeighborsClassifier (brute)", "KMeans",
         "OneHotEncoder", "CountVectorizer", "StackingClassifier", "DummyClassifier", "LogisticRegression"]


@pytest.fixture(scope="module")
def documents():
    return json_fuzz.base_documents(CASES)


def test_a_bounded_sample_of_mutants_is_refused_or_served_never_crashes(documents):
    count = int(os.environ.get("JSON_FUZZ_MUTATIONS", "250"))
    seed = int(os.environ.get("JSON_FUZZ_SEED", "13"))
    report = json_fuzz.run(count, seed, timeout=20.0, documents=documents)
    findings = "\n".join(f"{f['outcome']} #{f['number']} {f['case']}: {f['detail']} after {f['changes']}"
                         for f in report["findings"])
    assert not report["findings"], f"seed {seed}:\n{findings}"
    assert report["counts"].get("refused", 0) and report["counts"].get("served", 0), report["counts"]


def test_the_harness_notices_a_crash_and_a_hang():
    worker = json_fuzz.Worker(timeout=30.0)
    try:
        assert worker.ask({"selftest": "crash"})["outcome"] == "crash"
        assert worker.ask({"selftest": "hang"}, timeout=0.5)["outcome"] == "hang"     # a hang costs no 30 s here
    finally:
        worker.stop()
