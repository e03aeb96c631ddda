"""The native predictors against scikit-learn, bit for bit: a differential suite, and the service around it.

Every covered family and method is fed random rows, threshold-edge rows (each tree threshold, its
neighbours in the dtype the model compares in: float32 for trees, float64 for histogram boosting) and,
where the model takes them, rows with NaN and infinities, in one-row calls and in batches of
many sizes; the native answer must equal scikit-learn's on the same array in values, dtype and shape.
CI runs a bounded sample.  The long run is this file as a program:

    python tests/test_native.py --rows 100000      # rows per family and method; prints the figures
    python tests/test_native.py --timing 5         # predict's cost, native and scikit-learn, 1 and 64 rows

Then: families that must stay with scikit-learn, a proof that fails on purpose, the switches, the
status, the metrics, and HTTP answers through the real app.
"""

import argparse
import json
import os
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine, make_classification
from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor, GradientBoostingClassifier,
                              GradientBoostingRegressor, HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor)
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import (ElasticNet, Lasso, LinearRegression, LogisticRegression, Perceptron, Ridge,
                                  RidgeClassifier, SGDClassifier, SGDRegressor)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, Normalizer, OneHotEncoder, OrdinalEncoder, StandardScaler
from sklearn.svm import SVC, LinearSVC, LinearSVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import service  # noqa: E402
from support import metric_value  # noqa: E402
from families import fit  # noqa: E402


def _standard(X):
    return (X - X.mean(axis=0)) / X.std(axis=0)


def _with_holes(X, seed=0):
    """X with a tenth of its values missing: trees then learn where NaN goes (missing_go_to_left)."""
    X = X.copy()
    X[np.random.default_rng(seed).random(X.shape) < 0.1] = np.nan
    return X


def _data():
    iris, wine = load_iris(return_X_y=True), load_wine(return_X_y=True)
    cancer, diabetes = load_breast_cancer(return_X_y=True), load_diabetes(return_X_y=True)
    wide = make_classification(n_samples=2000, n_features=20, random_state=0)
    return {"iris": iris, "wine": wine, "cancer": (_standard(cancer[0]), cancer[1]),
            "diabetes": diabetes, "wide": wide, "iris_std": (_standard(iris[0]), iris[1]),
            "iris_holes": (_with_holes(iris[0]), iris[1]), "diabetes_holes": (_with_holes(diabetes[0]), diabetes[1]),
            "diabetes_2": (diabetes[0], np.c_[diabetes[1], diabetes[1] ** 0.5]),
            "cancer_holes": (_with_holes(_standard(cancer[0])), cancer[1]),
            "wine_holes": (_with_holes(wine[0]), wine[1]),
            "iris_2": (iris[0], np.c_[iris[1], iris[0][:, 1] > 3]),
            "wine_holes_2": (_with_holes(wine[0]), np.c_[wine[1] + 10, wine[0][:, 0] > 13]),
            "wide_codes": (np.c_[np.floor((wide[0][:, :1] + 3) * 10), wide[0][:, 1:3], wide[0][:, 3:4] > 0,
                                 wide[0][:, 4:]], wide[1]),
            "iris_codes": (np.c_[_with_holes(iris[0]), _codes(iris[0])], iris[1]),
            "iris_codes_holes": (_with_holes(np.c_[iris[0], _codes(iris[0])], seed=1), iris[1])}


def _codes(X):
    """Two category columns of numbers: whole centimetres of the first feature (4 to 7), and a code."""
    return np.c_[np.floor(X[:, 0]), (np.arange(len(X)) % 3) * 1.5]


def _columns(numbers, codes, remainder="drop"):
    """A ColumnTransformer of iris's four measures (imputed, scaled) and its two code columns."""
    return ColumnTransformer([("numbers", make_pipeline(SimpleImputer(), StandardScaler()), [0, 1, 2, 3]),
                              ("codes", codes, [4, 5])][not numbers:], remainder=remainder)


# family id -> (estimator, data set): every class the native compiler covers, binary and multiclass,
# single and multi-output, trees with and without missing values
FAMILIES = {
    "logistic_multinomial": (lambda: LogisticRegression(max_iter=1000), "iris"),
    "logistic_binary": (lambda: LogisticRegression(max_iter=1000), "cancer"),
    "ridge_classifier": (lambda: RidgeClassifier(), "wine"),
    "sgd_classifier": (lambda: SGDClassifier(random_state=0), "iris_std"),
    "sgd_classifier_log_loss": (lambda: SGDClassifier(loss="log_loss", random_state=0), "iris_std"),
    "sgd_classifier_log_loss_binary": (lambda: SGDClassifier(loss="log_loss", random_state=0), "cancer"),
    "sgd_classifier_modified_huber": (lambda: SGDClassifier(loss="modified_huber", random_state=0), "iris_std"),
    "sgd_classifier_modified_huber_binary": (lambda: SGDClassifier(loss="modified_huber", random_state=0),
                                             "cancer"),
    "perceptron": (lambda: Perceptron(random_state=0), "cancer"),
    "linear_svc": (lambda: LinearSVC(random_state=0), "iris_std"),
    "linear_regression_2_outputs": (lambda: LinearRegression(), "diabetes_2"),
    "ridge": (lambda: Ridge(alpha=0.5), "diabetes"),
    "lasso": (lambda: Lasso(alpha=0.1), "diabetes"),
    "elastic_net": (lambda: ElasticNet(alpha=0.01), "diabetes"),
    "sgd_regressor": (lambda: SGDRegressor(random_state=0), "diabetes"),
    "linear_svr": (lambda: LinearSVR(random_state=0, max_iter=10000), "diabetes"),
    "decision_tree_classifier": (lambda: DecisionTreeClassifier(random_state=0), "wine"),
    "decision_tree_regressor": (lambda: DecisionTreeRegressor(random_state=0), "diabetes"),
    "extra_tree_classifier_nan": (lambda: ExtraTreeClassifier(random_state=0), "iris_holes"),
    "random_forest_classifier": (lambda: RandomForestClassifier(n_estimators=30, max_depth=10, random_state=0),
                                 "wide"),
    "random_forest_classifier_nan": (lambda: RandomForestClassifier(n_estimators=20, random_state=0),
                                     "iris_holes"),
    "random_forest_regressor": (lambda: RandomForestRegressor(n_estimators=20, random_state=0), "diabetes"),
    "extra_trees_classifier": (lambda: ExtraTreesClassifier(n_estimators=20, random_state=0), "wine"),
    "decision_tree_classifier_2_outputs": (lambda: DecisionTreeClassifier(random_state=0), "iris_2"),
    "random_forest_classifier_2_outputs_nan": (lambda: RandomForestClassifier(n_estimators=10, random_state=0),
                                               "wine_holes_2"),
    "extra_trees_classifier_2_outputs": (lambda: ExtraTreesClassifier(n_estimators=10, random_state=0), "iris_2"),
    "extra_trees_regressor_2_outputs": (lambda: ExtraTreesRegressor(n_estimators=10, random_state=0),
                                        "diabetes_2"),
    "gradient_boosting_multiclass": (lambda: GradientBoostingClassifier(n_estimators=30, random_state=0), "wine"),
    "gradient_boosting_binary": (lambda: GradientBoostingClassifier(n_estimators=30, random_state=0), "cancer"),
    "gradient_boosting_exponential_zero_init": (lambda: GradientBoostingClassifier(
        n_estimators=30, loss="exponential", init="zero", random_state=0), "cancer"),
    "gradient_boosting_regressor": (lambda: GradientBoostingRegressor(n_estimators=50, random_state=0), "diabetes"),
    "hist_gradient_boosting_binary_nan": (lambda: HistGradientBoostingClassifier(max_iter=50, random_state=0),
                                          "cancer_holes"),
    "hist_gradient_boosting_multiclass_nan": (lambda: HistGradientBoostingClassifier(max_iter=30, random_state=0),
                                              "wine_holes"),
    "hist_gradient_boosting_regressor_nan": (lambda: HistGradientBoostingRegressor(max_iter=50, random_state=0),
                                             "diabetes_holes"),
    "hist_gradient_boosting_categorical_nan": (lambda: HistGradientBoostingClassifier(
        max_iter=30, categorical_features=[4, 5], random_state=0), "iris_codes_holes"),
    "hist_gradient_boosting_categorical_binary_60": (lambda: HistGradientBoostingClassifier(
        max_iter=30, categorical_features=[0, 3], random_state=0), "wide_codes"),
    "hist_gradient_boosting_categorical_regressor_nan": (lambda: HistGradientBoostingRegressor(
        max_iter=30, categorical_features=[1], random_state=0), "diabetes_holes"),
    "hist_gradient_boosting_poisson": (lambda: HistGradientBoostingRegressor(loss="poisson", max_iter=30,
                                                                             random_state=0), "diabetes"),
    "pipeline_scaler_logistic": (lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                                 "iris"),
    "pipeline_imputer_minmax_forest": (lambda: make_pipeline(SimpleImputer(), MinMaxScaler(clip=True),
                                                             RandomForestClassifier(n_estimators=10, random_state=0)),
                                       "iris_holes"),
    "pipeline_imputer_scaler_ridge": (lambda: make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                                            Ridge()), "diabetes_holes"),
    "pipeline_one_hot_ignore_logistic": (lambda: make_pipeline(_columns(True, OneHotEncoder(
        handle_unknown="ignore", sparse_output=False)), LogisticRegression(max_iter=1000)), "iris_codes"),
    "pipeline_one_hot_error_sparse_forest": (lambda: make_pipeline(_columns(False, OneHotEncoder(), SimpleImputer()),
                                                                   RandomForestClassifier(n_estimators=10,
                                                                                          random_state=0)),
                                             "iris_codes"),
    "pipeline_ordinal_nan_category_forest": (lambda: make_pipeline(_columns(False, OrdinalEncoder(
        handle_unknown="use_encoded_value", unknown_value=-1), "passthrough"), ExtraTreesRegressor(
        n_estimators=10, random_state=0)), "iris_codes_holes"),
    "pipeline_ordinal_error_gradient_boosting": (lambda: make_pipeline(_columns(True, OrdinalEncoder()),
                                                                       GradientBoostingClassifier(
                                                                           n_estimators=10, random_state=0)),
                                                 "iris_codes"),
}


class _Ref:
    name, version = "differential", 1


def loaded(estimator):
    """A LoadedModel with its native predictor, as the service builds it at load."""
    model = service.LoadedModel(_Ref, estimator, "", 0, 0.0)
    service.attach_native(model, True)
    return model


_MODELS = {}


def family(name):
    """(LoadedModel, training X) of a family, trained once per process."""
    if name not in _MODELS:
        factory, data = FAMILIES[name]
        X, y = _data()[data]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            _MODELS[name] = loaded(factory().fit(X, y)), X
    return _MODELS[name]


def _splits(estimator):
    """([(features, thresholds)] of every tree's finite splits, the dtype the model compares in)."""
    if hasattr(estimator, "_predictors"):         # histogram boosting: float64 rows against float64 thresholds
        nodes = [predictor.nodes for iteration in estimator._predictors for predictor in iteration]
        inner = [(n["is_leaf"] == 0) & (n["is_categorical"] == 0) & np.isfinite(n["num_threshold"]) for n in nodes]
        columns = np.arange(estimator.n_features_in_) if estimator._preprocessor is None else np.concatenate(
            [np.flatnonzero(estimator.is_categorical_), np.flatnonzero(~estimator.is_categorical_)])
        return [(columns[n["feature_idx"][i]], n["num_threshold"][i]) for n, i in zip(nodes, inner)], np.float64
    trees = [part.tree_ for part in getattr(estimator, "estimators_", [estimator]) if hasattr(part, "tree_")]
    finite = [(tree.children_left != -1) & np.isfinite(tree.threshold) for tree in trees]   # NaN alone: +inf
    return [(tree.feature[f], tree.threshold[f]) for tree, f in zip(trees, finite)], np.float32


def differential_rows(model, X, count, rng):
    """`count` rows: a third random within (and a little past) the fitted range, a third at tree thresholds
    and their neighbours (training rows, jittered, for linear models), a third with NaN and infinities where
    the model takes them (else random); a column an encoder encodes holds its categories (and unknown values
    where it takes them)."""
    low, high = np.nanmin(X, axis=0), np.nanmax(X, axis=0)
    span = high - low
    third = count // 3
    rows = [rng.uniform(low - span / 2, high + span / 2, size=(count - 2 * third, X.shape[1]))]
    splits, dtype = _splits(model.estimator)
    if splits:
        edges = rng.uniform(low, high, size=(third, X.shape[1]))
        for features, thresholds in splits:
            for node_feature, threshold in zip(features, thresholds):
                near = dtype(threshold)
                choices = (threshold, near, np.nextafter(near, dtype(-np.inf)), np.nextafter(near, dtype(np.inf)))
                rows_hit = rng.integers(third, size=2)
                edges[rows_hit, node_feature] = [float(rng.choice(choices)) for _ in rows_hit]
    else:
        base = np.nan_to_num(X[rng.integers(len(X), size=third)])
        edges = base + rng.standard_normal(base.shape) * span * 1e-3
    rows.append(edges)
    holes = rng.uniform(low, high, size=(third, X.shape[1]))
    if model.native._allow_nan:
        holes[rng.random(holes.shape) < 0.25] = np.nan
    if model.native._allow_inf:
        holes[rng.random(holes.shape) < 0.05] = np.inf
        holes[rng.random(holes.shape) < 0.05] = -np.inf
    rows.append(holes)
    rows = np.concatenate(rows)
    for column, values in model.native.categories.items():     # an encoder's categories, and unknown ones
        rows[:, column] = rng.choice(values, len(rows))         # where it takes them
    return np.ascontiguousarray(rng.permutation(rows))


def differences(model, method, rows, rng, single):
    """(rows compared, calls, differing calls): `single` one-row calls, then the rest in batches of 2 to 512."""
    native, reference = model.native.methods[method], getattr(model.estimator, method)
    calls = differing = 0
    start = 0
    with np.errstate(all="ignore"):
        while start < len(rows):
            size = 1 if calls < single else int(rng.integers(2, 513))
            X = rows[start:start + size]
            start += size
            prepared = model.native.prepare(X)
            assert prepared is not None, "the native check refused rows the model takes"
            calls += 1
            differing += not service._same_outputs(reference(X), native(prepared))
    return len(rows), calls, differing


def _cases():
    return [(name, method) for name in FAMILIES for method in _methods(name)]


def _methods(name):
    factory, _ = FAMILIES[name]
    estimator = factory()
    estimator = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    if isinstance(estimator, SGDClassifier) and estimator.loss not in ("log_loss", "modified_huber"):
        return ("predict", "decision_function")     # hinge loss and the like: no probabilities
    if isinstance(estimator, HistGradientBoostingClassifier):     # it has no predict_log_proba
        return ("predict", "predict_proba", "decision_function")
    if isinstance(estimator, (LogisticRegression, GradientBoostingClassifier, SGDClassifier)):
        return ("predict", "predict_proba", "predict_log_proba", "decision_function")
    if hasattr(estimator, "decision_function"):
        return ("predict", "decision_function")
    if hasattr(estimator, "predict_proba"):
        return ("predict", "predict_proba", "predict_log_proba")
    return ("predict",)


@pytest.mark.parametrize("name, method", _cases(), ids=[f"{n}-{m}" for n, m in _cases()])
def test_native_equals_scikit_learn(name, method):
    model, X = family(name)
    assert model.predictors[method][0] == service.NATIVE, model.predictors[method]
    rng = np.random.default_rng(len(name) * 31 + len(method))
    rows, calls, differing = differences(model, method, differential_rows(model, X, 600, rng), rng, single=12)
    assert differing == 0 and rows == 600 and calls > 12


def test_nan_rows_are_served_natively_where_the_trees_take_them():
    model, X = family("random_forest_classifier_nan")
    holes = np.ascontiguousarray(X[:40])
    assert np.isnan(holes).any() and model.native.prepare(holes) is not None
    assert service._same_outputs(model.estimator.predict_proba(holes), model.call("predict_proba", holes))
    linear, _ = family("logistic_multinomial")
    assert not linear.native._allow_nan and linear.native.prepare(holes) is None


def test_histogram_boosting_takes_nan_and_infinities_natively_as_scikit_learn_does():
    model, X = family("hist_gradient_boosting_multiclass_nan")
    rows = X[:40].copy()
    rows[0, 0], rows[1, 1], rows[2, :] = np.inf, -np.inf, 1e300      # float64 only: no float32 conversion
    assert np.isnan(rows).any() and model.native.prepare(rows) is rows
    for method in ("predict", "predict_proba", "decision_function"):
        assert service._same_outputs(getattr(model.estimator, method)(rows), model.call(method, rows))
    forest, _ = family("random_forest_classifier_nan")
    assert forest.native.prepare(rows) is None


def test_histogram_boosting_splits_on_categories_natively_unknown_ones_going_where_missing_values_go():
    model, X = family("hist_gradient_boosting_categorical_binary_60")
    encoder = model.estimator._preprocessor.named_transformers_["encoder"]
    assert len(encoder.categories_[0]) > 32             # codes past the bitsets' first word
    nodes = [p.nodes for iteration in model.estimator._predictors for p in iteration]
    assert sum(int(n["is_categorical"].sum()) for n in nodes) > 10
    rows = X[:40].copy()
    rows[:5, 0] = [-1.0, 99.0, np.nan, 0.5, 1e300]      # unknown, missing, between categories
    rows[5:8, 3] = [2.0, np.nan, -0.0]
    assert model.native.prepare(rows) is not None
    for method in model.native.methods:
        assert service._same_outputs(getattr(model.estimator, method)(rows), model.call(method, rows))
    rows[0, 0] = np.inf                                 # the encoder refuses it, not the trees
    assert model.native.prepare(rows) is None
    assert_same_refusal(model, service.LoadedModel(_Ref, model.estimator, "", 0, 0.0), rows)


def test_a_pipeline_takes_nan_natively_only_where_its_steps_impute_it():
    imputing, X = family("pipeline_imputer_minmax_forest")
    holes = np.ascontiguousarray(X[:40])
    assert imputing.native.prepare(holes) is not None
    assert service._same_outputs(imputing.estimator.predict_proba(holes), imputing.call("predict_proba", holes))
    scaling, _ = family("pipeline_scaler_logistic")
    plain = service.LoadedModel(_Ref, scaling.estimator, "", 0, 0.0)
    assert scaling.native.prepare(holes) is None
    assert_same_refusal(scaling, plain, holes)


def test_an_unknown_category_an_encoder_must_refuse_gets_scikit_learns_refusal():
    model, X = family("pipeline_one_hot_error_sparse_forest")
    plain = service.LoadedModel(_Ref, model.estimator, "", 0, 0.0)
    for column, value in ((4, 8.0), (5, np.nextafter(1.5, 2)), (4, np.nan), (5, np.inf)):
        rows = X[:3].copy()
        rows[1, column] = value
        assert model.native.prepare(rows) is None
        with pytest.raises(service.BadRequest, match="Found unknown categories|Input contains"):
            model.call("predict", rows)
        assert_same_refusal(model, plain, rows)


def test_nan_in_a_sparse_matrix_is_left_to_scikit_learn_whose_trees_refuse_it():
    """Unknown categories encoded as NaN reach the forest in a sparse matrix: the proof sees scikit-learn refuse
    them; and NaN that a compiled step makes on the way to a tree in a sparse matrix goes to scikit-learn."""
    X, y = _data()["iris_codes"]
    X = np.nan_to_num(X, nan=1.0)
    columns = ColumnTransformer([("one_hot", OneHotEncoder(handle_unknown="ignore"), [5]), ("ordinal", OrdinalEncoder(
        handle_unknown="use_encoded_value", unknown_value=np.nan), [4])], remainder="passthrough", sparse_threshold=1)
    model = loaded(make_pipeline(columns, RandomForestClassifier(n_estimators=5, random_state=0)).fit(X, y))
    assert model.native is None and "scikit-learn refused a probe: Input X contains NaN" in \
        model.predictors["predict"][1]
    holes = np.array([[1.0, np.nan], [2.0, 3.0]])
    assert service._tree_ready(lambda rows: rows, True)(holes) is None
    ready = service._tree_ready(lambda rows: rows, False)(np.asfortranarray(holes))
    assert ready.flags.c_contiguous and np.array_equal(ready, holes, equal_nan=True)


def test_unknown_and_missing_categories_an_encoder_takes_are_answered_natively():
    for name, values in (("pipeline_one_hot_ignore_logistic", (8.0, -0.0, np.nan)),
                         ("pipeline_ordinal_nan_category_forest", (8.0, np.nan, 1e300))):
        model, X = family(name)
        rows = np.ascontiguousarray(np.nan_to_num(X[:40], nan=1.0))
        rows[:len(values), 4] = rows[len(values):2 * len(values), 5] = values
        assert model.native.prepare(rows) is not None, name
        for method in model.native.methods:
            assert service._same_outputs(getattr(model.estimator, method)(rows), model.call(method, rows)), name


def test_encoders_of_text_or_named_columns_stay_with_scikit_learn():
    """Text categories arrive as object arrays (or DataFrames), which scikit-learn encodes itself."""
    words = np.array([["red"], ["green"], ["blue"]], dtype=object)[np.arange(150) % 3]
    X, y = _data()["iris"]
    text = loaded(make_pipeline(ColumnTransformer([("colour", OneHotEncoder(), [4])], remainder="passthrough"),
                                LogisticRegression(max_iter=1000)).fit(np.c_[X.astype(object), words], y))
    assert text.native is None and "OneHotEncoder of categories that are not float64 numbers" in \
        text.predictors["predict"][1]
    for name in ("ColumnTransformer", "HistGradientBoostingClassifier (categorical)"):
        named = loaded(fit(name)[0])
        assert named.native is None and "fitted on named columns" in named.predictors["predict"][1]
    boosting = loaded(HistGradientBoostingClassifier(max_iter=5, categorical_features=[4], random_state=0).fit(
        np.c_[X.astype(object), words], y))
    assert boosting.native is None and "OrdinalEncoder of categories that are not float64" in \
        boosting.predictors["predict"][1]


def test_a_pipeline_whose_final_step_is_unknown_says_so():
    model = loaded(make_pipeline(StandardScaler(), KNeighborsClassifier()).fit(*_data()["iris"]))
    assert model.predictors["predict"] == (service.SKLEARN,
                                           "its final step: no native compiler for KNeighborsClassifier "
                                           "(exact classes only)")


def test_native_batches_equal_one_row_scikit_learn_calls_for_forests():
    model, X = family("random_forest_classifier")
    rows = np.ascontiguousarray(X[:50])
    one_by_one = np.concatenate([model.estimator.predict_proba(rows[i:i + 1]) for i in range(len(rows))])
    assert service._same_outputs(one_by_one, model.call("predict_proba", rows))


def test_a_batch_of_multi_output_probabilities_gives_each_request_its_rows_of_every_output():
    model, X = family("random_forest_classifier_2_outputs_nan")
    batcher = service.Batcher(model, 8, 0.01, service.Metrics({}))
    pending = [service._Pending(np.ascontiguousarray(X[i:i + 1 + i])) for i in range(3)]
    batcher._execute("predict_proba", pending)
    for item in pending:
        assert service._same_outputs(model.estimator.predict_proba(item.inputs), item.result)


@pytest.mark.parametrize("estimator, data", [
    (KNeighborsClassifier(), "iris"), (SVC(), "iris"),
    (make_pipeline(Normalizer(), LogisticRegression(max_iter=1000)), "iris"),
    (make_pipeline(StandardScaler(), KNeighborsClassifier()), "iris"),
    (make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression(max_iter=1000)), "iris"),
    (RandomForestClassifier(n_estimators=3, n_jobs=2, random_state=0), "iris"),
    ],
    ids=["knn", "svc-rbf", "pipeline-normalizer", "pipeline-knn", "pipeline-sparse-one-hot-logistic",
         "forest-n_jobs"])
def test_other_families_stay_with_scikit_learn(estimator, data):
    model = loaded(estimator.fit(*_data()[data]))
    assert model.native is None
    assert {predictor for predictor, _ in model.predictors.values()} == {service.SKLEARN}
    assert all(why for _, why in model.predictors.values())


def test_a_subclass_is_not_compiled_even_when_it_only_renames():
    class Renamed(LogisticRegression):
        pass

    model = loaded(Renamed(max_iter=1000).fit(*_data()["iris"]))
    assert model.native is None and "exact classes only" in model.predictors["predict"][1]


def test_a_method_replaced_on_the_instance_is_not_compiled():
    estimator = LogisticRegression(max_iter=1000).fit(*_data()["iris"])
    estimator.predict = lambda rows: np.zeros(len(rows), dtype=np.int64)
    model = loaded(estimator)
    assert model.native is None and "replaced on the instance" in model.predictors["predict"][1]


def test_a_proof_that_fails_falls_back_with_the_reason(monkeypatch):
    """One bit off, only on one-row calls: the proof's single rows catch it; the method stays with
    scikit-learn and the model's other methods are unaffected."""
    compilers = service._native_compilers()
    original = compilers[LogisticRegression]

    def off_by_one_bit(estimator):
        methods, thresholds = original(estimator)
        proba = methods["predict_proba"]
        methods["predict_proba"] = lambda X: np.nextafter(proba(X), 2.0) if len(X) == 1 else proba(X)
        return methods, thresholds

    monkeypatch.setitem(compilers, LogisticRegression, off_by_one_bit)
    X, y = _data()["iris"]
    model = loaded(LogisticRegression(max_iter=1000).fit(X, y))
    predictor, why = model.predictors["predict_proba"]
    assert predictor == service.SKLEARN and "differs from scikit-learn on a probe of 1 row(s)" in why
    assert model.predictors["predict"][0] == service.NATIVE
    row = np.ascontiguousarray(X[:1])
    assert service._same_outputs(model.estimator.predict_proba(row), model.call("predict_proba", row))
    assert model.describe()["predictors"]["predict_proba"] == {"predictor": "scikit-learn", "reason": why}


def test_a_compiler_that_raises_falls_back(monkeypatch):
    def broken(estimator):
        raise KeyError("coef_")

    monkeypatch.setitem(service._native_compilers(), Ridge, broken)
    model = loaded(Ridge().fit(*_data()["diabetes"]))
    assert model.native is None and model.predictors["predict"][1] == "compiling failed: KeyError: 'coef_'"



def assert_same_refusal(native, plain, rows):
    """A model with its native predictor refuses `rows` exactly as the same model without one."""
    with pytest.raises(service.BadRequest) as with_native:
        native.call("predict", rows)
    with pytest.raises(service.BadRequest) as without:
        plain.call("predict", rows)
    assert str(with_native.value) == str(without.value)


@pytest.mark.parametrize("rows", [
    np.array([[1.0, np.nan, 3.0, 4.0]]), np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.0, np.inf]]),
    np.array([["a", 2.0, 3.0, 4.0]], dtype=object)], ids=["nan", "width", "inf", "object"])
def test_what_the_native_check_refuses_gets_scikit_learns_refusal(rows):
    native, plain = family("logistic_multinomial")[0], service.LoadedModel(_Ref, family(
        "logistic_multinomial")[0].estimator, "", 0, 0.0)
    assert_same_refusal(native, plain, rows)


def test_other_layouts_and_dtypes_go_to_scikit_learn():
    model, X = family("logistic_multinomial")
    for rows in (np.asfortranarray(X[:5]), X[:5].astype(np.float32), X[:5:2], X[:0]):
        assert model.native.prepare(rows) is None
    rows = np.ascontiguousarray(X[:5])
    assert model.native.prepare(rows) is rows


# -- the service around it ---------------------------------------------------------------------------------

@pytest.fixture
def native_store(tmp_path):
    """iris (LogisticRegression) and rf (a 30-tree forest) as joblib artifacts."""
    from support import write_artifact

    root = tmp_path / "store"
    write_artifact(root / "iris" / "1" / "model.joblib", family("logistic_multinomial")[0].estimator, "joblib")
    write_artifact(root / "rf" / "1" / "model.joblib", family("random_forest_classifier")[0].estimator, "joblib")
    return root


def _app(make_client, store, **options):
    return make_client(store, poll_interval=0.0, **options)


@pytest.mark.parametrize("name, data, method", [("iris", "iris", "predict_proba"), ("iris", "iris", "predict"),
                                                ("rf", "wide", "predict_proba"), ("rf", "wide", "predict")])
def test_http_answers_are_scikit_learns_bit_for_bit(make_client, native_store, name, data, method):
    client = _app(make_client, native_store)
    rows = _data()[data][0][:7]
    answer = client.post_json(f"/models/{name}/predict", {"instances": rows.tolist(), "method": method}).json
    estimator = family("logistic_multinomial" if name == "iris" else "random_forest_classifier")[0].estimator
    expected = getattr(estimator, method)(np.array(rows.tolist()))
    assert json.dumps(answer["predictions"]) == json.dumps(service.to_jsonable(expected))
    status = client.get(f"/models/{name}/versions/1").json
    assert status["predictors"][method]["predictor"] == "native"
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "model_service_predict_calls_total", model=name, version="1", method=method,
                        predictor="native") == 1


def test_http_an_encoded_pipeline_answers_natively_and_refuses_an_unknown_category_as_scikit_learn(
        make_client, tmp_path):
    from support import write_artifact

    model, X = family("pipeline_one_hot_error_sparse_forest")
    write_artifact(tmp_path / "codes" / "1" / "model.joblib", model.estimator, "joblib")
    client = _app(make_client, tmp_path)
    rows = np.nan_to_num(X[:3], nan=2.5)
    answer = client.post_json("/models/codes/predict", {"instances": rows.tolist(), "method": "predict_proba"}).json
    assert json.dumps(answer["predictions"]) == json.dumps(service.to_jsonable(model.estimator.predict_proba(rows)))
    rows[1, 4] = 9.0
    refused = client.post_json("/models/codes/predict", {"instances": rows.tolist()}, status=400).json
    with pytest.raises(ValueError) as expected:
        model.estimator.predict(rows)
    assert str(expected.value) in refused["error"]
    assert metric_value(client.get("/metrics").text, "model_service_predict_calls_total", model="codes",
                        version="1", method="predict_proba", predictor="native") == 1


def test_the_flag_turns_it_off(make_client, native_store):
    client = _app(make_client, native_store, native=False)
    client.post_json("/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
    status = client.get("/models/iris/versions/1").json
    assert status["predictors"]["predict"] == {"predictor": "scikit-learn",
                                               "reason": "native predictors are switched off"}
    assert metric_value(client.get("/metrics").text, "model_service_predict_calls_total", model="iris", version="1",
                        method="predict", predictor="scikit-learn") == 1


def test_a_models_settings_turn_it_off(make_client, native_store):
    (native_store / "iris" / "model-settings.json").write_text('{"native": false}')
    client = _app(make_client, native_store)
    client.post_json("/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert client.get("/models/iris/versions/1").json["predictors"]["predict"]["predictor"] == "scikit-learn"
    client.post_json("/models/rf/predict", {"instances": [[0.0] * 20]})
    assert client.get("/models/rf/versions/1").json["predictors"]["predict"]["predictor"] == "native"


def test_settings_refuse_a_native_that_is_not_a_boolean():
    with pytest.raises(ValueError, match='"native" must be true or false'):
        service.ModelSettings.parse({"native": "no"})
    assert service.ModelSettings.parse({"native": False}).describe()["native"] is False
    assert service.Config.load({"native": "no"}).native is False
    assert service.Config.load({}, {"MODEL_SERVICE_NATIVE": "off"}).native is False


def test_the_load_log_says_what_is_native_and_how_long_the_proof_took(caplog):
    with caplog.at_level("INFO", logger="service"):
        loaded(SVC().fit(*_data()["iris"]))
        loaded(LogisticRegression(max_iter=1000).fit(*_data()["iris"]))
    lines = [record.getMessage() for record in caplog.records]
    assert any("native predictor for no method" in line and "no native compiler for SVC" in line for line in lines)
    assert any("native predictor for predict, predict_proba, predict_log_proba, decision_function (compiled and "
               "proved in " in line for line in lines)


# -- the long run -------------------------------------------------------------------------------------------

def long_run(rows, single, only=""):
    """Every family (whose name holds `only`) and method on `rows` rows; one line each and the totals.

    True when none differ."""
    total_rows = total_calls = total_differing = 0
    cases = [(name, method) for name, method in _cases() if only in name]
    print(f"{'family':40} {'method':18} {'rows':>8} {'calls':>7} {'1-row':>6} {'differing':>9} {'s':>7}")
    for name, method in cases:
        model, X = family(name)
        if model.predictors[method][0] != service.NATIVE:
            print(f"{name:40} {method:18} not native: {model.predictors[method][1]}")
            total_differing += 1
            continue
        rng = np.random.default_rng(zlib.crc32(f"{name} {method}".encode()))
        started = time.perf_counter()
        counted, calls, differing = differences(model, method, differential_rows(model, X, rows, rng), rng, single)
        total_rows, total_calls, total_differing = total_rows + counted, total_calls + calls, \
            total_differing + differing
        print(f"{name:40} {method:18} {counted:8d} {calls:7d} {min(single, calls):6d} {differing:9d} "
              f"{time.perf_counter() - started:7.1f}", flush=True)
    print(f"total: {len(cases)} family/method pairs, {total_rows} rows in {total_calls} calls, "
          f"{total_differing} differing")
    return total_differing == 0


def timing(only, passes):
    """Microseconds per `LoadedModel.call` of predict on 1 and 64 rows, the model's native predictor switched off
    and on between passes (interleaved, so a neighbour's load hits both alike); medians of `passes`."""
    import statistics

    print(f"{'family':44} {'rows':>4} {'scikit-learn µs':>15} {'native µs':>9} {'ratio':>7}")
    for name in [name for name in FAMILIES if only in name]:
        model, X = family(name)
        proved, sample = model.native, differential_rows(model, X, 64, np.random.default_rng(0))
        for count in (1, 64):
            rows, figures = np.ascontiguousarray(sample[:count]), {False: [], True: []}
            calls = max(5, int(0.1 / _seconds(lambda: model.call("predict", rows), 3)))
            for _ in range(passes):
                for native in (False, True):
                    model.native = proved if native else None
                    figures[native].append(_seconds(lambda: model.call("predict", rows), calls) * 1e6)
            model.native = proved
            sklearn, native = statistics.median(figures[False]), statistics.median(figures[True])
            print(f"{name:44} {count:4d} {sklearn:15,.0f} {native:9,.0f} {f'1/{sklearn / native:.1f}':>7}", flush=True)


def _seconds(call, count):
    """Seconds per call of `call()`, over `count` calls."""
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="native vs scikit-learn on many rows, every family and method")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per family and method (default 100000)")
    parser.add_argument("--single", type=int, default=500, help="of which one-row calls (default 500)")
    parser.add_argument("--only", default="", metavar="TEXT", help="only the families whose name holds TEXT")
    parser.add_argument("--timing", type=int, default=0, metavar="PASSES",
                        help="instead, time predict natively and by scikit-learn on 1 and 64 rows (median of PASSES)")
    arguments = parser.parse_args()
    if arguments.timing:
        sys.exit(timing(arguments.only, arguments.timing))
    sys.exit(0 if long_run(arguments.rows, arguments.single, arguments.only) else 1)
