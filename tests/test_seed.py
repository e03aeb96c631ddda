"""The seed course's interface: a CRF sequence model served at GET /predict/<sen>, called as a browser does."""

import urllib.parse

import joblib
import pytest
import requests
import sklearn_crfsuite

from support import strict_json

# Sentences in lesson 17's format (word, coarse POS, fine POS, dependency); the CRF learns the coarse POS.
CORPUS = """坚决 a ad 1_v|惩治 v v 0_Root|贪污 v v 1_v|贿赂 n n -1_v|等 u udeng -1_v|经济 n n 1_v|犯罪 v vn -2_v
最高 n nt 2_nt|人民 n nt 1_nt|检察院 n nt 1_n|检察长 n n 0_Root|张思卿 n nr -1_n
反对 v v 1_v|腐败 a an -1_v|是 v vshi 0_Root|贯彻 v v 2_n|执行 v v -1_v|的 u ude1 -2_v|必然 b b 1_n|要求 n n -3_v
是 v vshi 0_Root|集中 v v 4_v|力量 n n -1_v|把 p pba 1_v|经济 n n 1_v|建设 v vn 1_v|搞 v v -2_v|的 u ude1 -4_v"""

SEED_SENTENCE = ("[[['坚决', 'a', 'ad', '1_v'], ['惩治', 'v', 'v', '0_Root'], ['贪污', 'v', 'v', '1_v'], "
                 "['贿赂', 'n', 'n', '-1_v'], ['等', 'u', 'udeng', '-1_v'], ['经济', 'n', 'n', '1_v'], "
                 "['犯罪', 'v', 'vn', '-2_v']]]")


def labels(predictions):
    return [list(sentence) for sentence in predictions]


@pytest.fixture(scope="module")
def crf():
    sentences = [[token.split() for token in line.split("|")] for line in CORPUS.splitlines()]
    model = sklearn_crfsuite.CRF(algorithm="lbfgs", max_iterations=50)
    model.fit(sentences, [[token[1] for token in sentence] for sentence in sentences])
    return model, sentences


@pytest.fixture
def crf_store(tmp_path, crf):
    joblib.dump(crf[0], tmp_path / "model.pkl")     # the seed saved its CRF with joblib as model.pkl
    return tmp_path


def test_seed_url_with_python_literal_and_chinese(crf_store, crf, make_client):
    model, sentences = crf
    client = make_client(crf_store)
    response = client.get("/predict/" + urllib.parse.quote(SEED_SENTENCE))
    body = strict_json(response)
    assert body["model"] == "model" and body["predictions"] == labels(model.predict([sentences[0]]))
    assert body["predictions"] == [["a", "v", "v", "n", "u", "n", "v"]]


def test_seed_url_as_json_and_post(crf_store, crf, make_client):
    model, sentences = crf
    client = make_client(crf_store)
    as_json = client.get("/predict/" + urllib.parse.quote(str(sentences[:2]).replace("'", '"')))
    posted = client.post_json("/predict", {"instances": sentences[:2]})
    expected = labels(model.predict(sentences[:2]))
    assert strict_json(as_json)["predictions"] == strict_json(posted)["predictions"] == expected
    assert strict_json(client.post_json("/models/model/predict", sentences[2:]))["predictions"] == \
        labels(model.predict(sentences[2:]))


def test_sequence_model_marginals_pass_through(crf_store, crf, make_client):
    """Inputs are not forced into a float matrix: nested token lists reach the CRF unchanged."""
    client = make_client(crf_store)
    body = strict_json(client.get("/models/model"))
    assert body["versions"][0]["state"] == "UNLOADED"
    response = client.post_json("/models/model/predict", [crf[1][0]])
    assert strict_json(response)["predictions"][0][0] == "a"
    metadata = strict_json(client.get("/models/model"))["versions"][0]
    assert metadata["estimator"] == "sklearn_crfsuite.estimator.CRF"
    assert metadata["n_features_in_"] is None and "predict" in metadata["methods"]


@pytest.mark.slow
def test_seed_url_against_the_real_server(crf_store, crf, serve_store):
    """Exactly as a browser sends the course's URL: non-ASCII percent-encoded, spaces as %20, quotes kept."""
    with serve_store(crf_store) as server:
        base = server.base
        url = base + "/predict/" + urllib.parse.quote(SEED_SENTENCE, safe="[],'")
        response = requests.get(url, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [["a", "v", "v", "n", "u", "n", "v"]]
        bad = requests.get(base + "/predict/" + urllib.parse.quote("[[['坚决', 'a'"), timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()
