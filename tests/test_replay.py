"""Replay: `python service.py replay` scores a payload log's requests again on another
version, in-process, and reports how the answers compare.

End to end: a real server writes the log (SIGTERM drains it), then the command runs as a subprocess.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import requests
from sklearn.linear_model import LogisticRegression

import service
from support import ROOT, ROWS, LiveServer, versioned_store


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


# -- bad input: counted and reported, never a traceback ------------------------------------------------------

HOSTILE_VALUES = [None, True, 0, 10 ** 400, -10 ** 400, 1e308, -1e308, "", "x" * 1000, [], {}, [[10 ** 400] * 4],
                  [[1e308, -1e308, 0.0, 5e-324]], {"predict": 5}, {"predict": [10 ** 400]}, {"predict": [[1e308]]},
                  {"predict": "setosa"}, {"nope": [1]}, {"": []}, {"predict_proba": [[10 ** 400, 0, 0]]},
                  {"predict_proba": [[1e308, -1e308, 1.0]]}, {"predict": [[[[0]]]]}, [[1, 2, 3, 4]] * 3,
                  {"sepal": [1]}, ["a"], [True]]


def hostile_records(iris_classifier):
    """A valid logged request, then that request with each field replaced by each hostile value."""
    valid = {"model": "m", "version": "1", "status": 200, "request_id": "r-valid", "inputs": ROWS,
             "outputs": {"predict": iris_classifier.predict(ROWS).tolist(),
                         "predict_proba": iris_classifier.predict_proba(ROWS).tolist()}, "redacted": None}
    records = [valid]
    for field in ("model", "status", "request_id", "inputs", "outputs", "redacted", "version"):
        for number, value in enumerate(HOSTILE_VALUES):
            records.append({**valid, field: value, "request_id": f"r-{field}-{number}"}
                           if field != "request_id" else {**valid, field: value})
    return valid, records


def write_log(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:      # "\udcff": a byte 0xff
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def test_any_log_line_is_replayed_counted_or_reported_as_bad_never_a_traceback(tmp_path, iris_classifier, capsys,
                                                                               monkeypatch):
    store = versioned_store(tmp_path / "store", [iris_classifier])
    valid, records = hostile_records(iris_classifier)
    monkeypatch.setattr(service, "REPLAY_LINE_BYTES", 10_000)
    garbage = ["not json", "[1, 2]", '"text"', "[" * 100 + "]" * 100, '{"model": "m", "model": "n"}', "",
               '{"model": "m", "status": 200, "inputs": [[NaN, 1, 2, 3]]}', "x" * 20_000, "\udcff"]
    log = write_log(tmp_path / "log.jsonl", records, garbage)
    code = service.main(["replay", str(log), "--model", "m", "--store", str(store)])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert "Traceback" not in out + err
    bad = int(re.search(r"bad lines \(no logged request\): (\d+)", out)[1])
    assert bad >= len(garbage) and f'x "request_id" is no string (first: {log}:' in out
    only_garbage = write_log(tmp_path / "garbage.jsonl", [], garbage)
    assert service.main(["replay", str(only_garbage), "--model", "m", "--store", str(store)]) == 0
    reasons = capsys.readouterr().out
    assert f"bad lines (no logged request): {len(garbage)}" in reasons
    for why, number in [("not valid JSON", 1), ("no JSON object", 2), ("nested deeper than 64", 4), ("twice", 5),
                        ("empty", 6), ("NaN is not a JSON value", 7), ("longer than 10000 bytes", 8),
                        ("not valid UTF-8", 9)]:
        assert re.search(rf"\d x .*{re.escape(why)}.* \(first: {re.escape(str(only_garbage))}:{number}\)", reasons), \
            (why, reasons)
    replayed = int(re.search(r"replayed (\d+) request\(s\)", out)[1])
    failed = int(re.search(r"errors: (\d+)", out)[1])            # the version refused what the line holds
    skipped = sum(int(count) for count in re.findall(r"(\d+) [a-z (]", out.split("skipped ")[1].splitlines()[0]))
    assert replayed + failed + skipped + bad == len(records) + len(garbage), out
    assert "r-valid" not in out.split("worst examples:")[-1]       # the valid request replays identically


def test_replay_exit_codes_are_distinct_and_its_help_says_which(tmp_path, iris_classifier):
    store = versioned_store(tmp_path / "store", [iris_classifier])
    valid, records = hostile_records(iris_classifier)
    log = write_log(tmp_path / "log.jsonl", records, ["not json", "{" * 30_000])
    ran = replay(log, "--model", "m", "--store", store)
    assert ran.returncode == 0 and "Traceback" not in ran.stdout + ran.stderr, ran.stderr
    below = replay(log, "--model", "m", "--store", store, "--fail-under", "1")
    assert below.returncode == 1 and "below --fail-under" in below.stderr and "Traceback" not in below.stderr
    for arguments in ([tmp_path / "absent.jsonl", "--model", "m"], [log, "--model", "absent"],
                      [log, "--model", "m", "--version", "x" * 50], [tmp_path, "--model", "m", "--label", "none"],
                      [log, "--model", "m", "--fail-under", "2"], [log]):
        failed = replay(*arguments, "--store", store)
        assert failed.returncode == 2, (arguments, failed.stdout, failed.stderr)
        assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) <= 3, failed.stderr
    os.mkfifo(tmp_path / "fifo")                # would block a reader forever
    fifo = replay(tmp_path / "fifo", "--model", "m", "--store", store)
    assert fifo.returncode == 2 and "not a file" in fifo.stderr
    usage = replay("--help")
    assert "Exit status: 0 once it has run" in usage.stdout and "1 with --fail-under" in usage.stdout
    assert "2 when it could not run" in usage.stdout
