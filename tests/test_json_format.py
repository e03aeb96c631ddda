"""The JSON model format: exact round trips, an allow-list that imports nothing else, strict documents."""

import base64
import functools
import json
import math
import os
import sys

import numpy as np
import pytest
import sklearn.linear_model as sklearn_linear_model
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import (ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge,
                                  RidgeClassifier)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler

import service
from support import IRIS_FEATURES

METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "transform")


# -- data: scikit-learn's bundled datasets, loaded once ------------------------------------------------

@functools.lru_cache(maxsize=None)
def dataset(name):
    """(X, y) for a short name; X is an array or, for *_frame, a DataFrame with named columns."""
    if name == "diabetes":
        return load_diabetes(return_X_y=True)
    if name == "diabetes_float32":
        features, target = load_diabetes(return_X_y=True)
        return features.astype(np.float32), target.astype(np.float32)
    if name == "diabetes_two_targets":
        features, target = load_diabetes(return_X_y=True)
        return features, np.column_stack([target, np.log(target)])
    if name == "diabetes_frame":
        data = load_diabetes(as_frame=True)
        return data.data, data.target
    if name == "breast_cancer":
        return load_breast_cancer(return_X_y=True)
    if name == "breast_cancer_scaled":
        features, target = load_breast_cancer(return_X_y=True)
        return StandardScaler().fit_transform(features), target
    if name == "iris":
        return load_iris(return_X_y=True)
    if name == "iris_names":
        data = load_iris()
        return data.data, data.target_names[data.target]
    if name == "iris_frame":
        data = load_iris(as_frame=True)
        frame = data.data.set_axis(IRIS_FEATURES, axis=1)
        return frame, data.target.map(dict(enumerate(data.target_names)))   # object-dtype labels
    raise KeyError(name)


def fitted(make, data):
    features, target = dataset(data)
    return make().fit(features, target)



ROUND_TRIPS = [
    pytest.param(LinearRegression, "diabetes", id="LinearRegression"),
    pytest.param(lambda: Ridge(alpha=0.5), "diabetes", id="Ridge"),
    pytest.param(lambda: Ridge(alpha=0.5), "diabetes_float32", id="Ridge-float32"),
    pytest.param(lambda: Ridge(alpha=0.5), "diabetes_two_targets", id="Ridge-two-targets"),
    pytest.param(lambda: Lasso(alpha=0.1), "diabetes", id="Lasso"),
    pytest.param(lambda: ElasticNet(alpha=0.01, l1_ratio=0.5), "diabetes", id="ElasticNet"),
    pytest.param(RidgeClassifier, "breast_cancer_scaled", id="RidgeClassifier-binary"),
    pytest.param(RidgeClassifier, "iris", id="RidgeClassifier-multiclass"),
    pytest.param(LogisticRegression, "breast_cancer_scaled", id="LogisticRegression-binary"),
    pytest.param(lambda: LogisticRegression(max_iter=1000), "iris", id="LogisticRegression-multiclass"),
    pytest.param(lambda: LogisticRegression(max_iter=1000), "iris_names", id="LogisticRegression-string-labels"),
    pytest.param(StandardScaler, "diabetes", id="StandardScaler"),
    pytest.param(MinMaxScaler, "iris", id="MinMaxScaler"),
    pytest.param(MaxAbsScaler, "diabetes", id="MaxAbsScaler"),
    pytest.param(RobustScaler, "diabetes", id="RobustScaler"),
    pytest.param(lambda: make_pipeline(StandardScaler(), Ridge(alpha=0.5)), "diabetes",
                 id="Pipeline-StandardScaler-Ridge"),
    pytest.param(lambda: make_pipeline(RobustScaler(), Lasso(alpha=0.1)), "diabetes",
                 id="Pipeline-RobustScaler-Lasso"),
    pytest.param(lambda: make_pipeline(StandardScaler(), LogisticRegression()), "breast_cancer",
                 id="Pipeline-StandardScaler-LogisticRegression-binary"),
    pytest.param(lambda: make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=1000)), "iris_names",
                 id="Pipeline-MinMaxScaler-LogisticRegression-string-labels"),
    pytest.param(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), "iris_frame",
                 id="Pipeline-on-DataFrame-LogisticRegression"),
    pytest.param(lambda: make_pipeline(MaxAbsScaler(), ElasticNet(alpha=0.01)), "diabetes_frame",
                 id="Pipeline-on-DataFrame-ElasticNet"),
    pytest.param(StandardScaler, "iris_frame", id="StandardScaler-on-DataFrame"),
]


# -- helpers ---------------------------------------------------------------------------------------------

def assert_same_value(expected, actual, where="estimator"):
    """Same type, and for numbers the same bits (NaN equals NaN, -0.0 differs from 0.0).

    One documented exception: a numpy string scalar (an item of an object array, say) is
    written as its Python value, so np.str_ comes back as an equal str."""
    if isinstance(expected, np.str_):
        assert type(actual) in (str, np.str_) and actual == expected, where
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        if expected.dtype.kind == "O":
            for i, (left, right) in enumerate(zip(expected.ravel(), actual.ravel())):
                assert_same_value(left, right, f"{where}[{i}]")
        else:
            assert actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes(), where
    elif isinstance(expected, float):
        assert repr(actual) == repr(expected), where
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (left, right) in enumerate(zip(expected, actual)):
            assert_same_value(left, right, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same_value(expected[key], actual[key], f"{where}[{key!r}]")
    elif hasattr(expected, "get_params"):
        assert sorted(vars(actual)) == sorted(vars(expected)), where
        for key, value in vars(expected).items():
            assert_same_value(value, vars(actual)[key], f"{where}.{key}")
    else:
        assert actual == expected, where


def outputs(estimator, features):
    return {method: getattr(estimator, method)(features) for method in METHODS if hasattr(estimator, method)}


def document_of(estimator):
    return json.loads(service.dump_json_model(estimator))


def strict_loads(text):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def b64(array):
    return base64.b64encode(np.asarray(array).tobytes()).decode()


@pytest.fixture(scope="module")
def ridge():
    return fitted(lambda: Ridge(alpha=0.5), "diabetes")


@pytest.fixture(scope="module")
def ridge_document(ridge):
    return document_of(ridge)


@pytest.fixture(scope="module")
def pipeline_document():
    return document_of(fitted(lambda: make_pipeline(StandardScaler(), Ridge(alpha=0.5)), "diabetes"))


def with_extra(document, node):
    """A copy of a Ridge document whose state carries one more attribute, `extra`."""
    document = json.loads(json.dumps(document))
    document["estimator"]["state"]["extra"] = node
    return json.dumps(document)


# -- round trips -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, data", ROUND_TRIPS)
def test_round_trip_through_a_file_gives_bit_identical_outputs(tmp_path, make, data):
    original = fitted(make, data)
    features, _ = dataset(data)
    path = tmp_path / "model.json"
    service.save_json_model(original, path)
    loaded = service.load_json_model(path)

    assert type(loaded) is type(original)
    expected, actual = outputs(original, features), outputs(loaded, features)
    assert expected and list(actual) == list(expected)
    for method, values in expected.items():
        assert actual[method].dtype == values.dtype, method
        assert actual[method].shape == values.shape, method
        assert np.array_equal(actual[method], values), method


@pytest.mark.parametrize("make, data", ROUND_TRIPS)
def test_round_trip_restores_every_attribute_with_its_type_dtype_and_bits(make, data):
    original = fitted(make, data)
    loaded = service.load_json_model(service.dump_json_model(original))
    assert_same_value(original, loaded)


def test_feature_names_fitted_on_a_dataframe_survive():
    original = fitted(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), "iris_frame")
    loaded = service.load_json_model(service.dump_json_model(original))
    assert loaded.feature_names_in_.dtype == object
    assert loaded.feature_names_in_.tolist() == IRIS_FEATURES
    assert loaded[0].feature_names_in_.tolist() == IRIS_FEATURES
    assert loaded.classes_.dtype == object and loaded.classes_.tolist() == ["setosa", "versicolor", "virginica"]


def test_fitted_arrays_keep_dtype_and_shape():
    classifier = fitted(lambda: LogisticRegression(max_iter=1000), "iris_names")
    loaded = service.load_json_model(service.dump_json_model(classifier))
    assert loaded.coef_.dtype == np.float64 and loaded.coef_.shape == (3, 4)
    assert loaded.intercept_.dtype == np.float64 and loaded.intercept_.shape == (3,)
    assert loaded.n_iter_.dtype == np.int32 and loaded.n_iter_.shape == (1,)
    assert loaded.classes_.dtype == np.dtype("<U10") and loaded.classes_.tolist() == ["setosa", "versicolor",
                                                                                        "virginica"]
    assert type(loaded.n_features_in_) is int

    lasso = service.load_json_model(service.dump_json_model(fitted(lambda: Lasso(alpha=0.1), "diabetes")))
    assert type(lasso.intercept_) is np.float64 and type(lasso.dual_gap_) is np.float64
    assert type(lasso.n_iter_) is int

    scaler = service.load_json_model(service.dump_json_model(fitted(StandardScaler, "diabetes_float32")))
    original = fitted(StandardScaler, "diabetes_float32")
    for attr in ("mean_", "var_", "scale_"):
        assert getattr(scaler, attr).dtype == getattr(original, attr).dtype
        assert getattr(scaler, attr).shape == (10,)
    assert type(scaler.n_samples_seen_) is type(original.n_samples_seen_)

    robust = service.load_json_model(service.dump_json_model(fitted(RobustScaler, "diabetes")))
    assert robust.quantile_range == (25.0, 75.0) and type(robust.quantile_range) is tuple


@pytest.mark.parametrize("value", [
    pytest.param(np.arange(6, dtype=np.uint8), id="uint8"),
    pytest.param(np.array([0.1, -0.0, 1e-310], dtype=np.float16), id="float16"),
    pytest.param(np.array([1 + 2j, -3j], dtype=np.complex64), id="complex64"),
    pytest.param(np.array([True, False]), id="bool"),
    pytest.param(np.zeros((0, 3)), id="empty-2d"),
    pytest.param(np.array(3.5), id="zero-d"),
    pytest.param(np.asfortranarray(np.arange(12.0).reshape(3, 4)), id="fortran-order"),
    pytest.param(np.array(["a", "bc", ""]), id="unicode"),
    pytest.param(np.array(["a", None, 1, 2.5], dtype=object), id="object-mixed"),
    pytest.param(np.array([[1, 2], [3, 4]], dtype=object), id="object-2d"),
    pytest.param(np.int32(7), id="scalar-int32"),
    pytest.param(np.float32(0.1), id="scalar-float32"),
    pytest.param(np.bool_(True), id="scalar-bool"),
    pytest.param(np.dtype("<f4"), id="dtype"),
    pytest.param({"a": (1, 2.5), 3: [None, True]}, id="dict-with-int-key-and-tuple"),
])
def test_state_values_keep_type_dtype_shape_and_bits(ridge, value):
    ridge = service.load_json_model(service.dump_json_model(ridge))   # a private copy to decorate
    ridge.extra = value
    loaded = service.load_json_model(service.dump_json_model(ridge))
    assert_same_value(value, loaded.extra, "extra")
    if isinstance(value, np.ndarray):
        assert np.array_equal(loaded.extra, value)


def test_a_big_endian_array_is_written_as_its_values_and_loads_in_little_endian_order(ridge):
    """A file names no byte order: numbers are little-endian, whatever order the array had in memory."""
    ridge = service.load_json_model(service.dump_json_model(ridge))
    ridge.extra = np.arange(6, dtype=">i4").reshape(2, 3)
    node = json.loads(service.dump_json_model(ridge))["estimator"]["state"]["extra"]
    assert node["dtype"] == "<i4"
    loaded = service.load_json_model(service.dump_json_model(ridge)).extra
    assert loaded.dtype == np.dtype("<i4") and np.array_equal(loaded, ridge.extra)


@pytest.mark.parametrize("name", [
    name
    for name in service._NUMPY_TYPES])
def test_every_listed_numpy_scalar_type_round_trips(ridge, name):
    ridge = service.load_json_model(service.dump_json_model(ridge))
    ridge.extra = getattr(np, name)
    assert service.load_json_model(service.dump_json_model(ridge)).extra is getattr(np, name)


def test_output_is_deterministic(tmp_path):
    first = fitted(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), "iris_frame")
    second = fitted(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), "iris_frame")
    text = service.dump_json_model(first)
    assert service.dump_json_model(first) == text
    assert service.dump_json_model(second) == text
    assert service.dump_json_model(service.load_json_model(text)) == text
    service.save_json_model(first, tmp_path / "a.json")
    service.save_json_model(second, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == text.encode("utf-8")


def test_document_header_names_format_version_and_class(ridge):
    document = strict_loads(service.dump_json_model(ridge))
    assert document["format"] == "model-service/sklearn-json"
    assert document["format_version"] == 2
    assert document["estimator"]["$type"] == "estimator"
    assert document["estimator"]["class"] == "sklearn.linear_model.Ridge"


def test_load_accepts_text_bytes_and_paths(tmp_path, ridge):
    text = service.dump_json_model(ridge)
    path = tmp_path / "ridge.json"
    service.save_json_model(ridge, path)
    features, _ = dataset("diabetes")
    expected = ridge.predict(features)
    for source in (text, text.encode("utf-8"), path, str(path)):
        assert np.array_equal(service.load_json_model(source).predict(features), expected)


# -- non-finite numbers ----------------------------------------------------------------------------------

def test_non_finite_floats_round_trip_and_the_file_stays_strict_json(tmp_path, ridge):
    ridge = service.load_json_model(service.dump_json_model(ridge))
    ridge.extra_float = float("inf")        # a parameter may not be infinite: scikit-learn refuses it (see below)
    ridge.extra = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                   "tuple": (float("nan"), 1.5), "numpy scalar": np.float64("-inf"),
                   "array": np.array([np.nan, np.inf, -np.inf, -0.0])}
    path = tmp_path / "model.json"
    service.save_json_model(ridge, path)

    text = path.read_text(encoding="utf-8")
    strict_loads(text)                     # no NaN / Infinity tokens anywhere
    loaded = service.load_json_model(path)
    assert loaded.extra_float == math.inf
    assert_same_value(ridge.extra, loaded.extra, "extra")
    features, _ = dataset("diabetes")
    assert np.array_equal(loaded.predict(features), ridge.predict(features))


def test_a_parameter_outside_scikit_learns_own_constraints_is_refused(ridge_document):
    """A fitted model's parameters passed scikit-learn's validation at fit; a forged one is judged the same."""
    ridge_document["estimator"]["state"]["tol"] = {"$type": "float", "value": "inf"}
    with pytest.raises(service.ArtifactError, match="The 'tol' parameter of Ridge must be"):
        service.load_json_model(json.dumps(ridge_document))


# -- the allow-list on load ------------------------------------------------------------------------------

@pytest.mark.parametrize("class_name", [
    "os.system", "subprocess.Popen", "builtins.eval", "sklearn.neural_network.MLPClassifier",
    "sklearn.linear_model._ridge.Ridge", "sklearn.linear_model.Ridge ", "Ridge",
])
def test_load_refuses_a_class_outside_the_allow_list(ridge_document, class_name):
    document = json.loads(json.dumps(ridge_document))
    document["estimator"]["class"] = class_name
    with pytest.raises(service.ArtifactError) as caught:
        service.load_json_model(json.dumps(document))
    assert repr(class_name) in str(caught.value)
    assert "not allowed" in str(caught.value)


@pytest.mark.parametrize("class_name", ["turtle.Turtle", "this.Zen", "antigravity.fly", "smtplib.SMTP"])
def test_a_refused_class_does_not_import_its_module(ridge_document, pipeline_document, class_name, capsys):
    module = class_name.rpartition(".")[0]
    if module in sys.modules:
        pytest.skip(f"{module} was imported by something else; cannot observe the import")
    top = json.loads(json.dumps(ridge_document))
    top["estimator"]["class"] = class_name
    nested = json.loads(json.dumps(pipeline_document))
    nested["estimator"]["state"]["steps"][1]["items"][1]["class"] = class_name
    for document in (top, nested):
        before = set(sys.modules)
        with pytest.raises(service.ArtifactError, match=repr(class_name).replace(".", r"\.")):
            service.load_json_model(json.dumps(document))
        assert module not in sys.modules
        assert set(sys.modules) - before == set()
    assert capsys.readouterr() == ("", "")          # `import this` would have printed the Zen


def test_load_refuses_a_refused_class_inside_a_pipeline_step(pipeline_document):
    document = json.loads(json.dumps(pipeline_document))
    step = document["estimator"]["state"]["steps"][0]["items"][1]
    assert step["class"] == "sklearn.preprocessing.StandardScaler"
    step["class"] = "subprocess.Popen"
    with pytest.raises(service.ArtifactError, match="'subprocess.Popen'") as caught:
        service.load_json_model(json.dumps(document))
    assert "estimator.steps[0][1]" in str(caught.value)


# -- malformed documents ---------------------------------------------------------------------------------

def _header(**changes):
    def mutate(document):
        document.update(changes)
        for key, value in changes.items():
            if value is None:
                del document[key]
        return json.dumps(document)
    return mutate


def _extra(node):
    return lambda document: with_extra(document, node)


def _estimator(**changes):
    def mutate(document):
        document["estimator"].update(changes)
        for key, value in changes.items():
            if value is None:
                del document["estimator"][key]
        return json.dumps(document)
    return mutate


MALFORMED = [
    pytest.param(lambda d: b"not json at all", "not valid JSON", id="not-json-bytes"),
    pytest.param(lambda d: "{not json", "not valid JSON", id="not-json-text"),
    pytest.param(lambda d: json.dumps(d)[:-20], "not valid JSON", id="truncated"),
    pytest.param(lambda d: b"\xff\xfe{}", "not valid JSON", id="not-utf8"),
    pytest.param(lambda d: b"[1, 2]", "not a JSON model document", id="a-list"),
    pytest.param(lambda d: b"null", "not a JSON model document", id="null"),
    pytest.param(_header(format="model-service/onnx"), "not a JSON model document", id="wrong-format"),
    pytest.param(_header(format=None), "not a JSON model document", id="no-format"),
    pytest.param(_header(format_version=3), "unsupported format_version 3", id="format-version-3"),
    pytest.param(_header(format_version=True), "unsupported format_version True", id="format-version-true"),
    pytest.param(_header(format_version="1"), "unsupported format_version '1'", id="format-version-string"),
    pytest.param(_header(format_version=None), "unsupported format_version None", id="no-format-version"),
    pytest.param(_header(estimator=None), "not an estimator", id="no-estimator"),
    pytest.param(_header(estimator=[1, 2]), "not an estimator", id="estimator-is-a-list"),
    pytest.param(_header(estimator={"$type": "dtype", "dtype": "<f8"}), "not an estimator",
                 id="estimator-is-a-dtype"),
    pytest.param(_estimator(**{"$type": "function"}), "unknown node type 'function'", id="unknown-type-top"),
    pytest.param(_estimator(**{"$type": None}), "unknown node type None", id="no-type"),
    pytest.param(_estimator(state=[1]), "state must be an object", id="state-is-a-list"),
    pytest.param(_estimator(state=None), "malformed estimator node", id="no-state"),
    pytest.param(_estimator(**{"class": None}), "malformed estimator node", id="no-class"),
    pytest.param(_estimator(**{"class": ["sklearn.linear_model.Ridge"]}), "is not allowed",
                 id="class-is-a-list"),
    pytest.param(_extra({"$type": "pickle", "data": "gASV"}), "unknown node type 'pickle'", id="unknown-type-nested"),
    pytest.param(_extra({"no": "type"}), "unknown node type None", id="untagged-object"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "V8", "shape": [1], "data": b64([1.0])}),
                 "dtype 'V8' is not allowed", id="dtype-void"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<M8[ns]", "shape": [1], "data": b64([1])}),
                 "dtype '<M8[ns]' is not allowed", id="dtype-datetime"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "|S4", "shape": [1], "data": b64(b"abcd")}),
                 "dtype '|S4' is not allowed", id="dtype-bytes"),
    pytest.param(_extra({"$type": "ndarray", "dtype": [["a", "<f8"]], "shape": [1], "data": b64([1.0])}),
                 "is not allowed", id="dtype-structured-list"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "[('a', '<f8')]", "shape": [1], "data": b64([1.0])}),
                 "is not allowed", id="dtype-structured-text"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8,<i4", "shape": [1], "data": b64([1.0])}),
                 "is not allowed", id="dtype-comma-structured"),
    pytest.param(_extra({"$type": "scalar", "dtype": "V8", "data": b64([1.0])}), "is not allowed",
                 id="scalar-dtype-void"),
    pytest.param(_extra({"$type": "dtype", "dtype": "<m8[s]"}), "is not allowed", id="dtype-node-timedelta"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [3], "data": b64([1.0, 2.0])}),
                 "do not hold 3 values", id="data-shorter-than-shape"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [1], "data": b64([1.0, 2.0])}),
                 "do not hold 1 values", id="data-longer-than-shape"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [1],
                         "data": base64.b64encode(b"1234567").decode()}),
                 "do not hold 1 values", id="data-not-a-multiple-of-itemsize"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<U2", "shape": [3], "items": ["a", "b"]}),
                 "do not fill shape", id="items-fewer-than-shape"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [1], "data": "!!not base64!!"}),
                 "malformed ndarray node", id="data-not-base64"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [1]}), "malformed ndarray node",
                 id="data-missing"),
    pytest.param(_extra({"$type": "ndarray", "dtype": "<f8", "shape": [10 ** 20], "data": b64([1.0])}),
                 "bytes of arrays (--json-max-array-bytes)", id="absurd-shape"),
    pytest.param(_extra({"$type": "scalar", "dtype": "<f8", "data": base64.b64encode(b"123").decode()}),
                 "do not hold 1 values", id="scalar-data-not-a-multiple-of-itemsize"),
    pytest.param(_extra({"$type": "type", "name": "os"}), "numpy type 'os' is not allowed", id="type-os"),
    pytest.param(_extra({"$type": "type", "name": "void"}), "numpy type 'void' is not allowed", id="type-void"),
    pytest.param(_extra({"$type": "type", "name": "object_"}), "is not allowed", id="type-object"),
    pytest.param(_extra({"$type": "type", "name": "datetime64"}), "is not allowed", id="type-datetime64"),
    pytest.param(_extra({"$type": "type", "name": "__class__"}), "is not allowed", id="type-dunder"),
    pytest.param(_extra({"$type": "type", "name": ["float64"]}), "is not allowed", id="type-name-a-list"),
    pytest.param(_extra({"$type": "float", "value": "1e400"}), "bad float", id="float-not-a-non-finite-name"),
    pytest.param(_extra({"$type": "float", "value": "Infinity"}), "bad float", id="float-javascript-name"),
    pytest.param(_extra({"$type": "dict", "items": [["only key"]]}), "malformed dict node", id="dict-bad-pair"),
    pytest.param(_extra({"$type": "tuple"}), "malformed tuple node", id="tuple-without-items"),
]


@pytest.mark.parametrize("mutate, fragment", MALFORMED)
def test_load_refuses_a_malformed_document(ridge_document, mutate, fragment):
    source = mutate(json.loads(json.dumps(ridge_document)))
    with pytest.raises(service.ArtifactError) as caught:
        service.load_json_model(source)
    assert fragment in str(caught.value)


def test_load_refuses_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_bytes(b"\x80\x04\x95 a pickle, not JSON")
    with pytest.raises(service.ArtifactError, match="not valid JSON"):
        service.load_json_model(path)


def test_load_refuses_a_scalar_without_data(ridge_document):
    with pytest.raises(service.ArtifactError):
        service.load_json_model(with_extra(ridge_document, {"$type": "scalar", "dtype": "<f8", "data": ""}))


def test_load_refuses_a_scalar_with_more_than_one_value(ridge_document):
    with pytest.raises(service.ArtifactError):
        service.load_json_model(with_extra(ridge_document, {"$type": "scalar", "dtype": "<f8",
                                                            "data": b64([1.0, 2.0])}))


@pytest.mark.parametrize("shape, values", [([-1], 3), ("3", 3), ([2.7], 2)], ids=["negative", "string", "float"])
def test_load_refuses_an_ndarray_whose_shape_is_not_a_list_of_sizes(ridge_document, shape, values):
    with pytest.raises(service.ArtifactError):
        service.load_json_model(with_extra(ridge_document, {"$type": "ndarray", "dtype": "<f8", "shape": shape,
                                                            "data": b64(np.arange(float(values)))}))


def _deepest_nesting_json_accepts():
    """The deepest list nesting json.loads parses here (its limit differs between Python versions)."""
    for depth in (5000, 3000, 2000, 1500, 1200, 1000, 900, 800, 700, 600):
        try:
            json.loads("[" * (depth + 50) + "]" * (depth + 50))
        except RecursionError:
            continue
        return depth
    pytest.skip("json.loads refuses even modest nesting here")


def test_load_refuses_a_document_nested_too_deeply(ridge_document):
    depth = _deepest_nesting_json_accepts()
    text = with_extra(ridge_document, "DEEP").replace('"DEEP"', "[" * depth + "]" * depth)
    with pytest.raises(service.ArtifactError):
        service.load_json_model(text)


# -- export refuses what it cannot represent -------------------------------------------------------------

def test_export_refuses_an_estimator_class_outside_the_allow_list(tmp_path):
    tree = fitted(LinearDiscriminantAnalysis, "iris")
    with pytest.raises(service.ArtifactError) as caught:
        service.dump_json_model(tree)
    assert "LinearDiscriminantAnalysis is not supported by the JSON model format" in str(caught.value)
    assert "sklearn.linear_model.Ridge" in str(caught.value)     # lists what is supported
    with pytest.raises(service.ArtifactError):
        service.save_json_model(tree, tmp_path / "tree.json")
    assert os.listdir(tmp_path) == []


def test_export_refuses_a_subclass_even_one_posing_as_an_allowed_class():
    class Ridge(sklearn_linear_model.Ridge):
        pass
    Ridge.__module__ = "sklearn.linear_model"        # same module and name as the allowed class
    model = fitted(Ridge, "diabetes")
    with pytest.raises(service.ArtifactError, match="Ridge is not supported by the JSON model format"):
        service.dump_json_model(model)
    pipeline = fitted(lambda: make_pipeline(StandardScaler(), Ridge()), "diabetes")
    with pytest.raises(service.ArtifactError, match=r"estimator\.steps\[1\]\[1\]"):
        service.dump_json_model(pipeline)


def test_export_refuses_a_pipeline_with_a_step_outside_the_allow_list(tmp_path):
    pipeline = fitted(lambda: make_pipeline(StandardScaler(), LinearDiscriminantAnalysis()), "iris")
    with pytest.raises(service.ArtifactError) as caught:
        service.save_json_model(pipeline, tmp_path / "lda.json")
    message = str(caught.value)
    assert "estimator.steps[1][1]" in message
    assert "sklearn.discriminant_analysis.LinearDiscriminantAnalysis is not supported" in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("attribute, value, fragment", [
    ("callback_", lambda x: x, "estimator.callback_"),
    ("masked_", np.ma.masked_array([1.0, 2.0], mask=[0, 1]), "estimator.masked_"),
    ("note_", object(), "estimator.note_"),
    ("cache_", {"key": {1, b"bytes"}}, "estimator.cache_['key']"),
    ("items_", [1, b"bytes"], "estimator.items_[1]"),
])
def test_export_refuses_an_unrepresentable_attribute_and_names_it(ridge, attribute, value, fragment):
    ridge = service.load_json_model(service.dump_json_model(ridge))
    setattr(ridge, attribute, value)
    with pytest.raises(service.ArtifactError) as caught:
        service.dump_json_model(ridge)
    assert fragment in str(caught.value)
    assert "is not supported by the JSON model format" in str(caught.value)


def test_export_refuses_an_unrepresentable_attribute_inside_a_pipeline_step():
    pipeline = fitted(lambda: make_pipeline(StandardScaler(), Ridge()), "diabetes")
    pipeline[-1].hook_ = print
    with pytest.raises(service.ArtifactError, match=r"estimator\.steps\[1\]\[1\]\.hook_"):
        service.dump_json_model(pipeline)


# -- writing the file ------------------------------------------------------------------------------------

def test_save_writes_through_a_temporary_file_and_leaves_none_behind(tmp_path, ridge):
    path = tmp_path / "model.json"
    service.save_json_model(ridge, path)
    assert os.listdir(tmp_path) == ["model.json"]
    assert path.read_text(encoding="utf-8") == service.dump_json_model(ridge)
    lasso = fitted(lambda: Lasso(alpha=0.1), "diabetes")
    service.save_json_model(lasso, str(path))                     # replaces, by str path too
    assert os.listdir(tmp_path) == ["model.json"]
    assert type(service.load_json_model(path)) is Lasso


def test_save_replaces_the_file_by_rename_not_in_place(tmp_path, ridge):
    path = tmp_path / "model.json"
    service.save_json_model(ridge, path)
    before = os.stat(path).st_ino
    service.save_json_model(ridge, path)
    assert os.stat(path).st_ino != before        # a new file renamed over the old, never rewritten


def test_a_failed_save_keeps_the_previous_file(tmp_path, ridge):
    path = tmp_path / "model.json"
    service.save_json_model(ridge, path)
    broken = service.load_json_model(service.dump_json_model(ridge))
    broken.hook_ = lambda x: x
    with pytest.raises(service.ArtifactError):
        service.save_json_model(broken, path)
    assert path.read_text(encoding="utf-8") == service.dump_json_model(ridge)
    assert os.listdir(tmp_path) == ["model.json"]


def test_a_save_that_fails_while_writing_leaves_no_temporary_file(tmp_path, ridge):
    path = tmp_path / "model.json"
    service.save_json_model(ridge, path)
    odd = service.load_json_model(service.dump_json_model(ridge))
    odd.note_ = "lone surrogate \ud800"
    try:
        service.save_json_model(odd, path)
    except (service.ArtifactError, UnicodeError):
        assert path.read_text(encoding="utf-8") == service.dump_json_model(ridge)
    else:
        assert service.load_json_model(path).note_ == odd.note_
    assert os.listdir(tmp_path) == ["model.json"]


# -- served over HTTP ------------------------------------------------------------------------------------

def _strict_body(response):
    assert response.content_type == "application/json"
    return strict_loads(response.body.decode("utf-8"))


@pytest.mark.parametrize("make, data, methods", [
    pytest.param(lambda: LogisticRegression(max_iter=1000), "iris",
                 ("predict", "predict_proba", "predict_log_proba", "decision_function"), id="LogisticRegression"),
    pytest.param(lambda: make_pipeline(StandardScaler(), Ridge(alpha=0.5)), "diabetes", ("predict",),
                 id="Pipeline-Ridge"),
    pytest.param(lambda: Lasso(alpha=0.1), "diabetes", ("predict",), id="Lasso"),
    pytest.param(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), "iris_frame",
                 ("predict", "predict_proba"), id="Pipeline-on-DataFrame-string-labels"),
    pytest.param(RobustScaler, "diabetes", ("transform",), id="RobustScaler"),
])
def test_a_json_artifact_served_over_http_predicts_exactly_like_the_original(
        tmp_path, make_client, make, data, methods):
    original = fitted(make, data)
    features, _ = dataset(data)
    (tmp_path / "store").mkdir()
    service.save_json_model(original, tmp_path / "store" / "model.json")
    client = make_client(tmp_path / "store")
    rows = np.asarray(features)[:25]
    inputs = features.iloc[:25] if hasattr(features, "iloc") else rows
    for method in methods:
        body = _strict_body(client.post_json(f"/models/model/predict?method={method}",
                                             {"instances": rows.tolist()}))
        assert body["model"] == "model" and body["version"] == "1" and body["method"] == method
        assert body["predictions"] == getattr(original, method)(inputs).tolist()
    listing = _strict_body(client.get("/models/model"))
    assert listing["versions"][0]["format"] == "json"
