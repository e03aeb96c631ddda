"""README's examples are part of the product: each `$ curl` example, run against the bundled demo store,
prints what README shows (objects marked abridged may show a subset of keys; numbers within 1e-9)."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT

def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


README = read("README.md")
README_BASE = "http://127.0.0.1:8080"


def console_examples():
    """(command, expected output) pairs from README's ```console blocks."""
    examples = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        command, output = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command:
                    examples.append((command, "\n".join(output)))
                command, output = line[2:], []
            else:
                output.append(line)
        if command:
            examples.append((command, "\n".join(output)))
    return examples


def matches(expected, actual, where="$"):
    """Objects match on the keys README shows; lists and scalars match exactly (floats to 1e-9)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            matches(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            matches(e, a, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(expected, actual, rel_tol=1e-9), f"{where}: {actual} != {expected}"
    else:
        assert expected == actual, f"{where}: {actual!r} != {expected!r}"


EXAMPLES = console_examples()


def test_readme_has_examples_for_every_kind_of_call():
    commands = " ".join(command for command, _ in EXAMPLES)
    for path in ("/models/iris/predict", "/versions/1/predict", "/models/diabetes/predict",
                 "/models/sentiment/predict", "/predict/", "-X DELETE", "/labels/stable/predict",
                 "/admin/rescan"):
        assert path in commands
    assert len(EXAMPLES) >= 12


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_every_curl_example_returns_what_readme_shows(serve_store):
    with serve_store(os.path.join(ROOT, "model_store"), "--default-model", "iris", "--admin-token", "change-me") as base:
        for command, expected in EXAMPLES:
            argv = [arg.replace(README_BASE, base) for arg in shlex.split(command)]
            assert argv[0] == "curl"
            printed = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
            matches(json.loads(expected), json.loads(printed), command)


def test_readme_test_command_is_what_ci_runs():
    ci = read(".ci", "run")
    command = "pip install '.[test]' && python -m pytest"
    assert command in README and command in ci


def test_readme_configuration_table_lists_every_setting():
    import service
    for setting in service.SETTINGS:
        assert f"`{setting.flag} " in README and f"`{setting.env}`" in README, setting.field
