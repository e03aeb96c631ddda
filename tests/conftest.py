"""The fixtures the test modules share; their helpers are in support.py, their test doubles in doubles.py.

- one OpenMP and one BLAS thread per process for the whole session (below);
- models: real small models trained once per session on scikit-learn's bundled data;
- stores: `store`, the same models in each artifact format (for the tests whose subject is loading), and
  `client`, a WebTest client over a joblib store;
- in-process apps: make_app / make_client, which always stop their registry's watcher;
- live servers: serve_store, `python service.py` over a store on a free port.

Tests marked `slow` (the soak, the longest live-server and subprocess tests) are left out by
`python -m pytest -m "not slow"`, the quick development loop; CI runs everything.
"""

import os

# One OpenMP and one BLAS thread per process, set before numpy and scikit-learn load (pytest imports this file
# first) so that the server processes the tests start inherit it too.  On a small machine the tests and their
# servers already use every core: more threads per process only make OpenMP's barriers spin against each other
# (histogram boosting's one-row calls took seconds instead of milliseconds).  Answers do not depend on it: a
# test that compares with scikit-learn calls it in the same process or with the same setting.  A variable set
# in the environment beforehand wins, to run the suite under other settings on purpose.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import webtest  # noqa: E402
from sklearn.datasets import load_diabetes, load_iris  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from support import (EXTENSIONS, IRIS_FEATURES, LiveServer, free_port, service_app, service_command,  # noqa: E402
                     write_artifact)


# -- in-process apps -----------------------------------------------------------------------------------------

@pytest.fixture
def make_app():
    """make_app(**create_app options) -> the app; every app made stops its watcher at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(service_app(**options))


@pytest.fixture
def make_client(make_app):
    """make_client(store, **options) -> a WebTest client over make_app(store=store, **options)."""
    def make(store_path, **options):
        return webtest.TestApp(make_app(store=store_path, **options))
    return make


# -- models and stores ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def iris():
    data = load_iris()
    return data.data, data.target


@pytest.fixture(scope="session")
def iris_classifier(iris):
    """Multiclass LogisticRegression on plain arrays (no feature names), integer classes."""
    features, target = iris
    return LogisticRegression(max_iter=1000).fit(features, target)


@pytest.fixture(scope="session")
def named_labels_classifier(iris):
    """Tells itself apart from iris_classifier: string labels ("setosa", ...) instead of integers."""
    features, target = iris
    return LogisticRegression(max_iter=1000).fit(features, load_iris().target_names[target])


@pytest.fixture(scope="session")
def named_iris_classifier():
    """StandardScaler + LogisticRegression fitted on a DataFrame: knows feature names; string classes."""
    data = load_iris(as_frame=True)
    frame = data.data.set_axis(IRIS_FEATURES, axis=1)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        frame, data.target_names[data.target])


@pytest.fixture(scope="session")
def diabetes_regressor():
    data = load_diabetes()
    return make_pipeline(StandardScaler(), Ridge(alpha=0.5)).fit(data.data, data.target)


@pytest.fixture(params=sorted(EXTENSIONS))
def artifact_format(request):
    return request.param


def _store(root, artifact_format, iris_classifier, named_iris_classifier, diabetes_regressor):
    """Flat iris (v1), versioned diabetes (v1, v2, both served) and named-feature flowers, in one format."""
    ext = EXTENSIONS[artifact_format]
    write_artifact(root / f"iris{ext}", iris_classifier, artifact_format)
    write_artifact(root / "diabetes" / "1" / f"model{ext}", diabetes_regressor, artifact_format)
    write_artifact(root / "diabetes" / "2" / f"model{ext}", diabetes_regressor, artifact_format)
    (root / "diabetes" / "model-settings.json").write_text('{"version_policy": "all"}')
    write_artifact(root / "flowers" / "1" / f"model{ext}", named_iris_classifier, artifact_format)
    return root


@pytest.fixture
def store(tmp_path, iris_classifier, named_iris_classifier, diabetes_regressor):
    """A joblib store of those models: the artifact format matters only at load."""
    return _store(tmp_path / "store", "joblib", iris_classifier, named_iris_classifier, diabetes_regressor)


@pytest.fixture
def client(store, make_client):
    return make_client(store)


@pytest.fixture
def store_in_each_format(tmp_path, artifact_format, iris_classifier, named_iris_classifier, diabetes_regressor):
    """The same store in each artifact format, for the tests whose subject is loading them."""
    return _store(tmp_path / "store", artifact_format, iris_classifier, named_iris_classifier, diabetes_regressor)


# -- live servers --------------------------------------------------------------------------------------------

@pytest.fixture
def serve_store():
    """serve_store(store, *flags, env=None) -> a LiveServer running `python service.py` on a free port."""
    def start(store_path, *flags, env=None):
        port = free_port()
        return LiveServer(service_command(store_path, port, *flags), port, env=env)
    return start
