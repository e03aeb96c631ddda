"""Explanations (the "Explanations" appendix), in-process: differential tests against shap (a test-only
dependency) over every covered family, additivity to the model's own answers, refusals of every other
family, and the explain_model entry point on a loaded model."""

import glob
import json
import os
import warnings

import joblib
import numpy as np
import pytest
import shap
import webtest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris, make_classification
from sklearn.ensemble import (ExtraTreesRegressor, GradientBoostingClassifier, HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeRegressor

import service
from families import CASES, fit
from support import ROWS, assert_error, metric_value, strict_json, wait_until, write_artifact, write_settings

TOLERANCE = 1e-9

TREE_FINALS = ("DecisionTreeClassifier", "DecisionTreeRegressor", "ExtraTreeClassifier", "ExtraTreeRegressor",
               "RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier", "ExtraTreesRegressor",
               "GradientBoostingClassifier", "GradientBoostingRegressor", "HistGradientBoostingClassifier",
               "HistGradientBoostingRegressor")
LINEAR_FINALS = ("LinearRegression", "Ridge", "RidgeClassifier", "Lasso", "ElasticNet", "LogisticRegression",
                 "SGDClassifier", "SGDRegressor", "LinearSVC", "LinearSVR")


def final_step(estimator):
    return estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator


def covered(name):
    """Whether the service explains the family: a tree or linear final step, on tabular rows, after steps that
    keep each column's origin (not PCA, not a FeatureUnion), with no categorical splits."""
    factory, data = CASES[name]
    return type(final_step(factory())).__name__ in TREE_FINALS + LINEAR_FINALS and hasattr(data()[0], "shape") \
        and not name.endswith("(categorical)") and name not in ("Pipeline", "FeatureUnion")


def rows_of(x, count=25):
    return x.iloc[:count] if hasattr(x, "iloc") else np.asarray(x[:count])


def three_d(values):
    values = np.asarray(values, dtype=np.float64)
    return values[:, :, None] if values.ndim == 2 else values


def two_d(values):
    values = np.asarray(values, dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


def owners_by_name(estimator, input_names):
    """Which input feature each transformed column comes from, read independently of the service from
    scikit-learn's own output names ("numbers__sepal_width", "colour__colour_red")."""
    try:
        names = estimator[:-1].get_feature_names_out(input_names)
    except AttributeError:          # a FunctionTransformer without names: it keeps every column where it is
        return np.arange(len(input_names))
    owners = []
    for name in names:
        tail = name.split("__")[-1]
        owners.append(max((i for i, feature in enumerate(input_names) if tail.startswith(feature)),
                          key=lambda i: len(input_names[i])))
    return np.array(owners)


def summed_by_owner(values, owners, width):
    out = np.zeros((values.shape[0], width, values.shape[2]))
    for column, owner in enumerate(owners):
        out[:, owner] += values[:, column]
    return out


def shap_reference(estimator, x, rows):
    """shap's own values and expected value for the estimator (its final step, on transformed rows), summed per
    input feature for pipelines: TreeExplainer for trees (raw outputs), LinearExplainer with a zero background
    in the final step's space for linear models."""
    final = final_step(estimator)
    transformed = rows if final is estimator else estimator[:-1].transform(rows)
    transformed = np.asarray(transformed.toarray() if hasattr(transformed, "toarray") else transformed, dtype=float)
    if type(final).__name__ in LINEAR_FINALS:
        explainer = shap.LinearExplainer(final, np.zeros((1, transformed.shape[1])))
    elif type(final) is GradientBoostingClassifier and len(final.classes_) > 2:
        return shap_of_multiclass_boosting(final, transformed)
    else:
        explainer = shap.TreeExplainer(final, model_output="raw")
    values = three_d(explainer.shap_values(transformed))
    expected = np.atleast_1d(np.asarray(explainer.expected_value, dtype=float))
    if final is not estimator:
        input_names = list(rows.columns) if hasattr(rows, "columns") else [f"x{i}" for i in range(rows.shape[1])]
        values = summed_by_owner(values, owners_by_name(estimator, input_names), len(input_names))
    return expected, values


def shap_of_multiclass_boosting(model, X):
    """shap refuses a multi-class GradientBoostingClassifier: give it each class's trees as its own
    dictionary model (the format shap documents for custom trees), scaled by the learning rate."""
    base = model._raw_predict_init(X[:1].astype(np.float32))[0]
    expected, values = [], []
    for k, column in enumerate(model.estimators_.T):
        trees = [{"children_left": t.tree_.children_left, "children_right": t.tree_.children_right,
                  "children_default": t.tree_.children_left, "features": t.tree_.feature,
                  "thresholds": t.tree_.threshold, "values": t.tree_.value[:, 0, :] * model.learning_rate,
                  "node_sample_weight": t.tree_.weighted_n_node_samples} for t in column]
        explainer = shap.TreeExplainer({"trees": trees, "base_offset": base[k], "input_dtype": np.float32})
        values.append(np.asarray(explainer.shap_values(X)))
        expected.append(float(np.atleast_1d(explainer.expected_value)[0]))
    return np.array(expected), np.stack(values, axis=-1)


def explained(estimator, x, **options):
    names = list(x.columns) if hasattr(x, "columns") else None
    return service.Explainer(estimator, x.shape[1], names, **options)


###############################################################################
# Every covered family: equal to shap, adding up to the model's own answer
###############################################################################


@pytest.mark.parametrize("name", [name for name in CASES if covered(name)])
def test_every_covered_family_equals_shap_and_adds_up_to_its_own_answer(name):
    estimator, x = fit(name)
    rows = rows_of(x)
    explainer = explained(estimator, x)
    expected, contributions = explainer.explain(rows)
    reference_expected, reference_values = shap_reference(estimator, x, rows)
    assert contributions.shape == reference_values.shape
    np.testing.assert_allclose(contributions, reference_values, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(expected, reference_expected, rtol=0, atol=TOLERANCE)
    answer = two_d(getattr(estimator, explainer.explained.method)(rows))
    np.testing.assert_allclose(expected + contributions.sum(axis=1), answer, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", [name for name in CASES if not covered(name)])
def test_every_other_family_is_refused_naming_it(name):
    estimator, x = fit(name)
    width = getattr(estimator, "n_features_in_", None)
    if width is None:
        pytest.skip("not tabular: explain_model refuses it before building an Explainer (see the text test)")
    with pytest.raises(service._NotExplained) as refusal:
        service.Explainer(estimator, width)
    assert str(refusal.value).startswith(f"{type(estimator).__name__}: " if final_step(estimator) is estimator else
                                         f"a Pipeline ending in {type(final_step(estimator)).__name__}: ")


def deep_forest():
    """Deep trees on few features: every path splits on the same feature many times (the merged case)."""
    X, y = make_classification(n_samples=600, n_features=4, n_informative=3, n_redundant=0, random_state=3)
    return RandomForestClassifier(n_estimators=8, random_state=0).fit(X, y), X


def missing_values_trees():
    """Trees and histogram boosting fitted with NaN, asked with NaN: where NaN goes is part of every path."""
    X, y = load_diabetes(return_X_y=True)
    X = X.copy()
    X[np.random.default_rng(0).random(X.shape) < 0.15] = np.nan
    models = [DecisionTreeRegressor(max_depth=8, random_state=0), RandomForestRegressor(n_estimators=5,
                                                                                           random_state=0),
              HistGradientBoostingRegressor(max_iter=15, random_state=0)]
    return [(model.fit(X, y), X) for model in models]


@pytest.mark.parametrize("case", ["deep forest", "multi-output forest", "binary boosting", "binary histogram",
                                  "missing values"])
def test_harder_trees_equal_shap(case):
    if case == "deep forest":
        cases = [deep_forest()]
    elif case == "multi-output forest":
        X, y = load_diabetes(return_X_y=True)
        cases = [(ExtraTreesRegressor(n_estimators=4, random_state=0).fit(X, np.c_[y, y ** 0.5, -y]), X)]
    elif case == "binary boosting":
        X, y = load_iris(return_X_y=True)
        cases = [(GradientBoostingClassifier(n_estimators=15, random_state=0).fit(X, y == 2), X)]
    elif case == "binary histogram":
        X, y = load_iris(return_X_y=True)
        cases = [(HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(X, y == 1), X)]
    else:
        cases = missing_values_trees()
    for model, X in cases:
        rows = X[:40]
        expected, contributions = service.Explainer(model, X.shape[1]).explain(rows)
        reference_expected, reference_values = shap_reference(model, X, rows)
        np.testing.assert_allclose(contributions, reference_values, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(expected, reference_expected, rtol=0, atol=TOLERANCE)


def test_rows_in_chunks_are_explained_as_one_at_a_time(monkeypatch):
    model, X = deep_forest()
    whole = service.Explainer(model, 4).explain(X[:30])[1]
    monkeypatch.setattr(service, "EXPLAIN_CHUNK_CELLS", 1)
    one_by_one = service.Explainer(model, 4).explain(X[:30])[1]
    np.testing.assert_array_equal(whole, one_by_one)


def test_an_ensemble_too_large_for_its_tables_is_refused_with_its_size(monkeypatch):
    model, _ = deep_forest()
    monkeypatch.setattr(service, "EXPLAIN_TABLE_CELLS", 1000)
    with pytest.raises(service._NotExplained, match=r"too large to explain"):
        service.Explainer(model, 4)


###############################################################################
# Pipelines and references
###############################################################################


def mixed_frame():
    import pandas as pd

    x, y = load_iris(return_X_y=True)
    frame = pd.DataFrame(x, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    frame.loc[::17, "sepal_width"] = np.nan
    frame["colour"] = np.array(["red", "green", "blue"], dtype=object)[np.arange(len(frame)) % 3]
    return frame, y


def test_a_one_hot_block_sums_to_its_feature_and_an_imputed_column_keeps_its_own():
    frame, y = mixed_frame()
    model = make_pipeline(ColumnTransformer([("colour", OneHotEncoder(), ["colour"])],
                                            remainder=SimpleImputer(add_indicator=True)),
                          LinearRegression()).fit(frame, y)
    rows = frame.iloc[:20]
    expected, contributions = explained(model, frame).explain(rows)
    final = model.steps[-1][1]
    transformed = model[:-1].transform(rows)
    by_column = transformed * final.coef_           # zero reference: each column's coef times its value
    names = list(model[:-1].get_feature_names_out())
    colour = [i for i, name in enumerate(names) if name.startswith("colour__")]
    width = [i for i, name in enumerate(names) if name.endswith("sepal_width")]   # its value and its indicator
    assert len(colour) == 3 and len(width) == 2
    np.testing.assert_allclose(contributions[:, 4, 0], by_column[:, colour].sum(axis=1), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(contributions[:, 1, 0], by_column[:, width].sum(axis=1), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(expected + contributions.sum(axis=1), model.predict(rows)[:, None], rtol=TOLERANCE)


def test_a_tree_behind_encoders_is_attributed_to_input_features():
    frame, y = mixed_frame()
    model = make_pipeline(ColumnTransformer([("colour", OneHotEncoder(), ["colour"])],
                                            remainder=SimpleImputer()),
                          RandomForestClassifier(n_estimators=5, random_state=0)).fit(frame, y)
    rows = frame.iloc[:20]
    expected, contributions = explained(model, frame).explain(rows)
    reference_expected, reference_values = shap_reference(model, frame, rows)
    np.testing.assert_allclose(contributions, reference_values, rtol=0, atol=TOLERANCE)
    assert explained(model, frame).feature_names == list(frame.columns)


def test_a_linear_model_is_measured_from_the_reference_row_and_answers_it_with_no_contributions():
    x, y = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    reference = np.array([[6.0, 3.0, 4.0, 1.2]])
    explainer = explained(model, x, reference=reference)
    expected, contributions = explainer.explain(reference)
    np.testing.assert_allclose(expected, model.decision_function(reference)[0], rtol=TOLERANCE)
    np.testing.assert_allclose(contributions, 0.0, atol=TOLERANCE)
    rows = x[:10]
    _, contributions = explainer.explain(rows)
    final = model.steps[-1][1]
    scaled = model[:-1].transform(rows) - model[:-1].transform(reference)
    np.testing.assert_allclose(contributions, scaled[:, :, None] * final.coef_.T[None], rtol=0, atol=TOLERANCE)


def test_without_a_reference_a_standardized_linear_model_is_measured_from_the_scalers_mean():
    x, y = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    expected, contributions = explained(model, x).explain(model[0].mean_[None])
    np.testing.assert_allclose(expected, model.steps[-1][1].intercept_, rtol=TOLERANCE)
    np.testing.assert_allclose(contributions, 0.0, atol=TOLERANCE)


def test_what_each_family_explains_is_named():
    x, y = load_iris(return_X_y=True)
    forest = service.Explainer(RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y), 4).explained
    assert forest == ("predict_proba", "probability", ["0", "1", "2"])
    boosting = service.Explainer(GradientBoostingClassifier(n_estimators=3).fit(x, y == 1), 4).explained
    assert boosting == ("decision_function", "raw margin", ["True"])
    regression = service.Explainer(DecisionTreeRegressor(max_depth=3).fit(x, y), 4).explained
    assert regression == ("predict", "prediction", ["predict"])


###############################################################################
# explain_model: a loaded model
###############################################################################


def loaded(tmp_path, estimator, name="m"):
    path = os.path.join(tmp_path, f"{name}.joblib")
    joblib.dump(estimator, path)
    stat = os.stat(path)
    ref = service.ArtifactRef(name, 1, path, f"{name}.joblib", ".joblib", stat.st_size, stat.st_mtime_ns)
    return service._build_model(ref)


def test_explain_model_answers_shaps_layout_for_a_loaded_forest(tmp_path):
    x, y = load_iris(return_X_y=True)
    estimator = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    model = loaded(tmp_path, estimator)
    answer = service.explain_model(model, service.model_inputs(model, x[:3].tolist(), 10))
    assert answer["method"] == "predict_proba" and answer["output"] == "probability"
    assert answer["feature_names"] == ["x0", "x1", "x2", "x3"] and answer["output_names"] == ["0", "1", "2"]
    values = np.array(answer["contributions"])
    assert values.shape == (3, 4, 3)
    reference = three_d(shap.TreeExplainer(estimator).shap_values(x[:3]))
    np.testing.assert_allclose(values, reference, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(np.array(answer["expected_value"]) + values.sum(axis=1), estimator.predict_proba(x[:3]),
                               rtol=TOLERANCE, atol=TOLERANCE)


def test_explain_model_refuses_what_it_cannot_explain_with_a_501_naming_the_family(tmp_path):
    from sklearn.svm import SVC

    x, y = load_iris(return_X_y=True)
    model = loaded(tmp_path, SVC().fit(x, y), name="svc")
    with pytest.raises(service.NotImplementedHere) as refusal:
        service.explain_model(model, service.model_inputs(model, x[:1].tolist(), 10))
    assert refusal.value.status == 501 and "SVC" in refusal.value.message and "'svc'" in refusal.value.message


def test_explain_model_refuses_a_text_model_as_not_tabular(tmp_path):
    estimator, texts = fit("TfidfVectorizer")
    model = loaded(tmp_path, estimator, name="sentiment")
    with pytest.raises(service.NotImplementedHere, match="does not take tabular rows"):
        service.explain_model(model, service.model_inputs(model, texts[:1], 10))


def test_explain_model_refuses_rows_as_a_prediction_would(tmp_path):
    x, y = load_iris(return_X_y=True)
    model = loaded(tmp_path, make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y))
    with pytest.raises(service.BadRequest):
        service.explain_model(model, service.model_inputs(model, [[1.0, None, 2.0, 3.0]], 10))


def test_a_reference_that_the_model_refuses_is_the_settings_fault(tmp_path):
    x, y = load_iris(return_X_y=True)
    model = loaded(tmp_path, LinearRegression().fit(x, y))
    with pytest.raises(service.ServiceError) as refusal:
        service.explain_model(model, service.model_inputs(model, x[:1].tolist(), 10), reference=[1.0, 2.0])
    assert refusal.value.status == 500 and "model-settings.json" in refusal.value.message
    answer = service.explain_model(model, service.model_inputs(model, x[:1].tolist(), 10), reference=[5, 3, 1, 0.2])
    np.testing.assert_allclose(answer["expected_value"], LinearRegression().fit(x, y).predict([[5, 3, 1, 0.2]]),
                               rtol=TOLERANCE)


def test_the_service_never_imports_shap():
    import ast

    with open(service.__file__, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert "shap" not in imported


def test_explaining_warns_of_nothing():
    """No division by zero or overflow hides in the tables: a warning here is an error."""
    model, _ = deep_forest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        service.Explainer(model, 4).explain(np.array([[0.0, np.inf, -1e300, 2.0], [1.0, 2.0, 3.0, 4.0]]))


###############################################################################
# The routes: every protocol's explanation goes through the one predict core
###############################################################################


@pytest.fixture
def explained_store(tmp_path):
    """forest (versions 1 and 2, label stable -> 1), svc (no explanation), linear (a reference row in its
    settings); the estimators beside it for the expected answers."""
    x, y = load_iris(return_X_y=True)
    forests = [RandomForestClassifier(n_estimators=n, max_depth=4, random_state=0).fit(x, y) for n in (5, 7)]
    for number, forest in enumerate(forests, start=1):
        write_artifact(tmp_path / "store" / "forest" / str(number) / "model.joblib", forest, "joblib")
    write_settings(tmp_path / "store" / "forest", {"version_policy": "all", "labels": {"stable": 1}})
    from sklearn.svm import SVC

    write_artifact(tmp_path / "store" / "svc.joblib", SVC().fit(x, y), "joblib")
    linear = LinearRegression().fit(x[:, :3], x[:, 3])
    write_artifact(tmp_path / "store" / "linear" / "1" / "model.joblib", linear, "joblib")
    write_settings(tmp_path / "store" / "linear", {"explain": {"reference": [5.8, 3.0, 4.4]}})
    return tmp_path / "store", forests, linear


def payload_lines(folder):
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "payload-*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            lines.extend(json.loads(line) for line in handle)
    return lines


def v2_explain_request(rows, **parameters):
    return {"parameters": {"explain": True, **parameters},
            "inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP64",
                        "data": [value for row in rows for value in row]}]}


def v2_explanations(answer):
    """The explanation a V2 answer carries: its "explain" output, one BYTES element of JSON text."""
    explain, = [output for output in answer["outputs"] if output["name"] == "explain"]
    assert explain["datatype"] == "BYTES" and explain["shape"] == [1]
    assert explain["parameters"] == {"content_type": "str"}
    return json.loads(explain["data"][0])


@pytest.mark.parametrize("version, path", [
    (2, "/models/forest/explain"), (1, "/models/forest/versions/1/explain"), (1, "/models/forest/labels/stable/explain"),
    (2, "/v1/models/forest:explain"), (1, "/v1/models/forest/versions/1:explain"),
    (1, "/v1/models/forest/labels/stable:explain")])
def test_each_explain_route_answers_the_versions_explanation_equal_to_shap(explained_store, make_client, version,
                                                                           path):
    store, forests, _ = explained_store
    x, _ = load_iris(return_X_y=True)
    rows = x[[0, 60, 120]].tolist()
    answer = strict_json(make_client(store).post_json(path, {"instances": rows}))
    assert answer["model"] == "forest" and answer["version"] == str(version) and set(answer) == {
        "model", "version", "explanations"}
    explanations = answer["explanations"]
    assert explanations["method"] == "predict_proba" and explanations["output_names"] == ["0", "1", "2"]
    reference = three_d(shap.TreeExplainer(forests[version - 1]).shap_values(np.array(rows)))
    np.testing.assert_allclose(explanations["contributions"], reference, rtol=0, atol=TOLERANCE)
    # over HTTP bit for bit what the loaded model explains in-process
    model = loaded(store, forests[version - 1], name="same")
    assert explanations == service.explain_model(model, service.model_inputs(model, rows, 10))


def test_v2_answers_predictions_and_the_explanation_as_mlservers_explain_output(explained_store, make_client):
    store, forests, _ = explained_store
    client = make_client(store)
    rows = ROWS[:2]
    answer = strict_json(client.post_json("/v2/models/forest/infer", v2_explain_request(rows)))
    assert [output["name"] for output in answer["outputs"]] == ["predict", "explain"]
    assert answer["outputs"][0]["data"] == forests[1].predict(rows).tolist()
    explanations = v2_explanations(answer)
    np.testing.assert_allclose(explanations["contributions"], three_d(shap.TreeExplainer(forests[1]).shap_values(
        np.array(rows))), rtol=0, atol=TOLERANCE)
    asked_by_name = strict_json(client.post_json("/v2/models/forest/versions/2/infer", {
        "inputs": v2_explain_request(rows)["inputs"], "outputs": [{"name": "explain"}]}))
    assert [output["name"] for output in asked_by_name["outputs"]] == ["explain"]
    assert v2_explanations(asked_by_name) == explanations
    binary = client.post_json("/v2/models/forest/infer", v2_explain_request(rows, binary_data_output=True))
    length = int(binary.headers["Inference-Header-Content-Length"])
    header = json.loads(binary.body[:length])
    assert header["outputs"][1]["parameters"]["content_type"] == "str"
    text = binary.body[length:][-header["outputs"][1]["parameters"]["binary_data_size"]:]
    assert json.loads(text[4:].decode()) == explanations


@pytest.mark.parametrize("path, body", [
    ("/models/svc/explain", {"instances": ROWS}), ("/v1/models/svc:explain", {"instances": ROWS}),
    ("/v2/models/svc/infer", v2_explain_request(ROWS))])
def test_a_model_that_cannot_explain_answers_501_naming_its_family_on_every_route(explained_store, make_client,
                                                                                  path, body):
    answer = make_client(explained_store[0]).post_json(path, body, expect_errors=True)
    assert_error(answer, 501, "model 'svc' cannot be explained exactly: SVC: not a family explained exactly here")


@pytest.mark.parametrize("path, body, fragment", [
    ("/models/forest/explain", {"instances": ROWS * 2}, "6 instances is over the limit of 5"),
    ("/v1/models/forest:explain", {"inputs": ROWS * 2}, "6 instances is over the limit of 5"),
    ("/v2/models/forest/infer", v2_explain_request(ROWS * 2), "6 rows is over the limit of 5"),
    ("/models/forest/explain", {"instances": ROWS, "method": "predict"}, "an explanation names no method"),
    ("/models/forest/explain", {"instances": [[1, 2]]}, "expected 4 features, got 2"),
    ("/v2/models/forest/infer", v2_explain_request(ROWS, explain="yes"), '"parameters": {"explain"} must be a '
                                                                          'boolean')])
def test_explanations_are_refused_as_predictions_are_within_the_same_limits(explained_store, make_client, path, body,
                                                                            fragment):
    answer = make_client(explained_store[0], max_rows=5).post_json(path, body, expect_errors=True)
    assert_error(answer, 400, fragment)


def test_a_linear_model_is_explained_from_its_settings_reference_row(explained_store, make_client):
    store, _, linear = explained_store
    rows = [[5.8, 3.0, 4.4], [6.0, 2.0, 1.0]]
    explanations = strict_json(make_client(store).post_json("/models/linear/explain", {"instances": rows}))[
        "explanations"]
    assert explanations["contributions"][0] == [[0.0], [0.0], [0.0]]         # the reference itself: nothing moves
    assert explanations["expected_value"] == pytest.approx(linear.predict([[5.8, 3.0, 4.4]]), rel=TOLERANCE)
    expected = (np.array(rows) - [5.8, 3.0, 4.4]) * linear.coef_
    np.testing.assert_allclose(np.array(explanations["contributions"])[:, :, 0], expected, rtol=TOLERANCE)


def test_an_explanation_is_counted_and_logged_with_the_predictions_alone(explained_store, make_app, tmp_path):
    store, _, _ = explained_store
    app = make_app(store=store, payload_log=str(tmp_path / "log"))
    client = webtest.TestApp(app)
    client.post_json("/models/forest/explain", {"instances": ROWS}, headers={"X-Request-ID": "explained"})
    client.post_json("/v2/models/forest/infer", v2_explain_request(ROWS), headers={"X-Request-ID": "both"})
    assert app.payload_log.drain(10)
    wait_until(lambda: len(payload_lines(tmp_path / "log")) == 2, what="both records")
    lines = {line["request_id"]: line for line in payload_lines(tmp_path / "log")}
    assert lines["explained"]["method"] == "explain" and lines["explained"]["outputs"] == {}
    assert lines["explained"]["inputs"] == ROWS
    assert lines["both"]["method"] == "explain,predict" and list(lines["both"]["outputs"]) == ["predict"]
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "model_service_requests_total", model="forest", version="2", method="explain",
                        protocol="native", status="200") == 1
    report, _ = service.replay(app.registry, "forest", [str(tmp_path / "log")])
    assert report.skipped == {"explained, not predicted": 1} and not report.bad


###############################################################################
# model-settings.json: "explain"
###############################################################################


@pytest.mark.parametrize("reference", [[5.8, 3.0, 4.4, 1.3], {"sepal_length": 5.8, "colour": "red"}])
def test_settings_name_the_reference_row(reference):
    settings = service.ModelSettings.parse({"explain": {"reference": reference}})
    assert settings.explain_reference == reference
    assert settings.describe()["explain"] == {"reference": reference}
    assert service.ModelSettings.parse({}).describe()["explain"] is None


@pytest.mark.parametrize("explain", [[1, 2], {"reference": []}, {"reference": 5}, {"row": [1, 2]},
                                     {"reference": [1], "other": 2}])
def test_settings_refuse_an_explain_that_is_no_reference_row(explain):
    with pytest.raises(ValueError, match=r'"explain" must be \{"reference": row\}'):
        service.ModelSettings.parse({"explain": explain})


def test_no_top_level_name_of_service_py_is_defined_twice():
    """Appendices share one namespace: a second definition would silently replace the first everywhere (the
    explanations' builders were once named like the native predictors' compilers)."""
    import ast
    import collections

    with open(service.__file__, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    defined = collections.Counter(node.name for node in tree.body if isinstance(node, (ast.FunctionDef,
                                                                                        ast.ClassDef)))
    assert [name for name, count in defined.items() if count > 1] == []
