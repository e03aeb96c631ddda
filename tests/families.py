"""The model families the service covers, each fitted on a bundled dataset: the table that
docs/json-model-format.md shows, shared by the JSON round-trip, pre-check and fuzz tests.

CASES maps a family's name to (the estimator, the data it is fitted and asked on).
"""

import functools
import warnings

import numpy as np
import pandas as pd
import scipy.sparse
from sklearn.cluster import KMeans
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor, GradientBoostingClassifier,
                              GradientBoostingRegressor, HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor, RandomForestClassifier, RandomForestRegressor,
                              StackingClassifier, StackingRegressor, VotingClassifier, VotingRegressor)
from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer, TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import (ElasticNet, GammaRegressor, Lasso, LinearRegression, LogisticRegression,
                                  PoissonRegressor, Ridge, RidgeClassifier, SGDClassifier, SGDRegressor,
                                  TweedieRegressor)
from sklearn.naive_bayes import BernoulliNB, ComplementNB, GaussianNB, MultinomialNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import (Binarizer, FunctionTransformer, KBinsDiscretizer, LabelBinarizer, LabelEncoder,
                                   MaxAbsScaler, MinMaxScaler, Normalizer, OneHotEncoder, OrdinalEncoder,
                                   PolynomialFeatures, RobustScaler, StandardScaler)
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier, ExtraTreeRegressor

METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "transform", "score_samples",
           "apply", "kneighbors")

SENTENCES = [
    "a wonderful, moving film with brilliant acting", "I loved every minute, great story and great cast",
    "superb direction and a beautiful soundtrack", "funny, warm and clever: the best film this year",
    "a dull, boring film with terrible acting", "I hated it, the story made no sense at all",
    "awful direction and a painfully slow plot", "the worst film this year, a complete waste of time",
]


def iris_data():
    data = load_iris()
    return data.data, data.target


def diabetes_data():
    data = load_diabetes()
    return data.data, data.target


def positive_target_data():
    x, y = diabetes_data()
    return x, y / 100.0


def text_data():
    return SENTENCES * 3, ["positive"] * 4 + ["negative"] * 4 + ["positive"] * 4 + ["negative"] * 4 + \
        ["positive"] * 4 + ["negative"] * 4


def mixed_data():
    """A DataFrame with numbers, a missing value and a string column, as tabular data often is."""
    x, y = iris_data()
    frame = pd.DataFrame(x, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    frame.loc[::17, "sepal_width"] = np.nan
    frame["colour"] = np.array(["red", "green", "blue"], dtype=object)[np.arange(len(frame)) % 3]
    return frame, y


def labels_data():
    return load_iris().target_names[iris_data()[1]], None


def mixed_columns():
    return ColumnTransformer([
        ("numbers", make_pipeline(SimpleImputer(), StandardScaler()),
         ["sepal_length", "sepal_width", "petal_length", "petal_width"]),
        ("colour", OneHotEncoder(handle_unknown="ignore"), ["colour"])])


def nonnegative(estimator):
    return make_pipeline(MinMaxScaler(), estimator)


# name shown in the document -> (factory, data)
CASES = {
    "LinearRegression": (LinearRegression, diabetes_data),
    "Ridge": (lambda: Ridge(alpha=0.5), diabetes_data),
    "RidgeClassifier": (RidgeClassifier, iris_data),
    "Lasso": (lambda: Lasso(alpha=0.1), diabetes_data),
    "ElasticNet": (lambda: ElasticNet(alpha=0.01), diabetes_data),
    "PoissonRegressor": (PoissonRegressor, positive_target_data),
    "TweedieRegressor": (lambda: TweedieRegressor(power=1.5), positive_target_data),
    "GammaRegressor": (GammaRegressor, positive_target_data),
    "LogisticRegression": (lambda: make_pipeline(StandardScaler(), LogisticRegression()), iris_data),
    "SGDClassifier": (lambda: make_pipeline(StandardScaler(), SGDClassifier(random_state=0)), iris_data),
    "SGDRegressor": (lambda: make_pipeline(StandardScaler(), SGDRegressor(random_state=0)), diabetes_data),
    "SVC": (lambda: SVC(probability=True, random_state=0), iris_data),
    "SVR": (SVR, diabetes_data),
    "LinearSVC": (lambda: make_pipeline(StandardScaler(), LinearSVC(random_state=0)), iris_data),
    "LinearSVR": (lambda: make_pipeline(StandardScaler(), LinearSVR(random_state=0)), diabetes_data),
    "GaussianNB": (GaussianNB, iris_data),
    "MultinomialNB": (MultinomialNB, iris_data),
    "BernoulliNB": (BernoulliNB, iris_data),
    "ComplementNB": (ComplementNB, iris_data),
    "KNeighborsClassifier (kd_tree)": (lambda: KNeighborsClassifier(algorithm="kd_tree"), iris_data),
    "KNeighborsClassifier (ball_tree)": (lambda: KNeighborsClassifier(algorithm="ball_tree",
                                                                      metric="manhattan"), iris_data),
    "KNeighborsClassifier (brute)": (lambda: KNeighborsClassifier(algorithm="brute"), iris_data),
    "KNeighborsRegressor": (lambda: KNeighborsRegressor(weights="distance"), diabetes_data),
    "DecisionTreeClassifier": (lambda: DecisionTreeClassifier(random_state=0), iris_data),
    "DecisionTreeRegressor": (lambda: DecisionTreeRegressor(random_state=0, max_depth=6), diabetes_data),
    "ExtraTreeClassifier": (lambda: ExtraTreeClassifier(random_state=0), iris_data),
    "ExtraTreeRegressor": (lambda: ExtraTreeRegressor(random_state=0), diabetes_data),
    "RandomForestClassifier": (lambda: RandomForestClassifier(n_estimators=10, random_state=0), iris_data),
    "RandomForestRegressor": (lambda: RandomForestRegressor(n_estimators=10, random_state=0), diabetes_data),
    "ExtraTreesClassifier": (lambda: ExtraTreesClassifier(n_estimators=10, random_state=0), iris_data),
    "ExtraTreesRegressor": (lambda: ExtraTreesRegressor(n_estimators=10, random_state=0), diabetes_data),
    "GradientBoostingClassifier": (lambda: GradientBoostingClassifier(n_estimators=20, random_state=0),
                                   iris_data),
    "GradientBoostingRegressor": (lambda: GradientBoostingRegressor(n_estimators=20, random_state=0),
                                  diabetes_data),
    "HistGradientBoostingClassifier": (lambda: HistGradientBoostingClassifier(max_iter=20, random_state=0),
                                       iris_data),
    "HistGradientBoostingRegressor": (lambda: HistGradientBoostingRegressor(max_iter=20, random_state=0),
                                      diabetes_data),
    "HistGradientBoostingClassifier (categorical)": (
        lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0, categorical_features="from_dtype"),
        lambda: (mixed_data()[0].astype({"colour": "category"}), mixed_data()[1])),
    "StandardScaler": (StandardScaler, diabetes_data),
    "MinMaxScaler": (MinMaxScaler, diabetes_data),
    "MaxAbsScaler": (MaxAbsScaler, diabetes_data),
    "RobustScaler": (RobustScaler, diabetes_data),
    "Normalizer": (Normalizer, iris_data),
    "Binarizer": (lambda: Binarizer(threshold=3.0), iris_data),
    "OneHotEncoder": (lambda: OneHotEncoder(handle_unknown="ignore"), lambda: (mixed_data()[0][["colour"]], None)),
    "OrdinalEncoder": (lambda: OrdinalEncoder(encoded_missing_value=-1),
                       lambda: (mixed_data()[0][["colour", "sepal_width"]], None)),
    "SimpleImputer": (lambda: SimpleImputer(strategy="median"), lambda: (mixed_data()[0].drop(columns="colour"),
                                                                         None)),
    "PolynomialFeatures": (lambda: PolynomialFeatures(degree=2), iris_data),
    "KBinsDiscretizer": (lambda: KBinsDiscretizer(n_bins=3, encode="ordinal", quantile_method="averaged_inverted_cdf"),
                         iris_data),
    "LabelEncoder": (LabelEncoder, labels_data),
    "LabelBinarizer": (LabelBinarizer, labels_data),
    "FunctionTransformer": (lambda: make_pipeline(FunctionTransformer(), Ridge()), diabetes_data),
    "PCA": (lambda: PCA(n_components=2), iris_data),
    "TruncatedSVD": (lambda: TruncatedSVD(n_components=2, random_state=0), iris_data),
    "CountVectorizer": (lambda: make_pipeline(CountVectorizer(), MultinomialNB()), text_data),
    "TfidfVectorizer": (lambda: make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression()),
                        text_data),
    "TfidfTransformer": (lambda: make_pipeline(CountVectorizer(), TfidfTransformer(), SGDClassifier(random_state=0)),
                         text_data),
    "ColumnTransformer": (lambda: make_pipeline(mixed_columns(), LogisticRegression()), mixed_data),
    "ColumnTransformer (remainder passthrough)": (
        lambda: make_pipeline(ColumnTransformer([("colour", OneHotEncoder(), ["colour"])],
                                                remainder=make_pipeline(SimpleImputer(), StandardScaler())),
                              RandomForestClassifier(n_estimators=5, random_state=0)), mixed_data),
    "Pipeline": (lambda: Pipeline([("scale", StandardScaler()), ("pca", PCA(n_components=3)),
                                   ("model", LogisticRegression())]), iris_data),
    "FeatureUnion": (lambda: make_pipeline(FeatureUnion([("pca", PCA(n_components=2)),
                                                         ("poly", PolynomialFeatures(2))]), StandardScaler(),
                                           LogisticRegression(max_iter=1000)), iris_data),
    "VotingClassifier (soft)": (lambda: VotingClassifier([("lr", LogisticRegression(max_iter=1000)),
                                                          ("nb", GaussianNB()),
                                                          ("tree", DecisionTreeClassifier(random_state=0))],
                                                         voting="soft"), iris_data),
    "VotingClassifier (hard)": (lambda: VotingClassifier([("lr", LogisticRegression(max_iter=1000)),
                                                          ("knn", KNeighborsClassifier())]), iris_data),
    "VotingRegressor": (lambda: VotingRegressor([("ridge", Ridge()), ("tree", DecisionTreeRegressor(max_depth=4,
                                                                                                    random_state=0))]),
                        diabetes_data),
    "StackingClassifier": (lambda: StackingClassifier([("tree", DecisionTreeClassifier(random_state=0)),
                                                       ("nb", GaussianNB())],
                                                      final_estimator=LogisticRegression(max_iter=1000)),
                           iris_data),
    "StackingRegressor": (lambda: StackingRegressor([("ridge", Ridge()), ("svr", SVR())],
                                                    final_estimator=Ridge()), diabetes_data),
    "KMeans": (lambda: KMeans(n_clusters=3, n_init=3, random_state=0), iris_data),
    "DummyClassifier": (lambda: DummyClassifier(strategy="prior"), iris_data),
    "DummyRegressor": (DummyRegressor, diabetes_data),
}


def fit(name, cases=CASES):
    """(the fitted estimator, the data it was fitted on) for one family of `cases`, fitted once per process:
    the tests that ask share both, and none changes either (rows a test edits are its own copies)."""
    return _fitted(cases[name])


@functools.cache
def _fitted(case):
    factory, data = case
    x, y = data()
    estimator = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # convergence warnings of tiny fits say nothing here
        estimator.fit(x) if y is None else estimator.fit(x, y)
    return estimator, x


def outputs(estimator, x):
    """{method: output} for every method the estimator has and accepts `x` for."""
    results = {}
    for method in METHODS:
        function = getattr(estimator, method, None)
        if not callable(function):
            continue
        try:
            with np.errstate(divide="ignore"):          # predict_log_proba of a pure leaf: log(0)
                results[method] = function(x)
        except (AttributeError, ValueError, TypeError, NotImplementedError):
            continue                             # e.g. predict_proba of a hard-voting classifier
    return results


def assert_identical(expected, actual, where):
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_identical(e, a, f"{where}[{i}]")
    elif scipy.sparse.issparse(expected):
        assert scipy.sparse.issparse(actual) and expected.format == actual.format, where
        expected, actual = expected.tocsr(), actual.tocsr()
        for part in ("data", "indices", "indptr"):
            assert_identical(getattr(expected, part), getattr(actual, part), f"{where}.{part}")
    else:
        expected, actual = np.asarray(expected), np.asarray(actual)
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, where
        if expected.dtype.kind in "fc":
            assert expected.tobytes() == actual.tobytes(), f"{where}: not bit for bit"
        else:
            assert np.array_equal(expected, actual), where
