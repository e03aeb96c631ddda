"""`.skops` artifacts (Artifact loaders): served like any other format, natively where the family allows, exported
to JSON, and loaded by skops trusting only what skops trusts by default, what --safe-pickle's allow-list admits and
the --trust modules; anything else refuses the version's load, naming the type."""

import os
import subprocess
import sys

import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import service
from support import ROOT, ROWS, assert_error, strict_json


class Threshold(ClassifierMixin, BaseEstimator):
    """A model of the user's own class: skops trusts no such type unless told."""

    def fit(self, X, y):
        self.classes_, self.n_features_in_ = np.unique(y), np.asarray(X).shape[1]
        return self

    def predict(self, X):
        return self.classes_[(np.asarray(X)[:, 2] > 2.5).astype(int)]


def write_skops(path, estimator):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    skops.io.dump(estimator, path)
    return path


@pytest.fixture(scope="module")
def forest(iris):
    return RandomForestClassifier(n_estimators=5, random_state=0).fit(*iris)


def test_a_skops_forest_and_pipeline_answer_bit_for_bit_and_natively(tmp_path, iris, forest, make_client):
    pipeline = make_pipeline(StandardScaler(), forest.__class__(n_estimators=3, random_state=1)).fit(*iris)
    write_skops(tmp_path / "forest.skops", forest)                          # flat: version 1
    write_skops(tmp_path / "piped" / "1" / "model.skops", pipeline)         # versioned
    client = make_client(tmp_path)
    for name, estimator in (("forest", forest), ("piped", pipeline)):
        answer = strict_json(client.post_json(f"/models/{name}/predict",
                                              {"instances": ROWS, "method": "predict_proba"}))
        assert answer["predictions"] == estimator.predict_proba(np.array(ROWS)).tolist()
        status = strict_json(client.get(f"/models/{name}/versions/1"))
        assert status["state"] == "AVAILABLE"
        assert status["predictors"]["predict_proba"]["predictor"] == service.NATIVE, status["predictors"]


def test_a_type_skops_does_not_trust_refuses_the_load_naming_it_and_trust_admits_it(tmp_path, iris, make_client):
    write_skops(tmp_path / "mine.skops", Threshold().fit(*iris))
    refused = make_client(tmp_path)
    assert_error(refused.post_json("/models/mine/predict", {"instances": ROWS}, expect_errors=True), 503)
    status = strict_json(refused.get("/models/mine/versions/1"))
    assert status["state"] == "FAILED"
    assert f"'{__name__}.Threshold'" in status["last_error"] and f"--trust {__name__}" in status["last_error"], status

    trusted = make_client(tmp_path, trust=(__name__,))
    answer = strict_json(trusted.post_json("/models/mine/predict", {"instances": ROWS}))
    assert answer["predictions"] == Threshold().fit(*iris).predict(np.array(ROWS)).tolist()


def test_a_type_no_trust_can_admit_is_refused_before_anything_is_imported(tmp_path, iris):
    """A file naming os.system (or any module outside the allow-list) is refused without importing the module."""
    estimator = Threshold().fit(*iris)
    estimator.opener = os.system
    path = write_skops(tmp_path / "hostile.skops", estimator)
    ref = service.ModelStore(tmp_path).scan()["hostile"][1]
    with pytest.raises(service.ArtifactError, match="no --trust can admit it"):
        service.load_artifact(ref, service.LoadOptions(trust=(__name__,)))
    assert os.path.exists(path)


def test_export_turns_a_skops_artifact_into_a_json_model(tmp_path, iris, forest):
    source = write_skops(tmp_path / "forest.skops", forest)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "export", source,
                           str(tmp_path / "forest.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    copy = service.load_json_model(str(tmp_path / "forest.json"))
    assert (copy.predict_proba(iris[0]) == forest.predict_proba(iris[0])).all()


def test_without_skops_installed_the_version_fails_saying_how_to_install_it(tmp_path, forest):
    write_skops(tmp_path / "forest.skops", forest)
    code = ("import sys; sys.modules['skops'] = None; import service\n"       # as if skops were not installed
            f"ref = service.ModelStore({str(tmp_path)!r}).scan()['forest'][1]\n"
            "try:\n    service.load_artifact(ref)\nexcept service.ArtifactError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "pip install '.[skops]'" in done.stdout, done.stdout + done.stderr


def test_export_writes_a_skops_file_that_the_store_serves_identically(tmp_path, iris, forest, make_client):
    source = tmp_path / "forest.joblib"
    import joblib
    joblib.dump(forest, source)
    os.makedirs(tmp_path / "store")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "export", str(source),
                           str(tmp_path / "store" / "forest.skops")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "identical to the original" in done.stdout and "forest.skops" in done.stdout
    answer = strict_json(make_client(tmp_path / "store").post_json("/models/forest/predict",
                                                                 {"instances": ROWS, "method": "predict_proba"}))
    assert answer["predictions"] == forest.predict_proba(np.array(ROWS)).tolist()


def test_export_to_skops_refuses_a_type_the_store_would_not_load_unless_trusted(tmp_path, iris):
    estimator = Threshold().fit(*iris)
    with pytest.raises(service.ArtifactError, match="--trust test_skops_artifacts"):
        service.export_skops_model(estimator, tmp_path / "mine.skops")
    assert not (tmp_path / "mine.skops").exists()
    report = service.export_skops_model(estimator, tmp_path / "mine.skops", trust=(__name__,))
    assert report["methods"] == ["predict"] and (tmp_path / "mine.skops").exists()


def test_export_to_another_extension_is_refused_with_one_line(tmp_path, forest):
    source = write_skops(tmp_path / "forest.skops", forest)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "export", source,
                           str(tmp_path / "forest.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "write .json or .skops" in done.stderr and done.stderr.count("\n") == 1
