"""The JSON model format across scikit-learn's common families: every case is fitted on a bundled dataset,
exported, loaded back, and every prediction method compared bit for bit with the original.

CASES is the table docs/json-model-format.md shows; a test keeps the two in agreement.
"""

import os

import pytest

import service
from support import ROOT
from families import CASES, assert_identical, fit, outputs


@pytest.mark.parametrize("name", list(CASES))
def test_json_round_trip_is_bit_for_bit_on_every_method(name, tmp_path):
    estimator, x = fit(name)
    expected = outputs(estimator, x)
    assert expected, "the case exercises at least one method"
    path = tmp_path / "model.json"
    service.save_json_model(estimator, path)
    loaded = service.load_json_model(path)
    assert type(loaded) is type(estimator)
    actual = outputs(loaded, x)
    assert set(actual) == set(expected)
    for method, output in expected.items():
        assert_identical(output, actual[method], f"{name}.{method}")
    text = path.read_text()
    assert service.dump_json_model(estimator) == text, "exporting the same model twice gives other bytes"
    assert service.dump_json_model(loaded) == text, "a loaded model exports to other bytes"


def documented_cases():
    with open(os.path.join(ROOT, "docs", "json-model-format.md"), encoding="utf-8") as handle:
        text = handle.read()
    table = text.split("<!-- coverage table -->")[1]
    return [row.split("|")[1].strip().strip("`") for row in table.splitlines() if row.startswith("| `")]


def test_the_documented_coverage_table_is_the_tested_one():
    assert documented_cases() == list(CASES)


def test_every_allow_listed_estimator_class_is_documented():
    with open(os.path.join(ROOT, "docs", "json-model-format.md"), encoding="utf-8") as handle:
        text = handle.read()
    for name in (service.JSON_ESTIMATORS | set(service.JSON_OBJECTS) | set(service.JSON_STRUCTURES) |
                 set(service.JSON_NEIGHBOR_TREES)):
        assert f"`{name}`" in text, name
