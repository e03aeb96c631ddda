"""Trusted loading: --safe-pickle's restricted unpickler (pickle and joblib), --trust, sha256 checks
(model settings and SHA256SUMS) and scikit-learn version skew (--strict-versions).

Hostile artifacts carry a payload that would leave a marker file behind; the tests check that
the marker never appears, not merely that loading failed."""

import io
import json
import logging
import os
import pickle
import re
import sys
import textwrap
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse
import sklearn
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import (ExtraTreesClassifier, GradientBoostingClassifier, GradientBoostingRegressor,
                              HistGradientBoostingClassifier, HistGradientBoostingRegressor,
                              RandomForestClassifier, RandomForestRegressor, StackingClassifier, VotingClassifier)
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.naive_bayes import GaussianNB, MultinomialNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

import service
from support import EXTENSIONS, write_artifact

SAFE = service.LoadOptions(safe_pickle=True)
REVIEWS = ["a wonderful moving film", "great story and great cast", "superb direction", "the best film this year",
           "a dull boring film", "the story made no sense", "awful direction", "a complete waste of time"]
SENTIMENT = ["positive"] * 4 + ["negative"] * 4


###############################################################################
# Helpers
###############################################################################


def _unicode(text):
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data          # SHORT_BINUNICODE


def call_pickle(module, name, *args, stack_global=False):
    """A pickle that imports module.name and calls it with args (GLOBAL, or protocol 4's STACK_GLOBAL)."""
    if stack_global:
        head = b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93"
    else:
        head = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
    return head + pickle.dumps(args, protocol=2)[2:-1] + b"R."


def restricted_load(data, trust=()):
    return service._RestrictedUnpickler(io.BytesIO(data), trust).load()


def artifact_ref(path):
    path = os.fspath(path)
    stat = os.stat(path)
    return service.ArtifactRef("model", 1, path, os.path.basename(path), os.path.splitext(path)[1],
                               stat.st_size, stat.st_mtime_ns)


def load(path, **options):
    """load_artifact on one file with LoadOptions(**options)."""
    return service.load_artifact(artifact_ref(path), service.LoadOptions(**options))


def registry_for(root, **options):
    registry = service.ModelRegistry(service.Config(store=str(root), **options), watch=False)
    registry.refresh()
    return registry


def status(registry, name, version="1"):
    return next(v for v in registry.describe(name)["versions"] if v["version"] == version)


def failed_load(registry, name, version=None):
    """Load a version that must fail: returns its status (state FAILED, last_error the reason)."""
    with pytest.raises(service.ModelUnavailable) as error:
        registry.get(name, version)
    info = status(registry, name, version or "1")
    assert info["state"] == "FAILED" and info["last_error"] in error.value.message
    return info


def skewed(data, old=sklearn.__version__):
    """Artifact bytes whose recorded scikit-learn version is "0.0.1" (same length, so framing still holds)."""
    new = "0.0." + "1" * (len(old) - 4)
    assert data.count(old.encode()) > 0
    return data.replace(old.encode(), new.encode()), new


###############################################################################
# Real models load under --safe-pickle and predict identically
###############################################################################


def _models():
    iris_x, iris_y = load_iris(return_X_y=True)
    diabetes_x, diabetes_y = load_diabetes(return_X_y=True)
    colours = np.array([["red", "s"], ["blue", "m"], ["green", "l"], ["red", "l"]] * 5, dtype=object)
    generator_sgd = SGDClassifier(random_state=0).fit(iris_x, iris_y)
    generator_sgd.generator_ = np.random.default_rng(3)          # a Generator with its PCG64 and SeedSequence
    return {
        "scaled_logistic": (make_pipeline(StandardScaler(), LogisticRegression()).fit(iris_x, iris_y), iris_x),
        "random_forest": (RandomForestClassifier(n_estimators=5, random_state=0).fit(iris_x, iris_y), iris_x),
        "forest_regressor": (RandomForestRegressor(n_estimators=4, random_state=0).fit(diabetes_x, diabetes_y),
                             diabetes_x),
        "extra_trees": (ExtraTreesClassifier(n_estimators=4, random_state=0).fit(iris_x, iris_y), iris_x),
        "hist_gradient_boosting": (HistGradientBoostingClassifier(max_iter=5).fit(iris_x, iris_y), iris_x),
        "hist_gradient_regressor": (HistGradientBoostingRegressor(max_iter=5).fit(diabetes_x, diabetes_y),
                                    diabetes_x),
        "gradient_boosting": (GradientBoostingClassifier(n_estimators=5, random_state=0).fit(iris_x, iris_y),
                              iris_x),
        "gradient_boosting_random_state": (
            GradientBoostingRegressor(n_estimators=5, subsample=0.7, random_state=np.random.RandomState(0))
            .fit(diabetes_x, diabetes_y), diabetes_x),
        "knn_kd_tree": (KNeighborsClassifier(algorithm="kd_tree").fit(iris_x, iris_y), iris_x),
        "knn_ball_tree": (KNeighborsRegressor(algorithm="ball_tree").fit(diabetes_x, diabetes_y), diabetes_x),
        "knn_sparse": (KNeighborsClassifier(algorithm="brute").fit(scipy.sparse.csr_matrix(iris_x), iris_y),
                       iris_x),
        "svc": (make_pipeline(StandardScaler(), SVC()).fit(iris_x, iris_y), iris_x),
        "tfidf_text": (make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(REVIEWS, SENTIMENT), REVIEWS),
        "count_text": (make_pipeline(CountVectorizer(), MultinomialNB()).fit(REVIEWS, SENTIMENT), REVIEWS),
        "onehot_objects": (make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression())
                           .fit(colours, [0, 1, 1, 0] * 5), colours),
        "voting": (VotingClassifier([("lr", LogisticRegression(max_iter=500)), ("tree", DecisionTreeClassifier())],
                                    voting="soft").fit(iris_x, iris_y), iris_x),
        "stacking": (StackingClassifier([("nb", GaussianNB()), ("tree", DecisionTreeClassifier(random_state=0))])
                     .fit(iris_x, iris_y), iris_x),
        "sgd_generator": (generator_sgd, iris_x),
    }


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # convergence warnings of the tiny fits
        return _models()


MODEL_NAMES = [
    "scaled_logistic", "random_forest", "forest_regressor", "extra_trees", "hist_gradient_boosting",
    "hist_gradient_regressor", "gradient_boosting", "gradient_boosting_random_state", "knn_kd_tree",
    "knn_ball_tree", "knn_sparse", "svc", "tfidf_text", "count_text", "onehot_objects", "voting", "stacking",
    "sgd_generator"]
WRITERS = {
    "pickle": (".pkl", lambda estimator, path: path.write_bytes(pickle.dumps(estimator, protocol=5))),
    "pickle-protocol-2": (".pkl", lambda estimator, path: path.write_bytes(pickle.dumps(estimator, protocol=2))),
    "joblib": (".joblib", lambda estimator, path: joblib.dump(estimator, path)),
    "joblib-zlib": (".joblib", lambda estimator, path: joblib.dump(estimator, path, compress=3)),
    "joblib-lzma": (".joblib", lambda estimator, path: joblib.dump(estimator, path, compress=("lzma", 1))),
}


def outputs(estimator, inputs):
    """Every prediction method's output, as bytes (bit for bit)."""
    results = {}
    for method in service.PREDICT_METHODS:
        if callable(getattr(estimator, method, None)):
            try:
                results[method] = np.asarray(getattr(estimator, method)(inputs)).tobytes()
            except Exception as error:   # e.g. hard voting has no predict_proba: it must fail alike
                results[method] = type(error).__name__
    return results


def test_the_model_list_covers_every_fixture(models):
    assert sorted(models) == sorted(MODEL_NAMES)


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_real_models_load_under_safe_pickle_and_predict_identically(name, writer, models, tmp_path):
    estimator, inputs = models[name]
    extension, write = WRITERS[writer]
    path = tmp_path / f"model{extension}"
    write(estimator, path)
    loaded, digest, size, skew = load(path, safe_pickle=True)
    assert type(loaded) is type(estimator) and skew is None and size == path.stat().st_size
    assert outputs(loaded, inputs) == outputs(estimator, inputs)


def test_the_demo_store_loads_under_safe_pickle():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_store")
    registry = registry_for(root, safe_pickle=True)
    for name in registry.names():
        for version in registry.entry(name).served:
            assert registry.get(name, version).estimator is not None


###############################################################################
# Hostile pickles are refused before their payload runs
###############################################################################


def payloads(marker):
    """(id, pickle bytes, the refused global the message names); each would create `marker` if it ran."""
    run = f"open({str(marker)!r}, 'w').close()"
    return [
        ("os.system", call_pickle("os", "system", f"touch {marker}"), "os.system"),
        ("posix.system", call_pickle("posix", "system", f"touch {marker}"), "posix.system"),
        ("os.system stack global", call_pickle("os", "system", f"touch {marker}", stack_global=True), "os.system"),
        ("builtins.eval", call_pickle("builtins", "eval", run), "builtins.eval"),
        ("builtins.exec", call_pickle("builtins", "exec", run), "builtins.exec"),
        ("__builtin__.eval", call_pickle("__builtin__", "eval", run), "builtins.eval"),  # Python 2 name, mapped
        ("builtins.getattr", call_pickle("builtins", "getattr", "x", "upper"), "builtins.getattr"),
        ("subprocess.Popen", call_pickle("subprocess", "Popen", ["touch", str(marker)]), "subprocess.Popen"),
        ("numpy.testing.runstring", call_pickle("numpy.testing", "runstring", run, {}), "numpy.testing.runstring"),
        ("numpy.memmap", call_pickle("numpy", "memmap", str(marker), "uint8", "w+", 0, (4,)), "numpy.memmap"),
        ("re-exported check_output",
         call_pickle("sklearn.utils._testing", "check_output", ["touch", str(marker)]),
         "sklearn.utils._testing.check_output"),
        ("re-exported makedirs", call_pickle("sklearn.datasets._base", "makedirs", str(marker)),
         "sklearn.datasets._base.makedirs"),
        ("os.system through a module attribute",
         call_pickle("sklearn.utils._testing", "os.system", f"touch {marker}", stack_global=True),
         "sklearn.utils._testing.os.system"),
        ("functools.partial", call_pickle("functools", "partial", "x"), "functools.partial"),
        ("dunder walk", call_pickle("numpy.core.multiarray", "_reconstruct.__globals__", "x", stack_global=True),
         "numpy.core.multiarray._reconstruct.__globals__"),
        ("a __main__ module", call_pickle("numpy.f2py.__main__", "main"), "numpy.f2py.__main__.main"),
    ]


PAYLOAD_IDS = [case[0] for case in payloads("m")]


@pytest.mark.parametrize("case", PAYLOAD_IDS)
def test_hostile_globals_are_refused_without_running(case, tmp_path):
    marker = tmp_path / "marker"
    _, data, refused = next(p for p in payloads(marker) if p[0] == case)
    with pytest.raises(service.ArtifactError, match=f"^refused global '{refused}'") as error:
        restricted_load(data)
    assert not marker.exists()
    # eval, os.system, subprocess, a re-exported os.makedirs...: no --trust is ever offered for them
    assert str(error.value).endswith("no --trust can admit it"), str(error.value)


def test_the_payloads_do_run_without_safe_pickle(tmp_path):
    """The hostile pickles above are real: loaded plainly, they run (here, a harmless makedirs)."""
    marker = tmp_path / "marker"
    data = dict((p[0], p[1]) for p in payloads(marker))["re-exported makedirs"]
    pickle.loads(data)
    assert marker.is_dir()


def test_a_refusal_names_the_module_to_trust(tmp_path):
    with pytest.raises(service.ArtifactError) as error:
        restricted_load(call_pickle("house_models", "Doubler"))
    assert str(error.value) == ("refused global 'house_models.Doubler': --safe-pickle imports nothing from module "
                                "'house_models'; if you trust it, start the service with --trust house_models")


@pytest.mark.parametrize("module", ["builtins", "os", "os.path", "posix", "subprocess", "sys", "importlib.util",
                                    "pickle", "marshal", "ctypes", "socket", "io", "pathlib", "runpy", "code",
                                    "types", "operator", "numpy", "numpy.testing", "sklearn", "joblib", "logging"])
def test_trust_refuses_modules_that_can_never_be_made_safe(module):
    with pytest.raises(ValueError, match=f"--trust: '{re.escape(module)}' can never be trusted"):
        service.Config.load({"trust": f"house_models,{module}"}, environ={})
    with pytest.raises(service.ArtifactError, match="can never be trusted"):   # nor any other way in
        restricted_load(call_pickle("os", "system", "true"), trust=(module,))


def test_trust_still_takes_your_own_modules():
    assert service.Config.load({"trust": "house_models, acme.models"}, environ={}).trust == \
        ("house_models", "acme.models")


@pytest.mark.parametrize("extension", [".pkl", ".joblib"])
def test_a_hostile_artifact_fails_to_load_with_503_and_others_keep_serving(extension, tmp_path, make_client,
                                                                          iris_classifier):
    marker = tmp_path / "marker"
    root = tmp_path / "store"
    root.mkdir()
    (root / f"evil{extension}").write_bytes(call_pickle("os", "system", f"touch {marker}"))
    write_artifact(root / f"iris{extension}", iris_classifier, "joblib" if extension == ".joblib" else "pickle")
    client = make_client(root, safe_pickle=True)
    response = client.post_json("/models/evil/predict", {"instances": [[1, 2, 3, 4]]}, expect_errors=True)
    assert response.status_int == 503 and response.json["code"] == "model_unavailable"
    assert "refused global 'os.system'" in response.json["error"] and "no --trust can admit it" in response.json["error"]
    version = client.get("/models/evil/versions/1").json
    assert version["state"] == "FAILED" and "refused global 'os.system'" in version["last_error"]
    assert not marker.exists()
    good = client.post_json("/models/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert good.json["predictions"] == iris_classifier.predict([[5.1, 3.5, 1.4, 0.2]]).tolist()


class Payload:
    """Pickles as a call of `function(*args)`: what a hostile artifact holds."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("compress", [0, 3])
def test_a_hostile_object_in_a_compressed_or_plain_joblib_file_is_refused(compress, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.joblib"
    joblib.dump({"model": Payload(os.mkdir, str(marker))}, path, compress=compress)
    with pytest.raises(service.ArtifactError, match="refused global 'posix.mkdir'"):
        load(path, safe_pickle=True)
    assert not marker.exists()


def _object_array_artifact(path, marker, iris_classifier):
    """A fitted model whose classes_ is an object array holding a payload: joblib writes object arrays as
    a nested pickle, which joblib's read_array would read with its own unpickler."""
    model = pickle.loads(pickle.dumps(iris_classifier))
    model.classes_ = np.array([Payload(os.mkdir, str(marker)), 1, 2], dtype=object)
    joblib.dump(model, path)


def test_a_hostile_object_array_inside_a_joblib_file_is_refused(tmp_path, iris_classifier):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.joblib"
    _object_array_artifact(path, marker, iris_classifier)
    with pytest.raises(service.ArtifactError, match="refused global 'posix.mkdir'"):
        load(path, safe_pickle=True)
    assert not marker.exists()
    joblib.load(path)                                    # the payload is real: plainly loaded, it runs
    assert marker.is_dir()


def test_benign_object_arrays_in_joblib_files_load(tmp_path, iris_classifier):
    model = pickle.loads(pickle.dumps(iris_classifier))
    model.classes_ = np.array(["setosa", "versicolor", ("virginica", 3)], dtype=object)
    joblib.dump(model, tmp_path / "model.joblib")
    loaded = load(tmp_path / "model.joblib", safe_pickle=True)[0]
    assert loaded.classes_.dtype == object and loaded.classes_.tolist() == model.classes_.tolist()


def _class_poisoning(opcode):
    """A pickle that pushes scikit-learn's Interval class (or Bunch) and changes the class object itself."""
    interval = b"\x80\x02csklearn._loss.link\nInterval\n"
    bunch = b"\x80\x02csklearn.utils._bunch\nBunch\n"
    attribute = pickle.dumps("poisoned", protocol=2)[2:-1]
    return {"BUILD": interval + b"N}" + attribute + b"K\x05s\x86b.",          # (None, {"poisoned": 5})
            "SETITEM": bunch + attribute + b"K\x05s.",
            "SETITEMS": bunch + b"(" + attribute + b"K\x05u.",
            "APPEND": interval + b"K\x05a.",
            "APPENDS": interval + b"(K\x05e.",
            "ADDITEMS": interval + b"(K\x05\x90."}[opcode]


@pytest.mark.parametrize("opcode", ["BUILD", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS"])
def test_state_is_never_applied_to_a_class(opcode):
    from sklearn._loss.link import Interval

    with pytest.raises(service.ArtifactError, match=f"applies {opcode} to sklearn.*, which is not an instance"):
        restricted_load(_class_poisoning(opcode))
    assert not hasattr(Interval, "poisoned")


def test_a_plain_pickle_could_set_attributes_on_a_class():
    """Why BUILD is checked: without the check, a file changes a class every model shares."""
    from sklearn._loss.link import Interval

    try:
        pickle.loads(_class_poisoning("BUILD"))
        assert Interval.poisoned == 5
    finally:
        if "poisoned" in vars(Interval):
            delattr(Interval, "poisoned")


def test_the_copyreg_extension_registry_is_refused():
    with pytest.raises(service.ArtifactError, match="extension registry"):
        restricted_load(b"\x80\x02\x82\x01.")


def test_protocol_0_and_1_pickles_load(models):
    estimator, inputs = models["random_forest"]
    for protocol in (0, 1):
        loaded = restricted_load(pickle.dumps(estimator, protocol=protocol))
        assert outputs(loaded, inputs) == outputs(estimator, inputs)


###############################################################################
# --trust admits the operator's own modules
###############################################################################


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A module of the operator's own, `house_models`, with a small estimator class."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "house_models.py").write_text(textwrap.dedent("""
        import numpy as np
        from sklearn.base import BaseEstimator

        class Doubler(BaseEstimator):
            def fit(self, X, y=None):
                self.n_features_in_ = np.asarray(X).shape[1]
                return self

            def predict(self, X):
                return np.asarray(X).sum(axis=1) * 2
    """))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "house_models", raising=False)
    import house_models
    yield house_models
    monkeypatch.delitem(sys.modules, "house_models", raising=False)


def test_a_custom_class_is_refused_until_its_module_is_trusted(custom_module, tmp_path, make_client):
    root = tmp_path / "store"
    write_artifact(root / "house.pkl", custom_module.Doubler().fit([[1, 2]]), "pickle")
    refused = registry_for(root, safe_pickle=True)
    info = failed_load(refused, "house")
    assert "refused global 'house_models.Doubler'" in info["last_error"]
    assert "--trust house_models" in info["last_error"]
    client = make_client(root, safe_pickle=True, trust=("house_models",))
    assert client.post_json("/models/house/predict", {"instances": [[1, 2]]}).json["predictions"] == [6]


def test_trust_covers_submodules_but_not_what_a_trusted_module_re_exports(custom_module):
    data = pickle.dumps(custom_module.Doubler())
    assert type(restricted_load(data, trust=("house_models.sub", "house_models"))) is custom_module.Doubler
    custom_module.system = os.system                        # a trusted module that re-exports os.system
    with pytest.raises(service.ArtifactError, match="refused global 'house_models.system': posix.system .*no --trust can admit it"):
        restricted_load(call_pickle("house_models", "system", "true"), trust=("house_models",))


def test_an_untrusted_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "noisy_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(service.ArtifactError, match="refused global 'noisy_module.Thing'"):
        restricted_load(call_pickle("noisy_module", "Thing"))
    assert not marker.exists() and "noisy_module" not in sys.modules


###############################################################################
# Per-model settings: "safe_pickle" and "sha256"
###############################################################################


def test_a_model_can_ask_for_safe_pickle_in_its_settings(tmp_path, custom_module):
    root = tmp_path / "store"
    estimator = custom_module.Doubler().fit([[1, 2]])
    write_artifact(root / "careful" / "1" / "model.pkl", estimator, "pickle")
    write_artifact(root / "trusting" / "1" / "model.pkl", estimator, "pickle")
    (root / "careful" / service.SETTINGS_FILE).write_text('{"safe_pickle": true}')
    registry = registry_for(root)
    assert "refused global 'house_models.Doubler'" in failed_load(registry, "careful")["last_error"]
    assert registry.get("trusting").estimator.predict([[1, 2]]).tolist() == [6]


@pytest.mark.parametrize("document, fragment", [
    ({"safe_pickle": "yes"}, '"safe_pickle" must be true or false'),
    ({"sha256": ["ab"]}, '"sha256" must map versions'),
    ({"sha256": {"1": "xyz"}}, '"sha256" of version 1'),
    ({"sha256": {"0": "a" * 64}}, "is not a version"),
])
def test_bad_trust_settings_are_refused_with_a_reason(document, fragment):
    with pytest.raises(ValueError, match=fragment):
        service.ModelSettings.parse(document)


def test_settings_describe_their_trust_keys():
    settings = service.ModelSettings.parse({"safe_pickle": True, "sha256": {"2": "AB" * 32, "1": "cd" * 32}})
    described = settings.describe()
    assert described["safe_pickle"] is True
    assert described["sha256"] == {"1": "cd" * 32, "2": "ab" * 32}
    assert service.ModelSettings().describe()["safe_pickle"] is False


def sha256_of(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def versioned_store(tmp_path, iris_classifier):
    root = tmp_path / "store"
    write_artifact(root / "iris" / "1" / "model.joblib", iris_classifier, "joblib")
    write_artifact(root / "flat.pkl", iris_classifier, "pickle")
    return root


def test_a_matching_sha256_in_the_settings_loads(versioned_store):
    digest = sha256_of(versioned_store / "iris" / "1" / "model.joblib")
    (versioned_store / "iris" / service.SETTINGS_FILE).write_text(json.dumps({"sha256": {"1": digest.upper()}}))
    registry = registry_for(versioned_store)
    assert registry.get("iris").sha256 == digest


def test_a_mismatching_sha256_in_the_settings_is_refused(versioned_store, make_client):
    actual = sha256_of(versioned_store / "iris" / "1" / "model.joblib")
    (versioned_store / "iris" / service.SETTINGS_FILE).write_text(json.dumps({"sha256": {"1": "0" * 64}}))
    client = make_client(versioned_store)
    response = client.post_json("/models/iris/predict", {"instances": [[1, 2, 3, 4]]}, expect_errors=True)
    assert response.status_int == 503
    version = client.get("/models/iris/versions/1").json
    assert version["state"] == "FAILED"
    assert version["last_error"] == (f"iris/1/model.joblib does not match the sha256 listed in "
                                     f"iris/{service.SETTINGS_FILE}: expected {'0' * 64}, actual {actual}; not loaded")


def test_sha256sums_at_the_store_root_is_read_silently_and_checked(versioned_store, caplog):
    flat, versioned = versioned_store / "flat.pkl", versioned_store / "iris" / "1" / "model.joblib"
    (versioned_store / "SHA256SUMS").write_text(f"{sha256_of(flat)}  flat.pkl\n"
                                                f"{'1' * 64} *./iris/1/model.joblib\n")
    with caplog.at_level(logging.WARNING, logger="service"):
        registry = registry_for(versioned_store)
    assert "SHA256SUMS" not in caplog.text
    assert registry.store.sha256sums == {"flat.pkl": sha256_of(flat), "iris/1/model.joblib": "1" * 64}
    assert registry.names() == ["flat", "iris"]
    assert registry.get("flat").sha256 == sha256_of(flat)
    error = failed_load(registry, "iris")["last_error"]
    assert f"listed in SHA256SUMS: expected {'1' * 64}, actual {sha256_of(versioned)}" in error


def test_both_sources_must_match(versioned_store):
    path = versioned_store / "iris" / "1" / "model.joblib"
    (versioned_store / "iris" / service.SETTINGS_FILE).write_text(json.dumps({"sha256": {"1": sha256_of(path)}}))
    (versioned_store / "SHA256SUMS").write_text(f"{sha256_of(path)}  iris/1/model.joblib\n")
    assert registry_for(versioned_store).get("iris").sha256 == sha256_of(path)
    (versioned_store / "SHA256SUMS").write_text(f"{'2' * 64}  iris/1/model.joblib\n")
    assert "listed in SHA256SUMS" in failed_load(registry_for(versioned_store), "iris")["last_error"]


def test_a_malformed_sha256sums_line_is_ignored_with_a_warning(versioned_store, caplog):
    flat = versioned_store / "flat.pkl"
    (versioned_store / "SHA256SUMS").write_text(f"not a digest  flat.pkl\n\n{'3' * 64}  flat.pkl\n"
                                                f"{'4' * 63}  iris/1/model.joblib\n")
    with caplog.at_level(logging.WARNING, logger="service"):
        registry = registry_for(versioned_store)
    assert "ignoring SHA256SUMS line 1" in caplog.text and "ignoring SHA256SUMS line 4" in caplog.text
    assert "line 2" not in caplog.text                       # blank lines are fine
    assert registry.store.sha256sums == {"flat.pkl": "3" * 64}
    assert f"actual {sha256_of(flat)}" in failed_load(registry, "flat")["last_error"]
    assert registry.get("iris").estimator is not None        # nothing (valid) listed for it: as before


def test_a_digest_is_checked_before_anything_is_deserialised(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(call_pickle("posix", "mkdir", str(marker)))
    with pytest.raises(service.ArtifactError, match="does not match"):
        load(path, sha256=(("5" * 64, "SHA256SUMS"),))          # no safe_pickle: only the digest protects
    assert not marker.exists()


###############################################################################
# Version skew
###############################################################################


def test_a_pickle_from_another_scikit_learn_shows_its_skew_and_no_warning_escapes(tmp_path, iris_classifier):
    data, old = skewed(pickle.dumps(iris_classifier))
    (tmp_path / "old.pkl").write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = registry_for(tmp_path)
        model = registry.get("old")
    assert not [w for w in caught if issubclass(w.category, InconsistentVersionWarning)]
    skew = f"trained with scikit-learn {old}, running {sklearn.__version__}"
    assert model.version_skew == skew and status(registry, "old")["sklearn_version_skew"] == skew
    assert model.estimator.predict([[5.1, 3.5, 1.4, 0.2]]).tolist() == [0]


@pytest.mark.parametrize("safe", [False, True])
def test_a_joblib_file_from_another_scikit_learn_shows_its_skew(safe, tmp_path, models):
    estimator, _ = models["hist_gradient_boosting"]
    joblib.dump(estimator, tmp_path / "model.joblib")
    data, old = skewed((tmp_path / "model.joblib").read_bytes())
    (tmp_path / "model.joblib").write_bytes(data)
    skew = load(tmp_path / "model.joblib", safe_pickle=safe)[3]
    assert skew == f"trained with scikit-learn {old}, running {sklearn.__version__}"


def test_a_json_model_from_another_scikit_learn_shows_its_skew(tmp_path, iris_classifier):
    text = service.dump_json_model(iris_classifier)
    document = json.loads(text)
    document["sklearn_version"] = "0.0.1"
    (tmp_path / "old.json").write_text(json.dumps(document))
    assert load(tmp_path / "old.json")[3] == f"trained with scikit-learn 0.0.1, running {sklearn.__version__}"
    (tmp_path / "new.json").write_text(text)
    assert load(tmp_path / "new.json")[3] is None


def test_strict_versions_refuses_a_skewed_artifact(tmp_path, make_client, iris_classifier):
    data, old = skewed(pickle.dumps(iris_classifier))
    (tmp_path / "old.pkl").write_bytes(data)
    write_artifact(tmp_path / "current.pkl", iris_classifier, "pickle")
    client = make_client(tmp_path, strict_versions=True)
    response = client.post_json("/models/old/predict", {"instances": [[1, 2, 3, 4]]}, expect_errors=True)
    assert response.status_int == 503
    version = client.get("/models/old/versions/1").json
    assert version["state"] == "FAILED" and version["sklearn_version_skew"] is None
    assert version["last_error"] == (f"old.pkl: trained with scikit-learn {old}, running {sklearn.__version__}; "
                                     "refused (--strict-versions)")
    assert client.post_json("/models/current/predict", {"instances": [[1, 2, 3, 4]]}).status_int == 200
    assert client.get("/models/current/versions/1").json["sklearn_version_skew"] is None


def test_other_warnings_raised_while_loading_are_issued_again():
    def loader(data, options):
        warnings.warn("something else", RuntimeWarning)
        warnings.warn(InconsistentVersionWarning(estimator_name="X", current_sklearn_version=sklearn.__version__,
                                                 original_sklearn_version="0.1"))
        return data

    with pytest.warns(RuntimeWarning, match="something else") as caught:
        estimator, written = service._deserialise(loader, "model", service.LoadOptions())
    assert (estimator, written) == ("model", {"0.1"})
    assert not [w for w in caught if issubclass(w.category, InconsistentVersionWarning)]


###############################################################################
# Settings: --safe-pickle, --trust, --strict-versions
###############################################################################


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                         ("0", False), ("false", False), ("No", False), ("off", False)])
def test_boolean_settings_accept_the_usual_words(text, value):
    environ = {"MODEL_SERVICE_SAFE_PICKLE": text, "MODEL_SERVICE_STRICT_VERSIONS": text}
    config = service.Config.load({}, environ=environ)
    assert config.safe_pickle is value and config.strict_versions is value


def test_the_bare_flags_mean_yes_and_trust_takes_a_list(tmp_path):
    flags = vars(service.build_parser().parse_args(["--safe-pickle", "--strict-versions", "--trust",
                                                    "house_models, other.sub"]))
    config = service.Config.load(flags, environ={"MODEL_SERVICE_SAFE_PICKLE": "no"})
    assert config.safe_pickle is True and config.strict_versions is True
    assert config.trust == ("house_models", "other.sub")
    assert service.Config.load({}, environ={"MODEL_SERVICE_TRUST": "a.b"}).trust == ("a.b",)
    assert service.Config().safe_pickle is False and service.Config().trust == ()


@pytest.mark.parametrize("flags, fragment", [
    ({"safe_pickle": "maybe"}, "--safe-pickle: must be one of"),
    ({"strict_versions": "2"}, "--strict-versions: must be one of"),
    ({"trust": "os;rm"}, "--trust: 'os;rm' is not a Python module name"),
    ({"trust": " , "}, "--trust: name the modules to trust"),
])
def test_bad_trust_flags_name_the_flag(flags, fragment):
    with pytest.raises(ValueError, match=fragment):
        service.Config.load(flags, environ={})


def test_without_the_options_pickle_and_joblib_load_as_before(tmp_path, custom_module, monkeypatch):
    """The defaults use the standard unpicklers: any importable class loads, as before."""
    calls = []
    monkeypatch.setattr(service, "_RestrictedUnpickler", lambda *args: calls.append(args))
    monkeypatch.setattr(service, "_load_joblib_restricted", lambda *args: calls.append(args))
    estimator = custom_module.Doubler().fit([[1, 2]])
    for fmt, name in (("pickle", "house.pkl"), ("joblib", "house.joblib")):
        write_artifact(tmp_path / name, estimator, fmt)
        assert load(tmp_path / name)[0].predict([[1, 2]]).tolist() == [6]
    assert calls == []


def test_numpy_1_names_of_numpy_helpers_load_without_a_deprecation_warning(models):
    """numpy 1 wrote numpy.core.multiarray._reconstruct; numpy 2 reads it as numpy._core (the old name warns)."""
    estimator, inputs = models["scaled_logistic"]
    data = pickle.dumps(estimator, protocol=2)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in data
    old_names = data.replace(b"cnumpy._core.", b"cnumpy.core.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = restricted_load(old_names)
    assert outputs(loaded, inputs) == outputs(estimator, inputs)


def test_a_joblib_file_of_joblib_before_0_10_is_refused(tmp_path):
    (tmp_path / "old.joblib").write_bytes(b"ZF0x5a\x00" + b"\x00" * 32)
    with pytest.raises(service.ArtifactError, match="joblib < 0.10"):
        load(tmp_path / "old.joblib", safe_pickle=True)


def test_concurrent_loads_each_see_only_their_own_skew(tmp_path, iris_classifier):
    import concurrent.futures

    data, old = skewed(pickle.dumps(iris_classifier))
    for index in range(4):
        (tmp_path / f"old{index}.pkl").write_bytes(data)
        write_artifact(tmp_path / f"new{index}.pkl", iris_classifier, "pickle")
    names = [f"{kind}{index}.pkl" for index in range(4) for kind in ("old", "new")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        skews = dict(zip(names, pool.map(lambda name: load(tmp_path / name)[3], names)))
    assert {name: skew is not None for name, skew in skews.items()} == {name: name.startswith("old")
                                                                       for name in names}


def test_a_corrected_sha256_in_the_settings_applies_at_the_next_load(versioned_store):
    settings = versioned_store / "iris" / service.SETTINGS_FILE
    settings.write_text(json.dumps({"sha256": {"1": "0" * 64}}))
    registry = registry_for(versioned_store, load_retry_seconds=0)
    failed_load(registry, "iris")
    settings.write_text(json.dumps({"sha256": {"1": sha256_of(versioned_store / "iris" / "1" / "model.joblib")}}))
    os.utime(settings, ns=(settings.stat().st_atime_ns, settings.stat().st_mtime_ns + 10**9))
    registry.rescan()
    assert registry.get("iris").estimator is not None
    assert registry.describe("iris")["versions"][0]["state"] == "AVAILABLE"


###############################################################################
# No model can read files
###############################################################################


def file_reading_vectorizer(vectorizer_class, mode, fitted_dir):
    """A real text pipeline fitted on content, then switched to read its inputs as files (as a forger would)."""
    documents = []
    for i, text in enumerate(["a good film", "a bad film", "good acting", "bad plot"]):
        path = fitted_dir / f"doc{i}.txt"
        path.write_text(text)
        documents.append(str(path))
    pipeline = make_pipeline(vectorizer_class(input="filename"), MultinomialNB()).fit(documents, [1, 0, 1, 0])
    pipeline.steps[0][1].set_params(input=mode)
    return pipeline


@pytest.mark.parametrize("vectorizer_class", [CountVectorizer, TfidfVectorizer])
@pytest.mark.parametrize("mode", ["filename", "file"])
@pytest.mark.parametrize("writer, options", [("json", {}), ("pickle", {}), ("joblib", {}),
                                             ("pickle", {"safe_pickle": True}), ("joblib", {"safe_pickle": True})])
def test_a_model_that_would_read_files_is_refused_in_every_format(vectorizer_class, mode, writer, options,
                                                                   tmp_path):
    pipeline = file_reading_vectorizer(vectorizer_class, mode, tmp_path)
    path = write_artifact(tmp_path / f"model{EXTENSIONS[writer]}", pipeline, writer)
    with pytest.raises(service.ArtifactError, match=f"input='{mode}', which reads the files"):
        load(path, **options)


def test_a_file_reading_model_answers_no_request_and_says_why(tmp_path, make_client):
    root = tmp_path / "store"
    write_artifact(root / "reviews.json", file_reading_vectorizer(CountVectorizer, "filename", tmp_path), "json")
    client = make_client(root)
    response = client.post_json("/models/reviews/predict", {"instances": ["/etc/passwd"]}, expect_errors=True)
    assert response.status_int == 503 and "input='filename'" in response.json["error"]
    assert "root" not in response.text


def test_a_hashing_vectorizer_is_judged_by_the_same_rule(tmp_path):
    from sklearn.feature_extraction.text import HashingVectorizer

    pipeline = make_pipeline(HashingVectorizer(input="file", alternate_sign=False), MultinomialNB())
    pipeline.fit([io.StringIO("a good film"), io.StringIO("a bad film")], [1, 0])
    path = tmp_path / "model.joblib"
    joblib.dump(pipeline, path)
    with pytest.raises(service.ArtifactError, match="HashingVectorizer has input='file'"):
        load(path)
