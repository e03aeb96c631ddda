"""Rebuild the demo models in model_store/ from scikit-learn's bundled data (no downloads).

    python scripts/build_demo_store.py [STORE]

Writes (the same bytes at every run with the same scikit-learn, numpy and BLAS; another BLAS may round the
fitted coefficients differently in their last bits):
  iris/1/model.joblib   LogisticRegression on the iris measurements (named features)
  iris/2/model.joblib   StandardScaler + LogisticRegression, the same features
  iris/model-settings.json   serve both versions; label 1 "stable" and 2 "canary"
  diabetes.json         StandardScaler + Ridge on the diabetes data, as a JSON model (no code runs on load)
  sentiment.pkl         TfidfVectorizer + LogisticRegression on a small hand-written set of reviews
Each file is written under a temporary name and renamed into place, as any publisher should.
"""

import json
import os
import pickle
import sys

import joblib
from sklearn.datasets import load_diabetes, load_iris
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import service  # noqa: E402

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

REVIEWS = [
    ("a wonderful, moving film with brilliant acting", "positive"),
    ("I loved every minute, great story and great cast", "positive"),
    ("superb direction and a beautiful soundtrack", "positive"),
    ("funny, warm and clever: the best film this year", "positive"),
    ("an excellent script and a delightful ending", "positive"),
    ("great fun, I would happily watch it again", "positive"),
    ("a charming and brilliant little movie", "positive"),
    ("the acting was wonderful and the plot gripping", "positive"),
    ("a dull, boring film with terrible acting", "negative"),
    ("I hated it, the story made no sense at all", "negative"),
    ("awful direction and a painfully slow plot", "negative"),
    ("the worst film this year, a complete waste of time", "negative"),
    ("a boring script and a predictable, terrible ending", "negative"),
    ("poor acting, bad jokes, I walked out", "negative"),
    ("a dull and lifeless movie, avoid it", "negative"),
    ("terrible sound, awful plot, boring characters", "negative"),
]


def publish(path, write):
    """Write to a temporary name, then rename into place (never a half-written artifact)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    write(temporary)
    os.replace(temporary, path)
    print("wrote", path)


def main(store):
    iris = load_iris(as_frame=True)
    iris_x = iris.data.set_axis(IRIS_FEATURES, axis=1)
    iris_y = iris.target_names[iris.target]
    v1 = LogisticRegression(max_iter=1000).fit(iris_x, iris_y)
    v2 = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(iris_x, iris_y)
    publish(os.path.join(store, "iris", "1", "model.joblib"), lambda p: joblib.dump(v1, p))
    publish(os.path.join(store, "iris", "2", "model.joblib"), lambda p: joblib.dump(v2, p))
    settings = {"version_policy": {"latest": 2}, "labels": {"stable": 1, "canary": 2}}
    publish(os.path.join(store, "iris", service.SETTINGS_FILE),
            lambda p: open(p, "w").write(json.dumps(settings, indent=2) + "\n"))

    diabetes = load_diabetes(as_frame=True)
    regressor = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(diabetes.data, diabetes.target)
    publish(os.path.join(store, "diabetes.json"), lambda p: service.save_json_model(regressor, p))

    texts, labels = zip(*REVIEWS)
    sentiment = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0)).fit(list(texts), list(labels))
    # The vectorizer remembers id(its stop_words list) after fitting, a number that differs at every run: left
    # out, the file is the same at every run (the vectorizer only uses it to skip re-checking its stop words).
    del sentiment.steps[0][1]._stop_words_id

    def write_pickle(path):
        with open(path, "wb") as handle:
            pickle.dump(sentiment, handle, protocol=pickle.HIGHEST_PROTOCOL)

    publish(os.path.join(store, "sentiment.pkl"), write_pickle)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), os.pardir, "model_store"))
