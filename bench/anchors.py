"""The anchors of `bench/inprocess.py --anchors`: ONNX Runtime and Treelite, run in their own environment.

Not for the service's environment: `inprocess.py` creates a virtual environment for it (see
`inprocess.py --help`) and starts this file there.  It reads one JSON request per line from stdin,
{"model": FILE.joblib, "rows": FILE.npy, "expected": FILE.npy, "calls": N}, and answers one JSON line:
{contender: {"us": microseconds per predict_proba call, "fidelity": "bit-exact" or the largest
difference from `expected` (scikit-learn's answer in the service's environment), or "error": why it is
not available}}.  Contenders: ONNX Runtime on a skl2onnx conversion with float32 and with float64 inputs,
one thread; Treelite's GTIL, one thread.  Conversions are made once per model.
"""
import json
import sys
import time
import warnings

import joblib
import numpy as np


def onnx_session(model, dtype):
    """An ONNX Runtime session (one thread) of the model converted by skl2onnx for `dtype` inputs, probabilities
    as an array."""
    import onnxruntime
    from skl2onnx import to_onnx

    converted = to_onnx(model, np.zeros((1, model.n_features_in_), dtype=dtype),
                        options={id(model): {"zipmap": False}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(converted.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name, output = session.get_inputs()[0].name, [o.name for o in session.get_outputs()].index("probabilities")
    return lambda X: session.run(None, {name: X.astype(dtype)})[output]


def treelite_predictor(model):
    """Treelite's GTIL on the imported model, one thread; a binary classifier's one column becomes two."""
    import treelite

    imported = treelite.sklearn.import_model(model)

    def predict(X):
        found = treelite.gtil.predict(imported, X, nthread=1).reshape(len(X), -1)
        return np.c_[1 - found, found] if found.shape[1] == 1 else found

    return predict


CONTENDERS = {"ONNX Runtime float32": lambda model: onnx_session(model, np.float32),
              "ONNX Runtime float64": lambda model: onnx_session(model, np.float64),
              "Treelite GTIL": treelite_predictor}


def measure(function, X, expected, calls):
    """{"us", "fidelity"} of one contender on rows X."""
    found = function(X)
    fidelity = "bit-exact" if found.dtype == expected.dtype and np.array_equal(found, expected) else \
        f"{np.abs(found.astype(np.float64) - expected).max():.2g} ({found.dtype})"
    started = time.perf_counter()
    for _ in range(calls):
        function(X)
    return {"us": (time.perf_counter() - started) / calls * 1e6, "fidelity": fidelity}


def main():
    warnings.simplefilter("ignore")
    made = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["model"] not in made:
            model, made[request["model"]] = joblib.load(request["model"]), {}
            for name, make in CONTENDERS.items():
                try:
                    made[request["model"]][name] = make(model)
                except Exception as error:  # a converter that does not know this model: reported, not fatal
                    made[request["model"]][name] = f"{type(error).__name__}: {str(error)[:80]}"
        X, expected = np.load(request["rows"]), np.load(request["expected"])
        answer = {name: {"error": function} if isinstance(function, str) else
                  measure(function, X, expected, request["calls"])
                  for name, function in made[request["model"]].items()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
