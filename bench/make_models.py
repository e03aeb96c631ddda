"""Train the two benchmark models into a model store and write the request bodies.

Usage: python bench/make_models.py [OUTDIR]        (default OUTDIR: ./bench-models)

Adapted from the reference harness (shared/bench/make_models.py): the same two models, trained the
same way from scikit-learn's own data (no downloads, deterministic), laid out as model-service's
versioned store instead of loose files (the MLflow and MLServer folders are written by run.py's
--peers, from these artifacts, in the peers' own environments):

  OUTDIR/store/iris/1/model.joblib   LogisticRegression on iris, 4 features
  OUTDIR/store/rf/1/model.joblib     RandomForestClassifier, 100 trees, depth 10, 20 features
  OUTDIR/store/tabular/1/model.joblib  the tabular pipeline (train_tabular), served by the service alone
  OUTDIR/store-shadow/{iris,rf}/{1,2}/model.joblib   the same model as two versions: version 2 answers,
                                     and model-settings.json names version 1 its shadow
  OUTDIR/bodies/{iris,rf}_{1,64}.json  {"instances": [...]}: the first row, the first 64 rows
  OUTDIR/bodies/{iris,rf}_{1,64}_v2.json  the same rows as one V2 (Open Inference Protocol) FP64 tensor
"""
import json
import os
import sys

#: model name in the store -> reference name (shared/bench calls the iris model "iris_lr")
MODELS = ("iris", "rf")


def train():
    """The reference models, exactly as shared/bench/make_models.py fits them: {name: (model, X)}."""
    from sklearn.datasets import load_iris, make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    Xi, yi = load_iris(return_X_y=True)
    lr = LogisticRegression(max_iter=1000).fit(Xi, yi)
    Xr, yr = make_classification(n_samples=5000, n_features=20, random_state=0)
    rf = RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0).fit(Xr, yr)
    return {"iris": (lr, Xi), "rf": (rf, Xr)}


def build(out):
    """Write the store and the bodies under `out`; return {"store": dir, "bodies": {(name, rows): path},
    "bodies_v2": {(name, rows): path}, "artifacts": {name: path}, "expected": {(name, rows): [label, ...]}}.

    "expected" is what the fitted model predicts for a body's rows (as rounded in the body): every
    server must answer exactly that before it is timed."""
    import joblib

    out = os.path.abspath(out)
    store, bodies = os.path.join(out, "store"), os.path.join(out, "bodies")
    os.makedirs(bodies, exist_ok=True)
    shadowed = os.path.join(out, "store-shadow")
    result = {"store": store, "store_shadow": shadowed, "bodies": {}, "bodies_v2": {}, "artifacts": {}, "expected": {}}
    for name, (model, X) in train().items():
        folder = os.path.join(store, name, "1")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "model.joblib")
        joblib.dump(model, path + ".tmp")
        os.replace(path + ".tmp", path)
        result["artifacts"][name] = path
        # the reference bodies: values rounded to 6 places, compact JSON
        for rows in (1, 64):
            instances = [[round(float(v), 6) for v in r] for r in X[:rows]]
            v2 = {"inputs": [{"name": "input-0", "shape": [rows, len(instances[0])], "datatype": "FP64",
                              "data": [v for r in instances for v in r]}]}
            for key, body, suffix in (("bodies", {"instances": instances}, ""), ("bodies_v2", v2, "_v2")):
                bpath = os.path.join(bodies, f"{name}_{rows}{suffix}.json")
                with open(bpath, "w") as f:
                    json.dump(body, f, separators=(",", ":"))
                result[key][(name, rows)] = bpath
            result["expected"][(name, rows)] = model.predict(instances).tolist()
        for version in ("1", "2"):
            os.makedirs(os.path.join(shadowed, name, version), exist_ok=True)
            os.link(path, os.path.join(shadowed, name, version, "model.joblib"))
        with open(os.path.join(shadowed, name, "model-settings.json"), "w") as f:
            json.dump({"version_policy": "all", "shadow": "1"}, f)
        # sanity: the artifact on disk predicts like the fitted model
        assert (joblib.load(path).predict(X[:64]) == model.predict(X[:64])).all()
    # the tabular pipeline, for the service alone (its requests are named records with text): not an artifact of
    # the in-process or peer figures
    import pandas as pd

    model, records = train_tabular()
    folder = os.path.join(store, "tabular", "1")
    os.makedirs(folder, exist_ok=True)
    joblib.dump(model, os.path.join(folder, "model.joblib"))
    for rows in (1, 64):
        bpath = os.path.join(bodies, f"tabular_{rows}.json")
        with open(bpath, "w") as f:
            json.dump({"instances": records[:rows]}, f, separators=(",", ":"))
        result["bodies"][("tabular", rows)] = bpath
        result["expected"][("tabular", rows)] = model.predict(pd.DataFrame(records[:rows])).tolist()
    return result


def build_forest(out):
    """A model of about 200 MB for the memory of --workers: 9 fully grown ExtraTrees on 150,000 rows of 8
    features (about 8 s to train). Returns (store, body path, [expected prediction])."""
    import joblib
    import numpy as np
    from sklearn.ensemble import ExtraTreesRegressor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((150_000, 8)).round(2)
    y = X @ rng.standard_normal(8) + rng.standard_normal(len(X))
    model = ExtraTreesRegressor(n_estimators=9, random_state=0).fit(X, y)
    store = os.path.join(os.path.abspath(out), "forest-store")
    folder = os.path.join(store, "forest", "1")
    os.makedirs(folder, exist_ok=True)
    joblib.dump(model, os.path.join(folder, "model.joblib"))
    body = os.path.join(os.path.abspath(out), "forest_1.json")
    with open(body, "w") as f:
        json.dump({"instances": X[:1].tolist()}, f)
    return store, body, model.predict(X[:1]).tolist()


def train_limits():
    """The models `inprocess.py --anchors` measures against the limit: {name: (model, rows)}, rows being the 64 rows
    it predicts (an array; for the tabular pipeline, JSON records with text and nulls): a 100-tree random forest
    grown to full depth and a 100-iteration histogram gradient boosting on the benchmark's `make_classification`
    data, and the tabular pipeline (train_tabular)."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    X, y = make_classification(n_samples=5000, n_features=20, random_state=0)
    forest = RandomForestClassifier(n_estimators=100, random_state=0).fit(X, y)
    boosting = HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=0).fit(X, y)
    return {"forest": (forest, X[:64]), "boosting": (boosting, X[:64]), "tabular": train_tabular()}


def train_tabular():
    """(model, 64 JSON records): the pipeline tabular data is usually served with, fitted on a DataFrame of numbers
    (some missing) and text categories (some missing): a ColumnTransformer selecting by name, numbers imputed and
    scaled, text imputed and one-hot encoded, a LogisticRegression."""
    import numpy as np
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import make_classification
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    X, y = make_classification(n_samples=5000, n_features=20, random_state=0)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(X[:, :4] * [10, 1000, 1, 5] + [40, 50000, 0, 20], columns=["age", "income", "score", "tenure"])
    frame.loc[rng.random(len(frame)) < 0.05, "income"] = np.nan
    frame["plan"] = np.array(["basic", "plus", "pro"], dtype=object)[(X[:, 4] > 0).astype(int) + (X[:, 5] > 1)]
    frame["region"] = rng.choice(np.array(["north", "south", "east", "west", None], dtype=object), size=len(frame))
    numbers, text = ["age", "income", "score", "tenure"], ["plan", "region"]
    model = make_pipeline(ColumnTransformer([
        ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
        ("text", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
         text)]), LogisticRegression(max_iter=1000)).fit(frame, y)
    records = [{name: (None if isinstance(value, float) and value != value else value) for name, value in row.items()}
               for row in frame.head(64).to_dict("records")]
    return model, records


if __name__ == "__main__":
    built = build(sys.argv[1] if len(sys.argv) > 1 else "./bench-models")
    for name, path in built["artifacts"].items():
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    print(f"wrote request bodies to {os.path.dirname(next(iter(built['bodies'].values())))}")
