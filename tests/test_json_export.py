"""The JSON format's defences against forged state, and the export command (`python service.py export`)."""

import base64
import json
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_iris
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier, VotingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, PolynomialFeatures
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

import service
from support import ROOT

X, Y = load_iris(return_X_y=True)


def document(estimator):
    return json.loads(service.dump_json_model(estimator))


def refused(doc, fragment):
    with pytest.raises(service.ArtifactError) as caught:
        service.load_json_model(json.dumps(doc))
    assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


def tree_of(doc, path=("estimator", "state", "tree_")):
    node = doc
    for key in path:
        node = node[key]
    return node


def column(structure, field):
    """(array, writer) for one node field of a tree node: change the array, then writer() stores it back."""
    node = structure["nodes"][field]
    array = np.frombuffer(base64.b64decode(node["data"]), dtype=node["dtype"]).copy()

    def write():
        node["data"] = base64.b64encode(array.tobytes()).decode()
    return array, write


@pytest.fixture(scope="module")
def tree_doc():
    return document(DecisionTreeClassifier(random_state=0).fit(X, Y))


# -- forged trees ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, fragment", [
    ("left_child", 0, "do not form one tree"),         # a loop back to the root: apply() would never end
    ("left_child", 10_000, "do not form one tree"),    # outside the node array
    ("right_child", -1, "do not form one tree"),       # only one child
    ("feature", 99, "feature that does not exist"),    # reads outside the row
    ("feature", -1, "feature that does not exist"),
])
def test_a_forged_tree_node_is_refused(tree_doc, field, value, fragment):
    doc = json.loads(json.dumps(tree_doc))
    nodes, write = column(tree_of(doc), field)
    nodes[0] = value
    write()
    refused(doc, fragment)


def test_a_tree_whose_values_do_not_match_its_nodes_is_refused(tree_doc):
    doc = json.loads(json.dumps(tree_doc))
    values = tree_of(doc)["value"]
    values["shape"][0] -= 1
    values["data"] = base64.b64encode(base64.b64decode(values["data"])[:-8 * values["shape"][1] * values["shape"][2]]
                                      ).decode()
    refused(doc, "value must be a float64 array of its")


def test_a_tree_with_more_features_than_its_estimator_is_refused(tree_doc):
    doc = json.loads(json.dumps(tree_doc))
    tree_of(doc)["n_features"] = 40
    refused(doc, "its tree has 40 features and 1 outputs, the estimator 4 and 1")


def test_a_forest_member_tree_is_checked_too():
    doc = document(RandomForestClassifier(n_estimators=3, random_state=0).fit(X, Y))
    member = doc["estimator"]["state"]["estimators_"][2]
    nodes, write = column(member["state"]["tree_"], "right_child")
    nodes[0] = 0
    write()
    message = refused(doc, "do not form one tree")
    assert "estimators_[2]" in message


def test_a_forged_histogram_predictor_is_refused():
    doc = document(HistGradientBoostingClassifier(max_iter=3, random_state=0).fit(X, Y))
    predictor = doc["estimator"]["state"]["_predictors"][0][0]
    nodes, write = column(predictor, "feature_idx")
    nodes[0] = 50
    write()
    refused(doc, "feature the estimator does not have")


def test_forged_svm_counts_are_refused():
    doc = document(SVC().fit(X, Y))
    counts = doc["estimator"]["state"]["_n_support"]
    counts["data"] = base64.b64encode(np.array([5, 5, 5], dtype="<i4").tobytes()).decode()
    refused(doc, "do not agree")


def test_kmeans_centres_of_the_wrong_width_are_refused():
    doc = document(KMeans(n_clusters=2, n_init=1, random_state=0).fit(X))
    centres = doc["estimator"]["state"]["cluster_centers_"]
    centres["shape"] = [4, 2]
    refused(doc, "cluster_centers_ holds 2 features")


def test_a_neighbours_tree_is_rebuilt_from_data_never_restored_from_state():
    knn = KNeighborsClassifier(algorithm="kd_tree").fit(X, Y)
    doc = document(knn)
    node = doc["estimator"]["state"]["_tree"]
    assert node["$type"] == "neighbors_tree" and set(node) == {"$type", "class", "data", "leaf_size", "metric",
                                                               "metric_params"}
    loaded = service.load_json_model(json.dumps(doc))
    assert np.array_equal(loaded.kneighbors(X)[1], knn.kneighbors(X)[1])
    node["metric"] = {"$type": "object"}
    refused(doc, "a metric name")
    node["metric"], node["metric_params"] = "pyfunc", {"$type": "dict", "items": [["func", {
        "$type": "partial", "function": "sklearn.utils.check_array", "args": [], "keywords": []}]]}
    refused(doc, "parameters that are values")


@pytest.fixture(scope="module")
def sgd_doc():
    from sklearn.linear_model import SGDClassifier
    return document(SGDClassifier(random_state=0).fit(X, Y))


@pytest.mark.parametrize("mutate, fragment", [
    (lambda node: node.update({"class": "sklearn.neighbors.NearestNeighbors"}), "is not allowed"),
    (lambda node: node.update({"class": "sklearn.tree._tree.Tree"}), "is not allowed"),   # built, never an object
    (lambda node: node.update({"args": ["4", {"$type": "ndarray", "dtype": "<i8", "shape": [1],
                                              "data": base64.b64encode(np.int64(3).tobytes()).decode()}, 1]}),
     "must be numbers"),
    (lambda node: node.update({"args": [[4]]}), "must be numbers"),
])
def test_object_nodes_take_only_allowed_classes_and_numbers(sgd_doc, mutate, fragment):
    doc = json.loads(json.dumps(sgd_doc))
    node = doc["estimator"]["state"]["_loss_function_"]
    assert node["$type"] == "object" and node["class"].endswith("_sgd_fast.Hinge")
    mutate(node)
    refused(doc, fragment)


def test_a_state_built_object_refuses_arguments():
    doc = document(HistGradientBoostingClassifier(max_iter=2, random_state=0).fit(X, Y))
    loss = doc["estimator"]["state"]["_loss"]
    assert loss["class"] == "sklearn._loss.loss.HalfMultinomialLoss"
    loss["args"] = [1]
    refused(doc, "without args")


def test_a_partial_may_wrap_only_an_allowed_function():
    from sklearn.utils import check_array
    import functools
    pipeline = make_pipeline(FunctionTransformer(functools.partial(check_array, dtype=np.float64)),
                             LogisticRegression(max_iter=1000)).fit(X, Y)
    doc = document(pipeline)
    partial = doc["estimator"]["state"]["steps"][0]["items"][1]["state"]["func"]
    assert partial == {"$type": "partial", "function": "sklearn.utils.check_array", "args": [],
                       "keywords": [["dtype", {"$type": "type", "name": "float64"}]]}
    assert np.array_equal(service.load_json_model(json.dumps(doc)).predict(X), pipeline.predict(X))
    partial["function"] = "os.system"
    refused(doc, "'os.system' is not allowed")


def test_a_function_other_than_the_allowed_ones_is_refused_at_export():
    pipeline = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()).fit(X, Y)
    with pytest.raises(service.ArtifactError, match=r"estimator\.steps\[0\]\[1\]\.func"):
        service.dump_json_model(pipeline)


# -- the export command ------------------------------------------------------------------------------------

def run_export(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "export", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd or ROOT)


@pytest.mark.slow
def test_export_converts_a_joblib_artifact_and_reports_what_it_compared(tmp_path):
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, Y)
    joblib.dump(forest, tmp_path / "forest.joblib")
    result = run_export(tmp_path / "forest.joblib", tmp_path / "forest.json")
    assert result.returncode == 0, result.stderr
    assert "predict, predict_proba, predict_log_proba identical to the original on 20 made-up rows" in result.stdout
    loaded = service.load_json_model(tmp_path / "forest.json")
    assert np.array_equal(loaded.predict_proba(X), forest.predict_proba(X))
    first = (tmp_path / "forest.json").read_bytes()
    assert run_export(tmp_path / "forest.joblib", tmp_path / "again.json").returncode == 0
    assert (tmp_path / "again.json").read_bytes() == first, "the same model gives the same bytes"
    digest = __import__("hashlib").sha256(first).hexdigest()
    assert f"sha256 {digest}" in result.stdout


@pytest.mark.slow
def test_export_of_a_text_model_needs_a_sample_and_checks_on_it(tmp_path):
    texts = ["a great film", "a boring film", "great acting", "awful plot"] * 3
    model = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [1, 0, 1, 0] * 3)
    with open(tmp_path / "text.pkl", "wb") as handle:
        pickle.dump(model, handle)
    result = run_export(tmp_path / "text.pkl", tmp_path / "text.json")
    assert result.returncode == 1 and "--check SAMPLE.json" in result.stderr
    assert not (tmp_path / "text.json").exists()
    (tmp_path / "sample.json").write_text(json.dumps({"instances": ["great", "boring plot", "film"]}))
    result = run_export(tmp_path / "text.pkl", tmp_path / "text.json", "--check", tmp_path / "sample.json")
    assert result.returncode == 0, result.stderr
    assert "on 3 sample rows" in result.stdout
    assert service.load_json_model(tmp_path / "text.json").predict(["great"]).tolist() == model.predict(["great"]).tolist()


@pytest.mark.slow
def test_export_refuses_what_the_format_cannot_hold_and_writes_nothing(tmp_path):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    joblib.dump(LinearDiscriminantAnalysis().fit(X, Y), tmp_path / "lda.joblib")
    result = run_export(tmp_path / "lda.joblib", tmp_path / "lda.json")
    assert result.returncode == 1
    assert "LinearDiscriminantAnalysis is not supported by the JSON model format" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == ["lda.joblib"]


@pytest.mark.parametrize("sample, fragment", [
    ({"instances": [[1, 2]]}, "expected 4 features, got 2"),
    ({"rows": []}, "Missing 'inputs' or 'instances' key"),
])
@pytest.mark.slow
def test_export_explains_a_sample_that_does_not_fit(tmp_path, sample, fragment):
    joblib.dump(LogisticRegression(max_iter=1000).fit(X, Y), tmp_path / "m.joblib")
    (tmp_path / "sample.json").write_text(json.dumps(sample))
    result = run_export(tmp_path / "m.joblib", tmp_path / "m.json", "--check", tmp_path / "sample.json")
    assert result.returncode == 1 and fragment in result.stderr and not (tmp_path / "m.json").exists()


def test_export_of_a_missing_file_or_unknown_extension_fails_cleanly(tmp_path):
    result = run_export(tmp_path / "nope.joblib", tmp_path / "x.json")
    assert result.returncode == 1 and "No such file" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "model.onnx").write_bytes(b"x")
    result = run_export(tmp_path / "model.onnx", tmp_path / "x.json")
    assert result.returncode == 1 and "unknown extension" in result.stderr


def test_export_json_model_function_returns_its_report(tmp_path):
    model = LogisticRegression(max_iter=1000).fit(X, Y)
    report = service.export_json_model(model, tmp_path / "m.json", sample=X[:5].tolist())
    assert report["rows"] == 5 and report["methods"] == ["predict", "predict_proba", "predict_log_proba",
                                                         "decision_function"]
    assert report["bytes"] == os.path.getsize(tmp_path / "m.json")


def test_an_exported_model_serves_from_the_store(tmp_path, make_client):
    model = make_pipeline(FunctionTransformer(), LogisticRegression(max_iter=1000)).fit(X, Y)
    service.export_json_model(model, tmp_path / "iris.json")
    body = make_client(tmp_path).post_json("/models/iris/predict", {"instances": X[:3].tolist(),
                                                                   "method": "predict_proba"}).json
    assert body["predictions"] == model.predict_proba(X[:3]).tolist()


def test_export_of_a_multi_output_classifier_compares_its_list_of_probabilities(tmp_path):
    """predict_proba of a multi-output classifier is a list of arrays of different widths."""
    y = np.column_stack([Y, X[:, 0] > 5.8])
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y)
    report = service.export_json_model(forest, tmp_path / "forest.json")
    assert "predict_proba" in report["methods"] and "predict" in report["methods"]
    copy = service.load_json_model(tmp_path / "forest.json")
    for expected, actual in zip(forest.predict_proba(X), copy.predict_proba(X)):
        assert expected.tobytes() == actual.tobytes()


def _set_state(doc, key, value):
    doc["estimator"]["state"][key] = value
    return doc


def _array_node(array):
    return {"$type": "ndarray", "dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode()}


# What the mutation fuzzer (tests/json_fuzz.py) found: each loaded, then crashed or answered a 500.
@pytest.mark.parametrize("make, key, value, fragment", [
    (lambda: KNeighborsClassifier(algorithm="brute").fit(X, Y), "_fit_X", _array_node(np.zeros((0, 4))),
     "same training rows"),                                                                  # was SIGFPE
    (lambda: DecisionTreeClassifier(random_state=0).fit(X, Y), "n_features_in_", None, "needs n_features_in_"),
    (lambda: KMeans(n_clusters=2, n_init=1, random_state=0).fit(X), "_n_threads", -2, "thread count"),  # abort
    (lambda: LogisticRegression(max_iter=1000).fit(X, Y), "n_features_in_", {"$type": "float", "value": "nan"},
     "positive integer"),
    (lambda: RandomForestClassifier(n_estimators=2, random_state=0).fit(X, Y), "n_estimators", 10**30,
     "64-bit range"),
    (lambda: LogisticRegression(max_iter=1000).fit(X, Y), "feature_names_in_",
     {"$type": "ndarray", "dtype": "|O", "shape": [1], "items": ["a"]}, "name each"),
    (lambda: KNeighborsClassifier(algorithm="brute").fit(X, Y), "n_neighbors", 2**31, "n_neighbors at most"),
    (lambda: SVC().fit(X, Y), "degree", 2**31, "degree must be"),                      # OverflowError in libsvm
    (lambda: SVC().fit(X, Y), "_n_support", _array_node(np.array([150], dtype=np.int32)), "do not agree"),  # SIGSEGV
    (lambda: SVC().fit(X, Y), "_effective_probability", True, "do not agree"),          # libsvm reads probA
    (lambda: DummyRegressor().fit(X, Y), "n_outputs_", 2**31 - 1, "n_outputs_ values"),      # 48 GiB per request
    (lambda: PolynomialFeatures(2).fit(X), "_n_out_full", 2**31 - 1, "output sizes"),          # likewise
])
def test_what_the_fuzzer_found_is_refused(make, key, value, fragment):
    doc = document(make())
    refused(_set_state(doc, key, value) if value is not None else
            (doc["estimator"]["state"].pop(key), doc)[1], fragment)


def test_gradient_boosting_stages_must_be_as_wide_as_their_initial_estimator():
    from sklearn.ensemble import GradientBoostingClassifier

    three = document(GradientBoostingClassifier(n_estimators=2, random_state=0).fit(X, Y))
    two = document(GradientBoostingClassifier(n_estimators=2, random_state=0).fit(X, Y % 2))
    three["estimator"]["state"]["init_"] = two["estimator"]["state"]["init_"]
    refused(three, "init_ predicts (1, 2) raw values for one row, the stages hold 3 trees each")


def test_a_voting_member_must_predict_encoded_labels():
    """Hard voting bincounts its members' predictions: a forged label of 2**31-1 asked for 16 GiB (fuzzer)."""
    doc = document(VotingClassifier([("tree", DecisionTreeClassifier(random_state=0)),
                                     ("knn", KNeighborsClassifier())]).fit(X, Y))
    doc["estimator"]["state"]["estimators_"][1]["state"]["classes_"] = _array_node(np.array([0, 1, 2**31 - 1]))
    refused(doc, "encoded labels 0 to 2")


def test_a_vectorizer_ngram_range_must_start_at_one_or_more():
    """A lower bound of -2**31 made every request loop two billion times (fuzzer: a hang)."""
    doc = document(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["a good film", "a bad film"], [1, 0]))
    doc["estimator"]["state"]["steps"][0]["items"][1]["state"]["ngram_range"]["items"][0] = -2**31
    refused(doc, "ngram_range must be")


@pytest.mark.parametrize("key, value, fragment", [
    ("token_pattern", "(\\w+\\s?)+$", "not one a JSON model may use"),       # backtracks: exponential on a crafted text
    ("ngram_range", {"$type": "tuple", "items": [1, 10**9]}, "max_n <= 8"),    # n-grams of every length
])
def test_a_vectorizer_does_bounded_work_per_text(key, value, fragment):
    doc = document(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(["a good film", "a bad film"], [1, 0]))
    doc["estimator"]["state"]["steps"][0]["items"][1]["state"][key] = value
    refused(doc, fragment)
