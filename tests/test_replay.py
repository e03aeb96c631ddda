"""Replay: `python service.py replay` scores a payload log's requests again on another
version, in-process, and reports how the answers compare.

End to end: a real server writes the log (SIGTERM drains it), then the command runs as a subprocess.
"""

import os
import subprocess
import sys

import pytest
import requests
from sklearn.linear_model import LogisticRegression

from support import ROOT, versioned_store


def replay(*arguments):
    return subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "replay", *map(str, arguments)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_a_logged_version_replayed_on_another_reports_the_differences(tmp_path, iris, iris_classifier,
                                                                     serve_store):
    features, target = iris
    other = LogisticRegression(C=0.01, max_iter=1000).fit(features, target)     # disagrees on some flowers
    store = versioned_store(tmp_path / "store", [other, iris_classifier], {"version_policy": "all"})
    batches = [features[start:start + 10].tolist() for start in range(0, 150, 10)]
    with serve_store(store, "--payload-log", str(tmp_path / "log")) as server, requests.Session() as session:
        base = server.base
        for number, rows in enumerate(batches):
            method = "predict" if number % 2 == 0 else "predict_proba"
            answer = session.post(base + "/models/m/versions/2/predict", json={"instances": rows, "method": method},
                                  headers={"X-Request-ID": f"req-{number}"}, timeout=10)
            assert answer.status_code == 200
        assert session.post(base + "/models/m/predict", json={"instances": [[1]]}, timeout=10).status_code == 400
    assert server.returncode == 0, server.output()
    log = tmp_path / "log"

    same = replay(log, "--model", "m", "--version", "2", "--store", store, "--fail-under", "1")
    assert same.returncode == 0, same.stderr
    assert f"replayed {len(batches)} request(s) on model 'm' version 2" in same.stdout
    assert f"identical predictions: {len(batches)} of {len(batches)} (100.0%)" in same.stdout
    assert "skipped 1 not answered 200" in same.stdout and "errors: 0" in same.stdout

    predict_batches = batches[::2]
    identical = sum(other.predict(rows).tolist() == iris_classifier.predict(rows).tolist()
                    for rows in predict_batches)                                # probabilities always differ
    changed = sum((other.predict(rows) != iris_classifier.predict(rows)).sum() for rows in predict_batches)
    assert identical < len(predict_batches)
    shifted = replay(log, "--model", "m", "--version", "1", "--store", store)
    assert shifted.returncode == 0, shifted.stderr
    report = shifted.stdout
    assert f"identical predictions: {identical} of {len(batches)}" in report
    class_rows = sum(int(line.split(": ")[1].split()[0]) for line in report.splitlines() if line.startswith("class "))
    assert class_rows == changed
    assert "numeric outputs: mean abs difference" in report
    worst = report.split("worst examples:\n")[1].splitlines()
    assert len(worst) == 5 and all(line.startswith("  req-") for line in worst)

    failing = replay(log, "--model", "m", "--version", "1", "--store", store, "--fail-under", "0.99")
    assert failing.returncode == 1 and "below --fail-under" in failing.stderr
    assert replay(log, "--model", "m", "--label", "nope", "--store", store).returncode == 2
    missing = replay(log, "--model", "absent", "--store", store)
    assert missing.returncode == 2 and "'absent' not found" in missing.stderr
