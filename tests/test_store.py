"""Store discovery: layouts, extensions, numeric versions, what is skipped (with a warning), symlinks,
a missing store, and model names in URLs that must never reach outside the store."""

import json
import logging
import os
import pickle

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

import service
from support import DIABETES_ROWS, ROWS as IRIS_ROWS, strict_json, write_artifact


# -- helpers ---------------------------------------------------------------------------------------------

def summary(catalogue):
    """{name: [versions]} of a scan, for compact comparisons."""
    return {name: sorted(versions) for name, versions in catalogue.items()}


def scan(root):
    return service.ModelStore(root).scan()


def warnings_logged(caplog):
    return [record.getMessage() for record in caplog.records
            if record.name == "service" and record.levelno == logging.WARNING]


def assert_warned(caplog, *fragments):
    messages = warnings_logged(caplog)
    for fragment in fragments:
        assert any(fragment in message for message in messages), (fragment, messages)


def predict(client, url, rows, status=200):
    response = client.post_json(url, {"instances": rows}, expect_errors=True)
    assert response.status_int == status, response.text
    return strict_json(response)


def link(path, target):
    """Create a symlink at `path` pointing to `target` (a str, kept as given: relative stays relative)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


@pytest.fixture(scope="module")
def ridges():
    """Ridge regressors on diabetes with different alphas, so each version predicts differently."""
    data = load_diabetes()
    return {alpha: Ridge(alpha=alpha).fit(data.data, data.target) for alpha in (0.01, 0.1, 1.0, 10.0)}


@pytest.fixture
def caplog_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="service")
    return caplog


# -- layouts and extensions ------------------------------------------------------------------------------

def test_flat_artifact_is_version_1_with_its_file_identity(tmp_path, iris_classifier):
    root = tmp_path / "store"
    path = write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    catalogue = scan(root)
    assert summary(catalogue) == {"iris": [1]}
    ref = catalogue["iris"][1]
    stat = os.stat(path)
    assert isinstance(ref, service.ArtifactRef)
    assert (ref.name, ref.version, ref.format, ref.extension) == ("iris", 1, "joblib", ".joblib")
    assert ref.file == "iris.joblib"
    assert ref.path == os.path.realpath(path)
    assert (ref.size, ref.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_versioned_layout_finds_every_version(tmp_path, ridges):
    root = tmp_path / "store"
    write_artifact(root / "diabetes" / "1" / "model.pkl", ridges[0.1], "pickle")
    write_artifact(root / "diabetes" / "2" / "weights.json", ridges[1.0], "json")
    catalogue = scan(root)
    assert summary(catalogue) == {"diabetes": [1, 2]}
    first, second = catalogue["diabetes"][1], catalogue["diabetes"][2]
    assert (first.name, first.version, first.format, first.file) == ("diabetes", 1, "pickle", "diabetes/1/model.pkl")
    assert (second.name, second.version, second.format, second.file) == ("diabetes", 2, "json",
                                                                          "diabetes/2/weights.json")
    assert second.size == os.path.getsize(root / "diabetes" / "2" / "weights.json")
    assert second.mtime_ns == os.stat(root / "diabetes" / "2" / "weights.json").st_mtime_ns


def test_flat_and_versioned_models_side_by_side(tmp_path, make_client, iris_classifier, ridges):
    root = tmp_path / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / "diabetes" / "1" / "model.joblib", ridges[0.1], "joblib")
    write_artifact(root / "diabetes" / "2" / "model.joblib", ridges[1.0], "joblib")
    assert summary(scan(root)) == {"iris": [1], "diabetes": [1, 2]}
    client = make_client(root)
    assert predict(client, "/models/iris/predict", IRIS_ROWS)["predictions"] == \
        iris_classifier.predict(np.array(IRIS_ROWS)).tolist()
    body = predict(client, "/models/diabetes/predict", DIABETES_ROWS)
    assert body["version"] == "2"
    assert body["predictions"] == ridges[1.0].predict(np.array(DIABETES_ROWS)).tolist()


def _joblib_compressed(path, estimator):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    joblib.dump(estimator, path, compress=3)


def _pickle(path, estimator):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(estimator, handle, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.mark.parametrize("filename, write, artifact_format", [
    pytest.param("iris.joblib", lambda p, e: joblib.dump(e, p), "joblib", id="joblib"),
    pytest.param("iris.joblib", _joblib_compressed, "joblib", id="joblib-compressed"),
    pytest.param("iris.pkl", _pickle, "pickle", id="pkl"),
    pytest.param("iris.pickle", _pickle, "pickle", id="pickle"),
    pytest.param("iris.json", lambda p, e: service.save_json_model(e, p), "json", id="json"),
])
@pytest.mark.parametrize("layout", ["flat", "versioned"])
def test_every_extension_is_discovered_and_served(tmp_path, make_client, iris_classifier, filename, write,
                                                  artifact_format, layout):
    root = tmp_path / "store"
    path = root / filename if layout == "flat" else root / "iris" / "3" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    write(str(path), iris_classifier)
    if write is _joblib_compressed:
        assert path.read_bytes()[:1] == b"\x78"          # zlib stream: really compressed
    version = 1 if layout == "flat" else 3
    catalogue = scan(root)
    assert summary(catalogue) == {"iris": [version]}
    assert catalogue["iris"][version].format == artifact_format
    body = predict(make_client(root), "/models/iris/predict?method=predict_proba", IRIS_ROWS)
    assert body["version"] == str(version)
    assert body["predictions"] == iris_classifier.predict_proba(np.array(IRIS_ROWS)).tolist()


# -- versions --------------------------------------------------------------------------------------------

def test_versions_compare_as_numbers_not_text(tmp_path, ridges):
    root = tmp_path / "store"
    for version, alpha in ((2, 0.01), (9, 0.1), (10, 1.0)):
        write_artifact(root / "diabetes" / str(version) / "model.joblib", ridges[alpha], "joblib")
    catalogue = scan(root)
    assert sorted(catalogue["diabetes"]) == [2, 9, 10]
    assert all(type(version) is int for version in catalogue["diabetes"])
    assert max(catalogue["diabetes"]) == 10


def test_highest_version_is_served_and_a_named_version_on_request(tmp_path, make_client, ridges):
    root = tmp_path / "store"
    by_version = {2: ridges[0.01], 9: ridges[0.1], 10: ridges[1.0]}
    for version, model in by_version.items():
        write_artifact(root / "diabetes" / str(version) / "model.joblib", model, "joblib")
    (root / "diabetes" / "model-settings.json").write_text('{"version_policy": "all"}')
    client = make_client(root)
    expected = {version: model.predict(np.array(DIABETES_ROWS)).tolist() for version, model in by_version.items()}
    assert len({tuple(values) for values in expected.values()}) == 3     # versions are distinguishable

    latest = predict(client, "/models/diabetes/predict", DIABETES_ROWS)
    assert latest["version"] == "10" and latest["predictions"] == expected[10]
    for version in (2, 9, 10):
        body = predict(client, f"/models/diabetes/versions/{version}/predict", DIABETES_ROWS)
        assert body["version"] == str(version) and body["predictions"] == expected[version]
    assert strict_json(client.get("/models/diabetes"))["latest_version"] == "10"
    predict(client, "/models/diabetes/versions/3/predict", DIABETES_ROWS, status=404)
    predict(client, "/models/diabetes/versions/010/predict", DIABETES_ROWS, status=400)


# -- skipped entries: a warning each, and the rest of the store still discovered ---------------------------

def _write(relative, artifact_format="joblib"):
    """A builder writing a real iris artifact at a path relative to the store."""
    return lambda root, model: write_artifact(root / relative, model, artifact_format)


def _text(relative, content="not a model\n"):
    def build(root, model):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    return build


def _mkdir(relative):
    return lambda root, model: (root / relative).mkdir(parents=True)


def _all(*builders):
    def build(root, model):
        for builder in builders:
            builder(root, model)
    return build


QUIET = [     # hidden and temporary files and folders: how artifacts are published, so noted, not warned
    pytest.param(_write(".x.joblib"), {}, [".x.joblib: hidden or temporary"], id="hidden-file"),
    pytest.param(_text(".DS_Store"), {}, [".DS_Store: hidden or temporary"], id="DS_Store"),
    pytest.param(_write(".cache/1/model.joblib"), {}, [".cache: hidden or temporary"], id="hidden-folder"),
    pytest.param(_write("x.joblib.tmp"), {}, ["x.joblib.tmp: hidden or temporary"], id="tmp-suffix"),
    pytest.param(_write("x.joblib~"), {}, ["x.joblib~: hidden or temporary"], id="tilde-suffix"),
    pytest.param(_write("x.part"), {}, ["x.part: hidden or temporary"], id="part-suffix"),
    pytest.param(_write("x.json.crdownload", "json"), {}, ["x.json.crdownload: hidden or temporary"],
                 id="crdownload-suffix"),
    pytest.param(_write("~x.joblib"), {}, ["~x.joblib: hidden or temporary"], id="tilde-prefix"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/1/.model.joblib"), _write("m/1/model.pkl.swp", "pickle")),
                 {"m": [1]}, ["m/1/.model.joblib: hidden", "m/1/model.pkl.swp: hidden"], id="hidden-in-version"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/2/model.joblib.part")), {"m": [1]},
                 ["m/2/model.joblib.part: hidden or temporary", "m/2: no artifact in it yet"],
                 id="only-a-temporary-file-in-a-version"),
]


@pytest.mark.parametrize("build, served, fragments", QUIET)
def test_hidden_and_temporary_entries_are_skipped_with_a_note_not_a_warning(tmp_path, caplog, iris_classifier,
                                                                            diabetes_regressor, build, served,
                                                                            fragments):
    """Writing under a temporary name and renaming it into place is how a version is published (README)."""
    caplog.set_level(logging.INFO, logger="service")
    root = tmp_path / "store"
    write_artifact(root / "reference.joblib", diabetes_regressor, "joblib")
    build(root, iris_classifier)
    assert summary(scan(root)) == {"reference": [1], **served}
    assert warnings_logged(caplog) == []
    notes = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    for fragment in fragments:
        assert any(fragment in note for note in notes), (fragment, notes)


SKIPPED = [
    # unknown extensions
    pytest.param(_write("model.h5"), {}, ["model.h5: unknown extension"], id="h5"),
    pytest.param(_text("README.md"), {}, ["README.md: unknown extension"], id="readme"),
    pytest.param(_write("model"), {}, ["model: unknown extension"], id="no-extension"),
    pytest.param(_write("model.JOBLIB"), {}, ["model.JOBLIB: unknown extension"], id="upper-case-extension"),
    pytest.param(_all(_write("m/1/model.joblib"), _text("m/1/NOTES.txt")), {"m": [1]},
                 ["m/1/NOTES.txt: unknown extension"], id="unknown-extension-beside-an-artifact"),
    # version folders
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/latest/model.joblib")), {"m": [1]},
                 ["m/latest: versions are folders named by a positive integer"], id="version-latest"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/0/model.joblib")), {"m": [1]},
                 ["m/0: versions are folders named by a positive integer"], id="version-zero"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/01/model.joblib")), {"m": [1]},
                 ["m/01: versions are folders named by a positive integer"], id="version-leading-zero"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/-2/model.joblib"), _write("m/2.0/model.joblib"),
                      _write("m/v3/model.joblib"), _write("m/" + "9" * 19 + "/model.joblib")), {"m": [1]},
                 ["m/-2: versions", "m/2.0: versions", "m/v3: versions", "m/" + "9" * 19 + ": versions"],
                 id="version-other-non-integers"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/model.joblib")), {"m": [1]},
                 ["m/model.joblib: versions are folders named by a positive integer"], id="file-beside-versions"),
    pytest.param(_write("m/latest/model.joblib"), {}, ["m/latest: versions"], id="no-valid-version-at-all"),
    pytest.param(_all(_write("m/1/model.joblib"), _write("m/2/a.joblib"), _write("m/2/b.pkl", "pickle")),
                 {"m": [1]}, ["m/2: it holds 2 artifacts, a version holds exactly one"], id="two-artifacts-in-a-version"),
    pytest.param(_all(_write("m/1/model.joblib"), _mkdir("m/2")), {"m": [1]}, ["m/2: no artifact in it"],
                 id="empty-version-folder"),
    pytest.param(_all(_write("m/1/model.joblib"), _mkdir("m/2/model.joblib")), {"m": [1]},
                 ["m/2/model.joblib: not a regular file", "m/2: no artifact in it"], id="folder-named-like-an-artifact"),
    # invalid model names
    pytest.param(_write("-bad.joblib"), {}, ["'-bad' is not a valid model name"], id="leading-dash"),
    pytest.param(_write("_bad.joblib"), {}, ["'_bad' is not a valid model name"], id="leading-underscore"),
    pytest.param(_write("my model.joblib"), {}, ["'my model' is not a valid model name"], id="space"),
    pytest.param(_write("mödel.joblib"), {}, ["'mödel' is not a valid model name"], id="non-ascii"),
    pytest.param(_write("model..joblib"), {}, ["'model.' is not a valid model name"], id="trailing-dot"),
    pytest.param(_write("a" * 65 + ".joblib"), {}, ["is not a valid model name"], id="65-characters"),
    pytest.param(_write("-bad/1/model.joblib"), {}, ["'-bad' is not a valid model name"], id="invalid-folder-name"),
    pytest.param(_write("bad name/1/model.joblib"), {}, ["'bad name' is not a valid model name"],
                 id="folder-name-with-space"),
    # two artifacts for one name: neither is served
    pytest.param(_all(_write("iris.joblib"), _write("iris.pkl", "pickle")), {},
                 ["skipping model 'iris': more than one artifact or folder has that name"], id="joblib-and-pkl"),
    pytest.param(_all(_write("iris.json", "json"), _write("iris.pickle", "pickle"), _write("iris.pkl", "pickle")),
                 {}, ["skipping model 'iris': more than one"], id="three-flat-files"),
    pytest.param(_all(_write("iris.joblib"), _write("iris/1/model.joblib")), {},
                 ["skipping model 'iris': more than one artifact or folder has that name"], id="flat-and-folder"),
]


@pytest.mark.parametrize("build, served, fragments", SKIPPED)
def test_skipped_entries_warn_and_the_rest_is_still_discovered(tmp_path, caplog_warnings, iris_classifier,
                                                                diabetes_regressor, build, served, fragments):
    root = tmp_path / "store"
    write_artifact(root / "reference.joblib", diabetes_regressor, "joblib")
    write_artifact(root / "versioned" / "1" / "model.pkl", diabetes_regressor, "pickle")
    build(root, iris_classifier)
    assert summary(scan(root)) == {"reference": [1], "versioned": [1], **served}
    assert_warned(caplog_warnings, *fragments)


def test_a_clean_store_logs_no_warning(tmp_path, caplog_warnings, iris_classifier):
    root = tmp_path / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / "flowers" / "1" / "model.json", iris_classifier, "json")
    scan(root)
    assert warnings_logged(caplog_warnings) == []


@pytest.mark.parametrize("second", ["iris.pkl", "iris/1/model.pkl"])
def test_a_name_with_two_artifacts_is_not_served_over_http(tmp_path, make_client, iris_classifier, second):
    root = tmp_path / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / second, iris_classifier, "pickle")
    write_artifact(root / "other.joblib", iris_classifier, "joblib")
    client = make_client(root)
    body = predict(client, "/models/iris/predict", IRIS_ROWS, status=404)
    assert body["models"] == ["other"]
    predict(client, "/models/other/predict", IRIS_ROWS)


@pytest.mark.parametrize("name", ["model..1", "a.b-c_d", "v1.2", "UPPER_lower-09", "1", "a" * 64, "x.joblib"])
def test_valid_look_alike_names_are_served(tmp_path, make_client, iris_classifier, name):
    root = tmp_path / "store"
    folder = name[:62] + "-v"              # the same name, as a folder (at most 64 characters)
    write_artifact(root / f"{name}.joblib", iris_classifier, "joblib")
    write_artifact(root / folder / "1" / "model.json", iris_classifier, "json")
    assert summary(scan(root)) == {name: [1], folder: [1]}
    client = make_client(root)
    expected = iris_classifier.predict(np.array(IRIS_ROWS)).tolist()
    for served in (name, folder):
        body = predict(client, f"/models/{served}/predict", IRIS_ROWS)
        assert body["model"] == served and body["predictions"] == expected




def test_a_model_name_ending_in_a_newline_is_skipped(store_root, iris_classifier, caplog_warnings):
    write_artifact(store_root / "iris\n.joblib", iris_classifier, "joblib")
    assert summary(scan(store_root)) == {"reference": [1]}
    assert_warned(caplog_warnings, "is not a valid model name")


def test_a_version_folder_ending_in_a_newline_is_skipped_and_does_not_replace_version_1(
        store_root, iris_classifier, diabetes_regressor, caplog_warnings):
    write_artifact(store_root / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    write_artifact(store_root / "m" / "1\n" / "model.joblib", diabetes_regressor, "joblib")
    catalogue = scan(store_root)
    assert summary(catalogue) == {"reference": [1], "m": [1]}
    assert catalogue["m"][1].file == "m/1/model.joblib"
    assert_warned(caplog_warnings, "versions are folders named by a positive integer")


def test_a_trailing_newline_in_a_url_name_or_version_is_400(store_root, make_client, iris_classifier):
    write_artifact(store_root / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    client = make_client(store_root)
    for url in ("/models/m/versions/1%0A/predict", "/models/m%0A/predict", "/models/x%0A/predict"):
        response = client.post_json(url, {"instances": IRIS_ROWS}, expect_errors=True)
        assert response.status_int == 400, (url, response.status, response.text)
        assert "error" in strict_json(response)


# -- symlinks --------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path, iris_classifier):
    """A folder beside the store holding real artifacts: outside.joblib and models/1/model.joblib."""
    folder = tmp_path / "outside"
    write_artifact(folder / "outside.joblib", iris_classifier, "joblib")
    write_artifact(folder / "models" / "1" / "model.joblib", iris_classifier, "joblib")
    return folder


@pytest.fixture
def store_root(tmp_path, diabetes_regressor):
    root = tmp_path / "store"
    write_artifact(root / "reference.joblib", diabetes_regressor, "joblib")
    return root


@pytest.mark.parametrize("entry, target, fragments", [
    pytest.param("evil.joblib", "{outside}/outside.joblib", ["evil.joblib: it resolves outside the model store"],
                 id="flat-artifact-absolute"),
    pytest.param("evil.joblib", "../outside/outside.joblib", ["evil.joblib: it resolves outside"],
                 id="flat-artifact-relative"),
    pytest.param("evil/1/model.joblib", "{outside}/outside.joblib",
                 ["evil/1/model.joblib: it resolves outside", "evil/1: no artifact in it"],
                 id="artifact-in-a-version-folder"),
    pytest.param("evil", "{outside}/models", ["evil/1/model.joblib: it resolves outside"],
                 id="model-folder"),
    pytest.param("evil/1", "{outside}/models/1", ["evil/1/model.joblib: it resolves outside"],
                 id="version-folder"),
    pytest.param("evil.joblib", "{tmp}/store-evil/outside.joblib", ["evil.joblib: it resolves outside"],
                 id="sibling-sharing-the-store-name-as-prefix"),
])
def test_symlinks_pointing_outside_the_store_are_refused(tmp_path, store_root, outside, make_client,
                                                         caplog_warnings, iris_classifier, entry, target, fragments):
    write_artifact(tmp_path / "store-evil" / "outside.joblib", iris_classifier, "joblib")
    link(store_root / entry, target.format(outside=outside, tmp=tmp_path))
    assert summary(scan(store_root)) == {"reference": [1]}
    assert_warned(caplog_warnings, *fragments)
    body = predict(make_client(store_root), "/models/evil/predict", IRIS_ROWS, status=404)
    assert body["models"] == ["reference"]


def test_symlinks_staying_inside_the_store_are_served(tmp_path, make_client, iris_classifier, caplog_warnings):
    root = tmp_path / "store"
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / ".archive" / "flowers-3.pkl", iris_classifier, "pickle")
    link(root / "alias.joblib", "iris.joblib")
    link(root / "flowers" / "3" / "model.pkl", os.path.join(root, ".archive", "flowers-3.pkl"))
    link(root / "mirror", "flowers")
    link(root / "flowers" / "4", "3")
    (root / "flowers" / "model-settings.json").write_text('{"version_policy": {"latest": 2}}')
    catalogue = scan(root)
    assert summary(catalogue) == {"iris": [1], "alias": [1], "flowers": [3, 4], "mirror": [3, 4]}
    alias = catalogue["alias"][1]
    assert alias.file == "alias.joblib" and alias.path == os.path.realpath(root / "iris.joblib")
    assert catalogue["flowers"][3].path == os.path.realpath(root / ".archive" / "flowers-3.pkl")
    assert catalogue["flowers"][3].format == "pickle"
    assert not [m for m in warnings_logged(caplog_warnings) if "outside" in m]
    client = make_client(root)
    expected = iris_classifier.predict(np.array(IRIS_ROWS)).tolist()
    for url in ("/models/alias/predict", "/models/flowers/predict", "/models/mirror/versions/3/predict"):
        assert predict(client, url, IRIS_ROWS)["predictions"] == expected


def test_the_store_root_may_itself_be_a_symlink(tmp_path, make_client, iris_classifier):
    real = tmp_path / "releases" / "2024"
    write_artifact(real / "iris.joblib", iris_classifier, "joblib")
    write_artifact(real / "flowers" / "2" / "model.json", iris_classifier, "json")
    root = link(tmp_path / "current", "releases/2024")
    store = service.ModelStore(root)
    catalogue = store.scan()
    assert store.root == os.path.realpath(real)
    assert summary(catalogue) == {"iris": [1], "flowers": [2]}
    assert catalogue["iris"][1].file == "iris.joblib"
    client = make_client(root)
    expected = iris_classifier.predict(np.array(IRIS_ROWS)).tolist()
    assert predict(client, "/models/iris/predict", IRIS_ROWS)["predictions"] == expected
    assert predict(client, "/models/flowers/predict", IRIS_ROWS)["predictions"] == expected


def test_a_dangling_symlink_is_skipped_with_a_warning(store_root, caplog_warnings):
    link(store_root / "gone.joblib", "nowhere.joblib")
    link(store_root / "m" / "1" / "model.joblib", "../../nowhere.joblib")
    assert summary(scan(store_root)) == {"reference": [1]}
    assert_warned(caplog_warnings, "gone.joblib: No such file", "m/1/model.joblib: No such file")




@pytest.mark.parametrize("entry, target", [("loop.joblib", "loop.joblib"), ("loop", "loop"),
                                           ("m/2", "2")], ids=["flat-artifact", "model-folder", "version-folder"])
def test_a_symlink_loop_is_skipped_with_a_warning(store_root, iris_classifier, caplog_warnings, entry, target):
    write_artifact(store_root / "m" / "1" / "model.joblib", iris_classifier, "joblib")
    link(store_root / entry, target)
    assert summary(scan(store_root)) == {"reference": [1], "m": [1]}
    assert_warned(caplog_warnings, entry)


def test_a_symlink_loop_does_not_make_the_service_unready(store_root, make_client, diabetes_regressor):
    link(store_root / "loop.joblib", "loop.joblib")
    client = make_client(store_root)
    response = client.get("/readyz", expect_errors=True)
    assert response.status_int == 200, response.text
    body = predict(client, "/models/reference/predict", DIABETES_ROWS)
    assert body["predictions"] == diabetes_regressor.predict(np.array(DIABETES_ROWS)).tolist()


# -- a missing store -------------------------------------------------------------------------------------

def test_scanning_a_missing_store_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "a-file")


def test_a_missing_store_answers_503_json_never_500(tmp_path, make_client, iris_classifier):
    root = tmp_path / "missing"
    client = make_client(root)
    requests = [
        client.get("/readyz", expect_errors=True),
        client.get("/models", expect_errors=True),
        client.get("/models/x", expect_errors=True),
        client.post_json("/models/x/predict", {"instances": IRIS_ROWS}, expect_errors=True),
        client.post_json("/models/x/versions/1/predict", {"instances": IRIS_ROWS}, expect_errors=True),
        client.get("/models/x/predict", {"instances": json.dumps(IRIS_ROWS)}, expect_errors=True),
    ]
    for response in requests:
        assert response.status_int == 503, (response.request.path, response.text)
        body = strict_json(response)
        assert isinstance(body["error"], str) and body["error"]
        assert body["code"] == "model_unavailable"
    assert strict_json(requests[0])["ready"] is False
    assert strict_json(client.get("/healthz")) == {"status": "alive"}

    # the store appearing later is picked up by the next request
    write_artifact(root / "x.joblib", iris_classifier, "joblib")
    assert strict_json(client.get("/readyz"))["ready"] is True
    assert predict(client, "/models/x/predict", IRIS_ROWS)["model"] == "x"


# -- names in URLs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, status", [
    ("/models/..%2F/predict", 404),                 # decodes to /models/..//predict: no route matches
    ("/models/..%2Fsecret/predict", 404),
    ("/models/%2E%2E%2Fsecret/predict", 404),
    ("/models/%2e%2e/predict", 400),
    ("/models/%2E%2E/versions/1/predict", 400),
    ("/models/.%FF./predict", 400),                 # invalid UTF-8: never decoded into ".."
    ("/models/%C0%AE%C0%AE/predict", 400),          # overlong UTF-8 for ".."
    ("/models/%FF/predict", 400),
    ("/models/-x/predict", 400),
    ("/models/..%5Csecret/predict", 400),
    ("/models/secret%00/predict", 400),
    ("/models/%20secret/predict", 400),
    ("/models/.secret/predict", 400),
    ("/models/" + "a" * 65 + "/predict", 400),
    ("/models/secret/predict", 404),                # the model outside the store does not exist here
])
def test_model_names_in_urls_never_reach_outside_the_store(tmp_path, make_client, iris_classifier, url, status):
    root = tmp_path / "store"
    write_artifact(root / "inside.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "secret.joblib", iris_classifier, "joblib")          # beside the store
    write_artifact(tmp_path / ".secret.joblib", iris_classifier, "joblib")
    write_artifact(tmp_path / "..joblib", iris_classifier, "joblib")
    client = make_client(root)
    response = client.post_json(url, {"instances": IRIS_ROWS}, expect_errors=True)
    assert response.status_int == status, response.text
    body = strict_json(response)
    assert isinstance(body["error"], str) and body["error"] and "predictions" not in body
    if "%FF" in url or "%C0" in url:
        assert "UTF-8" in body["error"] and "'..'" not in body["error"]
    registry = client.app.registry
    registry.refresh()          # a path refused before routing has not scanned yet
    assert registry.names() == ["inside"]
    assert registry.slot("inside").loads == 0            # nothing was loaded, inside or out
