"""JSON models are rebuilt, never restored: a file supplies values and plain arrays of dtypes the loader
fixes; trees and histogram predictors are built by the loader, with what derives from their arrays computed
and each structure checked whole; a budget bounds what a file can make the loader allocate; every check
runs in the decoder itself; format version 1 files load through the same builders.

Each class of defect the outside review of issue 21 found has a test here: memory described by the file
(record layouts, empty trees), work per row read from the file (stored depths), values compiled code does
not accept (huge integers), declared sizes allocated before they were checked, and checks at the wrong depth.
"""

import base64
import copy
import json
import os
import tracemalloc

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import (ExtraTreesRegressor, GradientBoostingClassifier, GradientBoostingRegressor,
                              HistGradientBoostingClassifier, RandomForestClassifier, RandomForestRegressor,
                              VotingRegressor)
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import KBinsDiscretizer, OneHotEncoder, PolynomialFeatures
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

import service
import families
from support import ROOT, assert_error, write_artifact
from json_fuzz import array_node, as_version_1, read_array

X, Y = load_iris(return_X_y=True)
DIABETES_X, DIABETES_Y = load_diabetes(return_X_y=True)


def document(estimator):
    return json.loads(service.dump_json_model(estimator))


def refused(doc, fragment, limits=None):
    with pytest.raises(service.ArtifactError) as caught:
        service.load_json_model(json.dumps(doc), limits)
    assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


def set_column(structure, field, index, value):
    """Change one node field of a tree or predictor node (current format) in place."""
    array = read_array(structure["nodes"][field])
    array[index] = value
    structure["nodes"][field] = array_node(array)


def walk(node):
    yield node
    if isinstance(node, list):
        for item in node:
            yield from walk(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from walk(item)


@pytest.fixture(scope="module")
def tree_doc():
    return document(DecisionTreeClassifier(random_state=0).fit(X, Y))


@pytest.fixture(scope="module")
def boosting():
    return HistGradientBoostingClassifier(max_iter=5, random_state=0).fit(X, Y)


# -- 1. a file describes values, never memory -----------------------------------------------------------------

@pytest.mark.parametrize("case", ["DecisionTreeClassifier", "RandomForestRegressor", "GradientBoostingClassifier",
                                  "HistGradientBoostingClassifier (categorical)", "SVC", "KNeighborsClassifier (brute)",
                                  "OneHotEncoder", "TfidfVectorizer", "StackingClassifier"])
def test_a_written_model_names_only_the_formats_dtypes(case):
    """No record layout, byte order, offset or item size: every dtype is a name of the format's closed table."""
    estimator, _ = families.fit(case)
    for node in walk(document(estimator)):
        if isinstance(node, dict) and "dtype" in node and node.get("$type") in ("ndarray", "scalar", "dtype"):
            name = node["dtype"]
            assert isinstance(name, str) and (name in service.JSON_DTYPES or name == "|O" or
                                              service._TEXT_DTYPE.fullmatch(name)), (case, name)


@pytest.mark.parametrize("dtype", [
    {"names": ["a"], "formats": ["<f8"], "offsets": [2**31], "itemsize": 8},     # read 2 GiB past the buffer
    {"names": ["a"], "formats": ["<f8"], "offsets": [0], "itemsize": 1},
    ">f8", "=f8", "f8", "|V8", "<U0", "O", "<f8,<i4",
])
def test_a_dtype_that_describes_memory_is_refused(tree_doc, dtype):
    doc = copy.deepcopy(tree_doc)
    doc["estimator"]["state"]["extra"] = {"$type": "ndarray", "dtype": dtype, "shape": [1],
                                          "data": base64.b64encode(bytes(8)).decode()}
    refused(doc, "is not allowed")


def test_trees_and_predictors_are_written_as_plain_columns_without_what_the_loader_computes(tree_doc, boosting):
    tree = tree_doc["estimator"]["state"]["tree_"]
    assert tree["$type"] == "tree" and set(tree) == {"$type", "n_features", "n_classes", "nodes", "value"}
    assert set(tree["nodes"]) == {"left_child", "right_child", "feature", "threshold", "impurity", "n_node_samples",
                                  "weighted_n_node_samples", "missing_go_to_left"}
    predictor = document(boosting)["estimator"]["state"]["_predictors"][0][0]
    assert predictor["$type"] == "tree_predictor" and "depth" not in predictor["nodes"]


@pytest.mark.parametrize("structure", ["tree", "tree_predictor"])
def test_a_tree_with_no_nodes_is_refused(tree_doc, boosting, structure):
    doc = copy.deepcopy(tree_doc) if structure == "tree" else document(boosting)
    node = doc["estimator"]["state"]["tree_"] if structure == "tree" else \
        doc["estimator"]["state"]["_predictors"][0][0]
    node["nodes"] = {field: array_node(read_array(column)[:0]) for field, column in node["nodes"].items()}
    if structure == "tree":
        node["value"] = array_node(read_array(node["value"])[:0])
    refused(doc, "at least one")


@pytest.mark.parametrize("field, index, value", [
    ("left_child", 0, 0),            # the root its own child: a walk never ends
    ("right_child", 2, 1),           # a node with two parents, and one with none
    ("left_child", 0, -1),           # a leaf with a right child
    ("right_child", 0, 10_000),      # outside the tree
])
def test_nodes_that_do_not_form_one_tree_are_refused(tree_doc, field, index, value):
    doc = copy.deepcopy(tree_doc)
    set_column(doc["estimator"]["state"]["tree_"], field, index, value)
    refused(doc, "tree")


@pytest.mark.parametrize("field, value, fragment", [
    ("threshold", np.nan, "threshold is NaN"),
    ("missing_go_to_left", 2, "not 0 or 1"),
])
def test_a_split_compiled_code_cannot_take_is_refused(tree_doc, field, value, fragment):
    doc = copy.deepcopy(tree_doc)
    set_column(doc["estimator"]["state"]["tree_"], field, 0, value)
    refused(doc, fragment)


def test_a_tree_node_column_of_another_dtype_is_refused(tree_doc):
    doc = copy.deepcopy(tree_doc)
    nodes = doc["estimator"]["state"]["tree_"]["nodes"]
    nodes["feature"] = array_node(read_array(nodes["feature"]).astype(np.int32))
    refused(doc, "nodes.feature must be a 1-d array of <i8")


# -- 2. work per row comes from the arrays, never from a stored count ---------------------------------------

def test_stored_depths_and_counts_of_version_1_files_are_never_read(boosting):
    """A version 1 file stored each predictor node's depth, which the native walker once trusted (depth 200,000:
    83 s to load, 0.8 s per row), and each tree's node count and max depth: all are computed instead."""
    old = as_version_1(document(boosting))
    records = old["estimator"]["state"]["_predictors"][0][0]["state"]["items"][2][1]
    nodes = read_array(records)
    nodes["depth"] = 2**31 - 1
    old["estimator"]["state"]["_predictors"][0][0]["state"]["items"][2][1] = array_node(nodes, records["dtype"])
    loaded = service.load_json_model(json.dumps(old))
    assert loaded._predictors[0][0].get_max_depth() == boosting._predictors[0][0].get_max_depth()
    assert np.array_equal(loaded._predictors[0][0].nodes, boosting._predictors[0][0].nodes)

    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, Y)
    old = as_version_1(document(forest))
    items = old["estimator"]["state"]["estimators_"][0]["state"]["tree_"]["state"]["items"]
    items[0][1], items[1][1] = 2**31, 10**9                          # max_depth, node_count
    loaded = service.load_json_model(json.dumps(old))
    assert loaded.estimators_[0].tree_.max_depth == forest.estimators_[0].tree_.max_depth
    assert loaded.estimators_[0].tree_.node_count == forest.estimators_[0].tree_.node_count


# -- 3. values compiled code cannot take are refused at load, not answered with a 500 ---------------------------

def encoder_document():
    rows = np.array([["red", "a"], ["blue", "b"], ["red", "b"]], dtype=object)
    return document(OneHotEncoder(handle_unknown="ignore").fit(rows)), rows


def test_a_400_digit_integer_among_categories_is_refused_at_load():
    doc, _ = encoder_document()
    doc["estimator"]["state"]["categories_"][0]["items"][0] = 10**400
    refused(doc, "outside the 64-bit range")


@pytest.mark.parametrize("place", ["list", "n_classes", "object item", "state"])
def test_an_integer_beyond_64_bits_is_refused_wherever_it_is(tree_doc, place):
    doc = copy.deepcopy(tree_doc)
    state = doc["estimator"]["state"]
    if place == "list":
        state["extra"] = [1, 2**64]
    elif place == "n_classes":
        state["tree_"]["n_classes"] = [2**70]
    elif place == "object item":
        state["extra"] = {"$type": "ndarray", "dtype": "|O", "shape": [1], "items": [-2**63 - 1]}
    else:
        state["max_features_"] = 2**63
    refused(doc, "64-bit" if place != "n_classes" else "n_classes")


def test_only_a_bit_generators_state_may_hold_128_bit_integers(boosting):
    doc = document(boosting)
    generators = [node for node in walk(doc) if isinstance(node, dict) and node.get("$type") == "generator"]
    assert generators, "histogram boosting holds a PCG64 generator"
    service.load_json_model(json.dumps(doc))
    doc["estimator"]["state"]["extra"] = 2**100
    refused(doc, "outside the 64-bit range")


def test_a_generator_position_outside_its_buffer_is_refused():
    import numpy as np_random_owner
    forged = LinearRegression().fit(X, Y)
    forged.legacy = np_random_owner.random.RandomState(0)
    forged.philox = np_random_owner.random.Generator(np_random_owner.random.Philox(0))
    doc = document(forged)
    service.load_json_model(json.dumps(doc))
    legacy = copy.deepcopy(doc)
    legacy["estimator"]["state"]["legacy"]["state"]["items"][2] = 10**6       # MT19937's pos: reads past its key
    refused(legacy, "outside its buffer")
    philox = copy.deepcopy(doc)
    state = philox["estimator"]["state"]["philox"]["state"]["items"]
    next(pair for pair in state if pair[0] == "buffer_pos")[1] = 10**6
    refused(philox, "outside its buffer")


@pytest.mark.parametrize("change, fragment", [
    (lambda state: state.update(support_vectors_=array_node(read_array(state["support_vectors_"]).astype("<f4"))),
     "support_vectors_ must be a C-ordered 2-d float64"),
    (lambda state: state.update(_n_support=array_node(read_array(state["_n_support"]).astype("<i8"))),
     "_n_support must be a C-ordered 1-d int32"),
    (lambda state: state.update(_impl="epsilon_svr"), "may not replace what SVC defines"),
    (lambda state: state.update(_sparse=True), "fitted on dense data"),
])
def test_libsvm_arrays_are_of_the_types_its_wrapper_reads(change, fragment):
    doc = document(SVC().fit(X, Y))
    change(doc["estimator"]["state"])
    refused(doc, fragment)


@pytest.mark.parametrize("make", [lambda: SVC().fit(X, Y), lambda: families.fit("SVC")[0]])   # with probabilities
def test_an_svm_with_and_without_probabilities_round_trips(make):
    """scikit-learn 1.9 keeps probability="deprecated" and says what it fitted in _effective_probability."""
    svm = make()
    assert service.load_json_model(service.dump_json_model(svm)).decision_function(X).tobytes() == \
        svm.decision_function(X).tobytes()


def test_a_precomputed_kernels_support_indices_stay_inside_the_kernel_row():
    kernel = X @ X.T
    doc = document(SVC(kernel="precomputed").fit(kernel, Y))
    svm = SVC(kernel="precomputed").fit(kernel, Y)
    assert np.array_equal(service.load_json_model(json.dumps(doc)).predict(kernel[:9]), svm.predict(kernel[:9]))
    support = read_array(doc["estimator"]["state"]["support_"])
    support[0] = len(X) + 10**6
    doc["estimator"]["state"]["support_"] = array_node(support)
    refused(doc, "support_ must index the")


# -- 4. declared sizes are checked against the arrays and the budget before anything is allocated ------------

@pytest.mark.parametrize("width, fragment", [
    (2**27, "more than 1000000 features in one part (--json-max-width)"),   # what built a 2.3 GiB warm-up row
    (5, "n_features_in_ is 5, but its coef_ holds 4 features"),
])
def test_n_features_in_must_be_the_width_of_the_fitted_arrays_and_within_the_limit(width, fragment):
    doc = document(LogisticRegression(max_iter=1000).fit(X, Y))
    doc["estimator"]["state"]["n_features_in_"] = width
    refused(doc, fragment)


def test_a_preloaded_model_with_a_forged_width_fails_without_building_its_row(tmp_path):
    doc = document(LogisticRegression(max_iter=1000).fit(X, Y))
    doc["estimator"]["state"]["n_features_in_"] = 2**27
    (tmp_path / "wide.json").write_text(json.dumps(doc))
    registry = service.ModelRegistry(service.Config(store=str(tmp_path)), watch=False)
    registry.refresh()
    tracemalloc.start()
    try:
        with pytest.raises(service.ModelUnavailable, match="--json-max-width"):
            registry.get("wide")                 # what --preload runs: load, then warm
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MiB"


@pytest.mark.parametrize("case, part, attribute", [("LabelBinarizer", "LabelBinarizer", "classes_"),
                                                    ("TfidfVectorizer", "TfidfVectorizer", "_tfidf")])
def test_a_text_or_label_model_missing_state_fails_its_load_not_its_requests(tmp_path, case, part, attribute):
    """A model of no fixed width is probed with an empty text: state it reads at every call, missing, once made
    each request a 500 (the mutator, seed 8, #4833 and #9480)."""
    doc = document(families.fit(case)[0])
    del find_class(doc, part)["state"][attribute]
    (tmp_path / "model.json").write_text(json.dumps(doc))
    stat = (tmp_path / "model.json").stat()
    ref = service.ArtifactRef("m", 1, str(tmp_path / "model.json"), "model.json", ".json", stat.st_size,
                              stat.st_mtime_ns)
    with pytest.raises(service.ArtifactError, match=f"fails on an empty text through a fault of the artifact.*"
                                                    f"{attribute}"):
        service._build_model(ref)


@pytest.mark.parametrize("limits, fragment", [
    (service.JsonLimits(nodes=20), "more than 20 tree nodes (--json-max-nodes)"),
    (service.JsonLimits(width=3), "more than 3 features in one part (--json-max-width)"),
    (service.JsonLimits(categories=2), "more than 2 categories (--json-max-categories)"),
    (service.JsonLimits(array_bytes=2000), "more than 2000 bytes of arrays (--json-max-array-bytes)"),
])
def test_a_model_past_a_limit_is_refused_naming_it(limits, fragment):
    doc = document(RandomForestClassifier(n_estimators=3, random_state=0).fit(X, Y))
    refused(doc, fragment, limits)
    service.load_json_model(json.dumps(doc))          # the defaults hold it


def test_an_arrays_declared_size_is_refused_before_it_is_allocated(tree_doc):
    """300 empty strings declared 999,999 characters wide would take 1.1 GiB: refused, having allocated little."""
    doc = copy.deepcopy(tree_doc)
    doc["estimator"]["state"]["extra"] = {"$type": "ndarray", "dtype": "<U999999", "shape": [300],
                                          "items": [""] * 300}
    text = json.dumps(doc)
    tracemalloc.start()
    try:
        with pytest.raises(service.ArtifactError, match="--json-max-array-bytes"):
            service.load_json_model(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MiB"


def test_polynomial_features_output_width_is_bounded():
    doc = document(PolynomialFeatures(3).fit(X))
    refused(doc, "--json-max-width", service.JsonLimits(width=20))


def test_the_limits_are_settings_the_store_applies(tmp_path, make_client):
    write_artifact(tmp_path / "forest.json", RandomForestClassifier(n_estimators=3, random_state=0).fit(X, Y), "json")
    client = make_client(tmp_path, json_max_nodes=10)
    answer = client.post_json("/models/forest/predict", {"instances": X[:1].tolist()}, expect_errors=True)
    assert_error(answer, 503, "--json-max-nodes")
    assert service.Config.load({"json_max_nodes": "10"}).json_max_nodes == 10
    assert service.JsonLimits.of(service.Config()) == service.JsonLimits()


def test_a_file_never_makes_a_prediction_start_more_workers_than_the_machine_has_cpus():
    """A ColumnTransformer with n_jobs=64 forks 64 worker processes at its first transform: 1024 would take
    the machine's memory."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    columns = ColumnTransformer([("a", StandardScaler(), [0, 1]), ("b", MinMaxScaler(), [2, 3])]).fit(X)
    doc = document(columns)
    doc["estimator"]["state"]["n_jobs"] = 1024
    assert service.load_json_model(json.dumps(doc)).n_jobs == os.cpu_count()
    doc["estimator"]["state"]["n_jobs"] = 0
    refused(doc, "n_jobs: a thread count must be an integer")


def test_a_vectorizer_counts_ngrams_of_at_most_eight_words_or_characters():
    pipeline = make_pipeline(CountVectorizer(analyzer="char", ngram_range=(2, 8)), MultinomialNB())
    doc = document(pipeline.fit(["a good film", "a bad film"], [1, 0]))
    service.load_json_model(json.dumps(doc))
    doc["estimator"]["state"]["steps"][0]["items"][1]["state"]["ngram_range"]["items"][1] = 9
    refused(doc, "max_n <= 8")


@pytest.mark.parametrize("key, value", [
    ("_parameter_constraints", {"$type": "dict", "items": []}),     # would switch off scikit-learn's validation
    ("predict_proba", {"$type": "partial", "function": "sklearn.utils.check_array", "args": [], "keywords": []}),
    ("__module__", "os"),
])
def test_a_state_may_not_replace_what_the_class_defines(tree_doc, key, value):
    doc = copy.deepcopy(tree_doc)
    doc["estimator"]["state"][key] = value
    refused(doc, "may not replace what DecisionTreeClassifier defines")


# -- 5. every check is in the decoder: the public API gets them all ------------------------------------------

@pytest.mark.parametrize("mode", ["filename", "file"])
def test_load_json_model_refuses_a_vectorizer_that_reads_files(tmp_path, mode):
    pipeline = make_pipeline(CountVectorizer(), MultinomialNB()).fit(["a good film", "a bad film"], [1, 0])
    pipeline.steps[0][1].set_params(input=mode)
    service.save_json_model(pipeline, tmp_path / "reader.json")
    with pytest.raises(service.ArtifactError, match=f"input='{mode}', which reads the files"):
        service.load_json_model(tmp_path / "reader.json")


# -- ensembles: members agree with each other and with the ensemble ------------------------------------------

def test_a_forest_member_with_other_classes_is_refused():
    doc = document(RandomForestClassifier(n_estimators=2, random_state=0).fit(X, Y))
    two = document(RandomForestClassifier(n_estimators=2, random_state=0).fit(X, Y % 2))
    doc["estimator"]["state"]["estimators_"][1] = two["estimator"]["state"]["estimators_"][1]
    refused(doc, "other outputs or classes than the ensemble's")


def fitted_parts(node, field):
    """The estimator nodes of a composition's `field` (a list of (name, estimator, ...) tuples)."""
    return [entry["items"][1] for entry in node["state"][field]]


def find_class(doc, name):
    return next(node for node in walk(doc) if isinstance(node, dict) and node.get("class", "").endswith(name))


@pytest.mark.parametrize("case, composition, field", [
    ("Pipeline", "pipeline.Pipeline", "steps"),
    ("ColumnTransformer (remainder passthrough)", "ColumnTransformer", "transformers_"),
    ("FeatureUnion", "FeatureUnion", "transformer_list")])
def test_a_composition_hands_its_output_on_only_from_parts_that_transform(case, composition, field):
    """A classifier swapped in among a pipeline's first steps or a ColumnTransformer's or FeatureUnion's fitted
    transformers (fit would refuse it) failed every request at transform time, once a 500 (fuzzer, seed 8)."""
    doc = document(families.fit(case)[0])
    classifier = document(LogisticRegression(max_iter=1000).fit(X, Y))["estimator"]
    fitted_parts(find_class(doc, composition), field)[0].clear()
    fitted_parts(find_class(doc, composition), field)[0].update(classifier)
    refused(doc, "LogisticRegression cannot transform")


@pytest.mark.parametrize("case, composition, field, shape", [
    ("Pipeline", "pipeline.Pipeline", "steps", "(name, estimator)"),
    ("ColumnTransformer (remainder passthrough)", "ColumnTransformer", "transformers_", "(name, estimator, columns)"),
    ("FeatureUnion", "FeatureUnion", "transformer_list", "(name, estimator)")])
def test_a_compositions_entries_have_the_shape_its_class_unpacks(case, composition, field, shape):
    """A ColumnTransformer entry of two items (or four) failed the load with a traceback where the columns are
    read (fuzzer, seed 7), and every request where scikit-learn unpacks them: the decoder refuses it."""
    doc = document(families.fit(case)[0])
    entry = find_class(doc, composition)["state"][field][0]
    entry["items"] = entry["items"][:-1] if len(entry["items"]) == 3 else entry["items"] + ["extra"]
    refused(doc, f"{field} must be a list of {shape} entries")


def test_a_fitted_column_transformer_keeps_its_transformers():
    """Deleted, the load failed with a traceback where the text columns are found (fuzzer, seed 7)."""
    doc = document(families.fit("ColumnTransformer (remainder passthrough)")[0])
    del find_class(doc, "ColumnTransformer")["state"]["transformers_"]
    refused(doc, "a fitted ColumnTransformer without its transformers_")


@pytest.mark.parametrize("make", [lambda: GradientBoostingClassifier(n_estimators=2, random_state=0).fit(X, Y),
                                  lambda: HistGradientBoostingClassifier(max_iter=2, random_state=0).fit(X, Y)])
def test_boosting_fits_one_tree_per_class(make):
    doc = document(make())
    doc["estimator"]["state"]["n_trees_per_iteration_"] = 1
    refused(doc, "n_trees_per_iteration_ must be 3")


def test_n_classes_must_count_the_classes():
    doc = document(DecisionTreeClassifier(random_state=0).fit(X, Y))
    doc["estimator"]["state"]["n_classes_"] = {"$type": "scalar", "dtype": "<i8",
                                               "data": base64.b64encode(np.int64(7).tobytes()).decode()}
    refused(doc, "n_classes_ is not the number of its classes_")


def test_kbins_must_count_the_bins_between_its_edges():
    doc = document(KBinsDiscretizer(n_bins=3, encode="onehot-dense", strategy="uniform").fit(X))
    doc["estimator"]["state"]["n_bins_"] = array_node(np.array([3, 3, 3, 10**6]))
    refused(doc, "n_bins_ must count the bins")


@pytest.mark.parametrize("change, fragment", [
    (lambda state: state.update(_y=array_node(np.full(150, 7, dtype=np.intp))), "_y must be the codes"),
    (lambda state: state["_tree"].update(data=array_node(np.zeros((150, 4)))), "not built on _fit_X"),
])
def test_a_neighbours_model_agrees_with_its_training_rows(change, fragment):
    doc = document(KNeighborsClassifier(algorithm="kd_tree").fit(X, Y))
    change(doc["estimator"]["state"])
    refused(doc, fragment)


def test_a_voting_regressor_with_tree_ensembles_exports(tmp_path):
    """Its `estimators` templates are unfitted forests: no fitted state is asked of them."""
    voting = VotingRegressor([("forest", RandomForestRegressor(n_estimators=3, random_state=0)),
                              ("boosted", GradientBoostingRegressor(n_estimators=3, random_state=0)),
                              ("extra", ExtraTreesRegressor(n_estimators=3, random_state=0)),
                              ("linear", LinearRegression())]).fit(DIABETES_X, DIABETES_Y)
    report = service.export_json_model(voting, tmp_path / "voting.json")
    assert report["methods"] == ["predict", "transform"]
    loaded = service.load_json_model(tmp_path / "voting.json")
    assert loaded.predict(DIABETES_X).tobytes() == voting.predict(DIABETES_X).tobytes()


# -- format version 1 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["DecisionTreeClassifier", "ExtraTreeRegressor", "RandomForestClassifier",
                                  "GradientBoostingClassifier", "HistGradientBoostingClassifier",
                                  "HistGradientBoostingClassifier (categorical)", "VotingClassifier (hard)"])
def test_a_version_1_file_loads_through_the_same_builders_and_predicts_the_same(case):
    estimator, x = families.fit(case)
    old = as_version_1(document(estimator))
    assert old["format_version"] == 1 and '"$type": "tree"' not in json.dumps(old)
    loaded = service.load_json_model(json.dumps(old))
    expected, actual = families.outputs(estimator, x), families.outputs(loaded, x)
    assert set(actual) == set(expected)
    for method, output in expected.items():
        families.assert_identical(output, actual[method], f"{case}.{method}")
    assert service.dump_json_model(loaded) == service.dump_json_model(estimator)


def test_the_shipped_version_1_model_loads():
    with open(os.path.join(ROOT, "model_store", "diabetes.json"), encoding="utf-8") as handle:
        assert json.load(handle)["format_version"] == 1
    rows = load_diabetes(as_frame=True).data[:2]
    assert service.load_json_model(os.path.join(ROOT, "model_store", "diabetes.json")).predict(rows).shape == (2,)


@pytest.mark.parametrize("change", [
    lambda spec: spec["offsets"].__setitem__(1, 2**31),
    lambda spec: spec.update(itemsize=8),
    lambda spec: spec["formats"].__setitem__(0, "|O"),
    lambda spec: spec["names"].__setitem__(0, "depth"),
])
def test_a_version_1_record_layout_other_than_the_loaders_is_refused(tree_doc, change):
    old = as_version_1(tree_doc)
    records = old["estimator"]["state"]["tree_"]["state"]["items"][2][1]
    change(records["dtype"])
    refused(old, "version 1 node records must be laid out as NODE_DTYPE is")


def test_version_1_objects_of_trees_are_not_part_of_version_2(tree_doc):
    old = as_version_1(tree_doc)
    old["format_version"] = 2
    refused(old, "'sklearn.tree._tree.Tree' is not allowed")
