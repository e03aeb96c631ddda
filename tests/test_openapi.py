"""GET /openapi.json describes every route; it validates with openapi-spec-validator, and a bounded
schemathesis run against the WSGI app finds no server error and no answer that breaks the schema."""

import atexit
import os
import shutil
import tempfile

import pandas as pd
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.feature_extraction.text import TfidfVectorizer

import service
from support import IRIS_FEATURES, write_artifact


def build_app():
    """A store with a named-feature model (loaded, so it has a row schema), a plain one and a text one.

    Built at import: schemathesis makes its tests from the app's schema when the module is collected.
    """
    data = load_iris()
    root = os.path.join(tempfile.mkdtemp(prefix="openapi-"), "store")
    atexit.register(shutil.rmtree, os.path.dirname(root), True)
    named = LogisticRegression(max_iter=1000).fit(pd.DataFrame(data.data, columns=IRIS_FEATURES),
                                                  data.target_names[data.target])
    write_artifact(os.path.join(root, "iris", "1", "model.joblib"), named, "joblib")
    write_artifact(os.path.join(root, "plain.joblib"), LogisticRegression(max_iter=1000).fit(data.data, data.target),
                   "joblib")
    texts = ["a great film", "a boring film", "great acting", "awful plot"] * 3
    write_artifact(os.path.join(root, "text.joblib"), make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(
        texts, ["good", "bad"] * 6), "joblib")
    application = service.create_app(store=root, default_model="iris", poll_interval=0)
    registry = application.registry
    registry.refresh()
    registry.get("iris")
    return application


APP = build_app()


@pytest.fixture(scope="module")
def app():
    return APP


def document(app):
    import webtest
    return webtest.TestApp(app).get("/openapi.json").json


def test_the_document_is_valid_openapi_and_covers_every_route(app):
    doc = document(app)
    validate(doc)
    documented = {(method.upper(), path) for path, operations in doc["paths"].items() for method in operations}
    routed = {(route.method, route.rule) for route in app.bottle.routes}
    assert routed == {(row.method, row.rule) for row in service.ROUTES}, "routing comes from the table alone"
    for row in service.ROUTES:
        assert (row.method, row.path) in documented, row
        assert row.access in (service.OPEN, service.TOKEN, service.ADMIN)
    assert "/v1/models/{name}:predict" in doc["paths"] and "/v1/models/{name}/labels/{label}:classify" in doc["paths"]


def test_a_model_with_known_feature_names_has_its_own_row_schema(app):
    doc = document(app)
    row = doc["components"]["schemas"]["iris.row"]
    assert row["required"] == IRIS_FEATURES and set(row["properties"]) == set(IRIS_FEATURES)
    assert "/models/iris/predict" in doc["paths"]


def test_each_request_body_shows_the_example_refusals_show(app):
    """One source for both: a route's documented JSON example is the one a body that is not JSON is answered
    with (service.BODY_EXAMPLES)."""
    doc = document(app)
    for row in service.ROUTES:
        if row.body in service.BODY_EXAMPLES:
            media = doc["paths"][row.path][row.method.lower()]["requestBody"]["content"]["application/json"]
            assert media["example"] == service.BODY_EXAMPLES[row.body], row


# the explain routes are documented as answering 501 for a model that cannot be explained exactly, by design,
# which schemathesis counts as a server error
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP).exclude(path_regex="[:/]explain$")


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_and_every_answer_matches_the_schema(case):
    """Every check but the two that call a 4xx to a schema-valid request (or a 2xx to an invalid one) a
    failure: the schema says what a request looks like, not every rule a model applies to its inputs."""
    case.call_and_validate(excluded_checks=[positive_data_acceptance, negative_data_rejection])
