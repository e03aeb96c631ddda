"""Both JSON model fuzzers on a bounded sample each: forged models are refused or served, never crash, hang,
answer a 500 or grow the process past its memory budget.  The mutator is tests/json_fuzz.py, the
grammar-based generator (Hypothesis) tests/json_generate.py; the documented full run of each (50,000
documents) and its figures are in docs/json-model-format.md."""

import os

import pytest

import json_fuzz
import json_generate

# Cases whose compiled code trusts the most state (trees, ensembles, histogram boosting, libsvm,
# neighbours, clustering, encoders, text) plus a sample of the rest, so the bounded run stays short.
CASES = ["DecisionTreeClassifier", "RandomForestRegressor", "GradientBoostingClassifier",
         "HistGradientBoostingClassifier (categorical)", "SVC", "KNeighborsClassifier (brute)", "KMeans",
         "OneHotEncoder", "CountVectorizer", "StackingClassifier", "DummyClassifier", "LogisticRegression"]


@pytest.fixture(scope="module")
def documents():
    """The cases' models in the current format, and as version 1 wrote those with trees."""
    return json_fuzz.base_documents(CASES)


def assert_fine(report, seed):
    findings = "\n".join(f"{f['outcome']} #{f['number']} {f['case']}: {f['detail']} after {f['changes']}"
                         for f in report["findings"])
    assert not report["findings"], f"seed {seed}:\n{findings}"
    assert report["counts"].get("refused", 0) and report["counts"].get("served", 0), report["counts"]


def test_a_sample_of_mutants_is_refused_or_served(documents):
    assert any(name.endswith(" (v1)") for name in documents)
    seed = int(os.environ.get("JSON_FUZZ_SEED", "13"))
    report = json_fuzz.run(int(os.environ.get("JSON_FUZZ_MUTATIONS", "200")), seed, timeout=20.0,
                           documents=documents)
    assert_fine(report, seed)


def test_a_sample_of_generated_documents_is_refused_or_served(documents):
    seed = int(os.environ.get("JSON_FUZZ_SEED", "13"))
    report = json_generate.run(int(os.environ.get("JSON_GENERATE_EXAMPLES", "150")), seed, timeout=20.0,
                               documents=documents)
    assert_fine(report, seed)


def test_the_harness_notices_a_crash_a_hang_and_memory_past_the_budget():
    worker = json_fuzz.Worker(timeout=30.0)
    try:
        assert worker.ask({"selftest": "crash"})["outcome"] == "crash"
        assert worker.ask({"selftest": "hang"}, timeout=0.5)["outcome"] == "hang"     # a hang costs no 30 s here
        answer = worker.ask({"selftest": "memory"}, timeout=60)
        assert answer["outcome"] == "memory", answer
    finally:
        worker.stop()
