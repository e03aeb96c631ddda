"""No pre-check changes an answer or a refusal: a differential test of the service against scikit-learn.

The service checks float rows for NaN and infinity itself and then turns scikit-learn's own check off
(assume_finite) where that is proven equal.  Here every covered family (the JSON coverage table and the
meta-estimators whose tags do not describe their parts: stacking with passthrough, one-vs-rest, bagging,
voting, pipelines with imputers) is asked every method it has, on rows that are finite or hold a NaN, +inf
or -inf, through the service's own path (model_inputs, then LoadedModel.call) and by scikit-learn in
process with its default configuration.  Where scikit-learn answers, the service must answer the same
bits; where it raises ValueError, the service must refuse with a 400.
"""

import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (BaggingClassifier, BaggingRegressor, HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor, RandomForestClassifier, StackingClassifier,
                              StackingRegressor, VotingClassifier)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier, SGDRegressor
from sklearn.multiclass import OneVsOneClassifier, OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC, LinearSVR
from sklearn.tree import DecisionTreeClassifier

import service
from support import write_artifact
from families import CASES, diabetes_data, fit, iris_data


def nan_training_data(data):
    """A dataset with some missing values, so NaN-aware estimators learn where to send them."""
    def made():
        x, y = data()
        x = x.copy()
        x[::7, 1] = np.nan
        return x, y
    return made


# families whose tags do not describe their parts, or that hold NaN-tolerant parts
META_CASES = {
    "StackingClassifier (passthrough, NaN-tolerant members)": (
        lambda: StackingClassifier([("hgb", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
                                    ("tree", DecisionTreeClassifier(random_state=0))],
                                   final_estimator=LogisticRegression(max_iter=1000), passthrough=True),
        iris_data),              # trained on complete rows: the final step cannot fit missing values
    "StackingRegressor (passthrough, NaN-tolerant members)": (
        lambda: StackingRegressor([("hgb", HistGradientBoostingRegressor(max_iter=10, random_state=0))],
                                  final_estimator=Ridge(), passthrough=True),
        diabetes_data),
    "StackingClassifier (NaN-tolerant members)": (
        lambda: StackingClassifier([("hgb", HistGradientBoostingClassifier(max_iter=10, random_state=0))],
                                   final_estimator=LogisticRegression(max_iter=1000)),
        nan_training_data(iris_data)),
    "OneVsRestClassifier (HistGradientBoosting)": (
        lambda: OneVsRestClassifier(HistGradientBoostingClassifier(max_iter=10, random_state=0)),
        nan_training_data(iris_data)),
    "OneVsRestClassifier (LogisticRegression)": (
        lambda: OneVsRestClassifier(LogisticRegression(max_iter=1000)), iris_data),
    "OneVsOneClassifier (HistGradientBoosting)": (
        lambda: OneVsOneClassifier(HistGradientBoostingClassifier(max_iter=10, random_state=0)),
        nan_training_data(iris_data)),
    "BaggingClassifier (HistGradientBoosting)": (
        lambda: BaggingClassifier(HistGradientBoostingClassifier(max_iter=5, random_state=0), n_estimators=3,
                                  random_state=0),
        nan_training_data(iris_data)),
    "BaggingClassifier (default trees)": (lambda: BaggingClassifier(n_estimators=3, random_state=0), iris_data),
    "BaggingRegressor (HistGradientBoosting)": (
        lambda: BaggingRegressor(HistGradientBoostingRegressor(max_iter=5, random_state=0), n_estimators=3,
                                 random_state=0),
        nan_training_data(diabetes_data)),
    "VotingClassifier (NaN-tolerant and not)": (
        lambda: VotingClassifier([("hgb", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
                                  ("lr", make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)))],
                                 voting="soft"),
        nan_training_data(iris_data)),
    "VotingClassifier (HistGradientBoosting only)": (
        lambda: VotingClassifier([("hgb", HistGradientBoostingClassifier(max_iter=10, random_state=0))],
                                 voting="soft"),
        nan_training_data(iris_data)),
    "Pipeline (SimpleImputer, LogisticRegression)": (
        lambda: make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)), nan_training_data(iris_data)),
    "Pipeline (SimpleImputer, HistGradientBoosting)": (
        lambda: make_pipeline(SimpleImputer(), HistGradientBoostingClassifier(max_iter=10, random_state=0)),
        nan_training_data(iris_data)),
    "DecisionTreeClassifier (trained with NaN)": (lambda: DecisionTreeClassifier(random_state=0),
                                                  nan_training_data(iris_data)),
    "RandomForestClassifier (trained with NaN)": (lambda: RandomForestClassifier(n_estimators=5, random_state=0),
                                                  nan_training_data(iris_data)),
    "HistGradientBoostingClassifier (trained with NaN)": (
        lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0), nan_training_data(iris_data)),
    "KNeighborsClassifier (nan_euclidean)": (lambda: KNeighborsClassifier(metric="nan_euclidean",
                                                                          algorithm="brute"),
                                             nan_training_data(iris_data)),
    "SimpleImputer": (SimpleImputer, nan_training_data(diabetes_data)),
    "StandardScaler (trained with NaN)": (StandardScaler, nan_training_data(diabetes_data)),
    # leaves the coverage table shows only inside a pipeline
    "LogisticRegression (alone)": (lambda: LogisticRegression(max_iter=1000), iris_data),
    "SGDClassifier (alone)": (lambda: SGDClassifier(random_state=0), iris_data),
    "SGDRegressor (alone)": (lambda: SGDRegressor(random_state=0), diabetes_data),
    "LinearSVC (alone)": (lambda: LinearSVC(random_state=0), iris_data),
    "LinearSVR (alone)": (lambda: LinearSVR(random_state=0), diabetes_data),
}
FAMILIES = {**CASES, **META_CASES}

# 1e300 is finite in float64 and infinite in float32, the dtype trees check in
ROW_KINDS = {"finite": None, "nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "huge": 1e300, "-huge": -1e300}


def fitted(name):
    return fit(name, FAMILIES)


def json_rows(x, kind):
    """Five rows as a client's JSON would carry them (None for a missing value), one cell made `kind`."""
    if isinstance(x, pd.DataFrame):
        rows = x.head(5).astype(object).where(x.head(5).notna(), None).values.tolist()
        column = x.columns.get_loc("sepal_width") if "sepal_width" in x.columns else 0
    else:
        rows = [[None if math.isnan(v) else float(v) for v in row] for row in np.asarray(x[:5], dtype=float)]
        column = 1
    if not isinstance(rows[0], list):                       # a 1-D table: labels, not rows
        return None
    value = ROW_KINDS[kind]
    if kind != "finite":
        rows[2][column] = None if kind == "nan" else value
    return rows


def reference_input(estimator, model, inputs):
    """What a scikit-learn user calls the fitted estimator with: the same values, in a DataFrame
    when it was fitted on one."""
    names = getattr(estimator, "feature_names_in_", None)
    if names is None or hasattr(inputs, "iloc"):
        return inputs.copy()
    return pd.DataFrame(np.array(inputs, copy=True), columns=list(names))


def scikit_learn_answer(function, x):
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "answer", function(x)
    except ValueError as error:
        return "refused", str(error)


def service_answer(model, method, inputs):
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "answer", model.call(method, inputs)
    except service.BadRequest as error:
        return "refused", str(error)


def tabular(name):
    x = FAMILIES[name][1]()[0]
    return np.ndim(x) == 2


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """name -> (in-process estimator, the service's LoadedModel of it, the training X)."""
    root = tmp_path_factory.mktemp("prechecks")
    found = {}

    def get(name):
        if name not in found:
            estimator, x = fitted(name)
            path = write_artifact(root / f"m{len(found)}.joblib", estimator, "joblib")
            ref = service.ArtifactRef(f"m{len(found)}", 1, path, f"m{len(found)}.joblib", ".joblib",
                                      os.path.getsize(path), os.stat(path).st_mtime_ns)
            found[name] = estimator, service._build_model(ref), x
        return found[name]
    return get




@pytest.mark.parametrize("name", [name for name in FAMILIES if tabular(name)])
def test_the_service_answers_and_refuses_exactly_as_scikit_learn(name, loaded):
    estimator, model, x = loaded(name)
    differences, counted = [], 0
    for kind in ROW_KINDS:
        rows = json_rows(x, kind)
        inputs = service.model_inputs(model, rows, 100)
        for method in model.methods:
            expected = scikit_learn_answer(getattr(estimator, method), reference_input(estimator, model, inputs))
            actual = service_answer(model, method, inputs)
            counted += 1
            if expected[0] == "refused" or actual[0] == "refused":
                same = expected[0] == actual[0]
            else:
                same = service._same_outputs(expected[1], actual[1])
            if not same:
                differences.append(f"{name} / {kind} / {method}: scikit-learn {expected[0]} "
                                   f"({str(expected[1])[:120]!r}), the service {actual[0]} ({str(actual[1])[:120]!r})")
    assert counted == len(ROW_KINDS) * len(model.methods)
    assert not differences, "\n".join(differences)


def test_every_estimator_the_service_checks_itself_is_compared_here():
    """The shortcut is proven, not assumed: each class it applies to is a family of the differential test."""
    compared = {type(factory()) for name, (factory, _) in FAMILIES.items() if tabular(name)}
    assert service._finite_checked_classes() <= compared
    assert len(service._finite_checked_classes()) == len(service.FINITE_CHECKED)


def test_the_shortcut_applies_to_plain_leaves_only(loaded):
    assert loaded("LogisticRegression (alone)")[1].checked_call is not None
    assert loaded("KNeighborsClassifier (nan_euclidean)")[1].checked_call is not None
    for name in ("StackingClassifier (passthrough, NaN-tolerant members)", "OneVsRestClassifier (HistGradientBoosting)",
                 "BaggingClassifier (HistGradientBoosting)", "VotingClassifier (HistGradientBoosting only)",
                 "Pipeline (SimpleImputer, LogisticRegression)", "RandomForestClassifier (trained with NaN)",
                 "HistGradientBoostingClassifier", "DummyClassifier"):
        assert loaded(name)[1].checked_call is None, name


@pytest.mark.parametrize("name", ["StackingClassifier (passthrough, NaN-tolerant members)",
                                  "OneVsRestClassifier (HistGradientBoosting)", "LogisticRegression (alone)"])
def test_over_http_a_missing_value_gets_scikit_learns_answer_or_refusal(name, tmp_path, make_client):
    """The same comparison through the whole request path, with null for a missing value."""
    estimator, x = fitted(name)
    write_artifact(tmp_path / "m.joblib", estimator, "joblib")
    client = make_client(tmp_path)
    rows = json_rows(x, "nan")
    matrix = np.array([[np.nan if v is None else v for v in row] for row in rows])
    for method in ("predict", "predict_proba"):
        expected = scikit_learn_answer(getattr(estimator, method), matrix)
        answer = client.post_json("/models/m/predict", {"instances": rows, "method": method}, expect_errors=True)
        if expected[0] == "refused":
            assert answer.status_int == 400, answer.text
        else:
            assert answer.status_int == 200, answer.text
            assert answer.json["predictions"] == expected[1].tolist()
