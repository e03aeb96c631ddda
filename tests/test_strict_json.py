"""Strict, predictable inputs, the same in the four protocols (README, "Inputs"): request bodies are RFC 8259
JSON (no NaN or Infinity tokens, no number beyond a float's range), null is a missing value, and a tabular
model's numbers are JSON numbers: text or booleans are never turned into numbers.  Strings that are no
number's spelling still reach models that take them (categorical columns).  MLflow's CSV is text by nature
and its numbers are read from it."""

import json
import urllib.parse

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from support import IRIS_FEATURES, ROW, ROWS, write_artifact


@pytest.fixture(scope="module")
def nan_tolerant():
    """Takes missing values, so a null is answered and the answer can be compared with scikit-learn's."""
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    return HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(frame, data.target)


@pytest.fixture(scope="module")
def categorical():
    """Numbers and a string column, one-hot encoded by a ColumnTransformer: fed DataFrames of objects."""
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    frame["colour"] = np.array(["red", "green", "blue"], dtype=object)[np.arange(len(frame)) % 3]
    columns = ColumnTransformer([("numbers", "passthrough", IRIS_FEATURES),
                                 ("colour", OneHotEncoder(handle_unknown="ignore"), ["colour"])])
    return make_pipeline(columns, LogisticRegression(max_iter=1000)).fit(frame, data.target)


@pytest.fixture
def client_for(tmp_path, make_client):
    """client_for(estimator) -> a WebTest client over a store holding it as model "m"."""
    def make(estimator):
        write_artifact(tmp_path / "m.joblib", estimator, "joblib")
        return make_client(tmp_path)
    return make


@pytest.fixture
def nan_client(client_for, nan_tolerant):
    return client_for(nan_tolerant)


def bodies(rows_text):
    """(path, body) per protocol, each carrying the JSON text of rows of four features."""
    v2 = ('{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": %s}]}' % rows_text)
    named = '{"dataframe_split": {"columns": %s, "data": %s}}' % (json.dumps(IRIS_FEATURES), rows_text)
    return {"native": ("/models/m/predict", '{"instances": %s}' % rows_text),
            "tf": ("/v1/models/m:predict", '{"instances": %s}' % rows_text),
            "v2": ("/v2/models/m/infer", v2),
            "mlflow": ("/invocations", named)}


def post(client, path, body):
    return client.post(path, body.encode(), content_type="application/json", expect_errors=True)


@pytest.mark.parametrize("rows, why", [
    ("[[NaN, 3.5, 1.4, 0.2]]", "NaN is not a JSON value"),
    ("[[Infinity, 3.5, 1.4, 0.2]]", "Infinity is not a JSON value"),
    ("[[-Infinity, 3.5, 1.4, 0.2]]", "-Infinity is not a JSON value"),
    ("[[1e400, 3.5, 1.4, 0.2]]", "out of a float's range"),
])
def test_non_standard_json_is_refused_in_every_protocol(nan_client, rows, why):
    for protocol, (path, body) in bodies(rows).items():
        response = post(nan_client, path, body)
        assert response.status_int == 400, (protocol, response.text)
        assert why in response.text, (protocol, response.text)
        if "NaN" in why or "Infinity" in why:
            assert "null" in response.text, "the refusal says what to send instead"


@pytest.mark.parametrize("rows", ['[["5.1", 3.5, 1.4, 0.2]]', '[[5.1, "3.5e0", 1.4, 0.2]]', '[[5.1, 3.5, "nan", 0.2]]',
                                  '[[5.1, 3.5, 1.4, true]]'])
def test_text_or_booleans_for_numbers_are_refused_in_every_protocol(nan_client, rows):
    for protocol, (path, body) in bodies(rows).items():
        response = post(nan_client, path, body)
        assert response.status_int == 400, (protocol, response.text)
        if protocol != "v2":          # V2 FP64 data is refused by its datatype, before any feature is named
            assert "not a number" in response.text and "feature" in response.text, (protocol, response.text)


def test_null_is_a_missing_value_in_every_protocol(nan_client, nan_tolerant):
    expected = nan_tolerant.predict(pd.DataFrame([[np.nan, 3.5, 1.4, 0.2]], columns=IRIS_FEATURES)).tolist()
    for protocol, (path, body) in bodies("[[null, 3.5, 1.4, 0.2]]").items():
        response = post(nan_client, path, body)
        assert response.status_int == 200, (protocol, response.text)
        answer = response.json
        predictions = (answer["outputs"][0]["data"] if protocol == "v2" else
                       answer["predictions"])
        assert predictions == expected, protocol


def test_named_rows_and_columns_follow_the_same_rule(nan_client):
    response = nan_client.post_json("/models/m/predict", {"instances": [dict(zip(IRIS_FEATURES, ["5.1", 3.5, 1.4, 0.2]))]},
                                    expect_errors=True)
    assert response.status_int == 400 and "'sepal_length'" in response.json["error"]
    response = nan_client.post_json("/v1/models/m:predict",
                                    {"inputs": {name: [value] for name, value in zip(IRIS_FEATURES, [5.1, "3.5", 1.4, 0.2])}},
                                    expect_errors=True)
    assert response.status_int == 400 and "'sepal_width'" in response.json["error"]
    response = nan_client.post_json("/v1/models/m:classify",
                                    {"examples": [dict(zip(IRIS_FEATURES, [5.1, 3.5, 1.4, False]))]}, expect_errors=True)
    assert response.status_int == 400 and "'petal_width'" in response.json["error"]


def test_csv_numbers_are_read_from_text(nan_client, nan_tolerant):
    """CSV has no types: a column whose every cell reads as a number is numbers, empty cells are missing."""
    csv = ",".join(IRIS_FEATURES) + "\n5.1,3.5,1.4,0.2\n,3.0,5.2,2.3\n"
    response = nan_client.post("/invocations", csv.encode(), content_type="text/csv")
    frame = pd.DataFrame([[5.1, 3.5, 1.4, 0.2], [np.nan, 3.0, 5.2, 2.3]], columns=IRIS_FEATURES)
    assert response.json["predictions"] == nan_tolerant.predict(frame).tolist()


def test_categorical_strings_still_reach_a_model_that_takes_them(client_for, categorical):
    client = client_for(categorical)
    row = dict(zip(IRIS_FEATURES, ROWS[0]), colour="green")
    expected = categorical.predict_proba(pd.DataFrame([row])).tolist()
    answer = client.post_json("/models/m/predict", {"instances": [row], "method": "predict_proba"})
    assert answer.json["predictions"] == expected
    answer = client.post_json("/invocations", {"dataframe_records": [row]})
    assert answer.status_int == 200
    refused = client.post_json("/models/m/predict", {"instances": [{**row, "sepal_length": "5.1"}]},
                               expect_errors=True)
    assert refused.status_int == 400 and "'sepal_length'" in refused.json["error"]


@pytest.mark.parametrize("sentence, why", [("[[NaN, 3.5, 1.4, 0.2]]", "NaN is not a JSON value"),
                                           ("[[1e400, 3.5, 1.4, 0.2]]", "out of a float's range"),
                                           ("[(1e400, 3.5, 1.4, 0.2)]", "beyond a float's range")])
def test_the_seed_route_reads_its_url_as_strictly(nan_client, sentence, why):
    """GET /predict/<sen> takes JSON or a Python literal; neither may carry what JSON cannot."""
    response = nan_client.get("/predict/" + urllib.parse.quote(sentence), expect_errors=True)
    assert response.status_int == 400 and why in response.json["error"], response.text


def test_v2_text_tensors_of_a_tabular_model_follow_the_same_rule(nan_client):
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "BYTES", "data": ["5.1", "3.5", "1.4", "0.2"]}]}
    response = nan_client.post_json("/v2/models/m/infer", body, expect_errors=True)
    assert response.status_int == 400 and "not a number" in response.json["error"], response.text


# -- a member named twice -------------------------------------------------------------------------------------

def duplicated_bodies():
    """(protocol, path, body) naming one member twice, at the top and deep inside, in every protocol's JSON."""
    rows = "[[5.1, 3.5, 1.4, 0.2]]"
    tensor = '{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}'
    return [
        ("native", "/models/m/predict", '{"instances": %s, "method": "predict", "method": "predict_proba"}' % rows),
        ("native", "/models/m/predict", '{"instances": [{"sepal_length": 5.1, "sepal_length": 6.0, '
                                        '"sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}'),
        ("seed", "/predict", '{"instances": %s, "instances": [[6.7, 3.0, 5.2, 2.3]]}' % rows),
        ("tf", "/v1/models/m:predict", '{"signature_name": "", "instances": %s, "signature_name": "x"}' % rows),
        ("tf", "/v1/models/m:classify", '{"examples": [{"sepal_length": 5.1, "sepal_length": 5.1}]}'),
        ("v2", "/v2/models/m/infer", '{"inputs": [%s], "parameters": {"a": 1, "b": {"c": 1, "c": 2}}}' % tensor),
        ("v2", "/v2/models/m/infer", '{"inputs": [%s], "inputs": [%s]}' % (tensor, tensor)),
        ("mlflow", "/invocations", '{"dataframe_split": {"columns": %s, "data": %s, "data": %s}}'
         % (json.dumps(IRIS_FEATURES), rows, rows)),
        ("v2 repository", "/v2/repository/index", '{"ready": true, "ready": false}'),
    ]


@pytest.mark.parametrize("protocol, path, body", duplicated_bodies())
def test_a_member_named_twice_is_refused_at_every_depth_in_every_protocol(nan_client, protocol, path, body):
    """Parsers disagree on which of two equal names counts (first, last, both): the body is ambiguous."""
    response = post(nan_client, path, body)
    assert response.status_int == 400, (protocol, response.text)
    assert "names the member" in response.json["error"] and "twice" in response.json["error"], response.text


def test_a_member_named_twice_is_refused_in_query_urls_binary_headers_and_python_literals(nan_client):
    ambiguous = '[{"sepal_length": 5.1, "sepal_length": 6, "sepal_width": 3.5, "petal_length": 1.4, ' \
                '"petal_width": 0.2}]'
    literal = "[{'sepal_length': 5.1, 'sepal_length': 6, 'sepal_width': 3.5, 'petal_length': 1.4, " \
              "'petal_width': 0.2}]"
    header = b'{"inputs": [{"name": "x", "name": "input-0", "shape": [1, 4], "datatype": "FP64", ' \
             b'"parameters": {"binary_data_size": 32}}]}'
    binary = nan_client.post("/v2/models/m/infer", header + np.array(ROW).tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header))},
                             content_type="application/octet-stream", expect_errors=True)
    for response in (nan_client.get("/models/m/predict?instances=" + urllib.parse.quote(ambiguous), expect_errors=True),
                     nan_client.get("/predict/" + urllib.parse.quote(ambiguous), expect_errors=True),
                     nan_client.get("/predict/" + urllib.parse.quote(literal), expect_errors=True),
                     binary):
        assert response.status_int == 400, response.text
        assert 'names the member "sepal_length" twice' in response.json["error"] or \
            'names the member "name" twice' in response.json["error"], response.text
    unique = literal.replace("'sepal_length': 6, ", "")
    assert nan_client.get("/predict/" + urllib.parse.quote(unique)).status_int == 200
