"""A structure-aware mutation fuzzer for JSON models: forged files must be refused or served, never crash.

It takes a valid JSON model of every family in tests/families.py (the documented coverage table), in the
current format and, for the families with trees, as format version 1 wrote them (node records); changes
what a forger could change (deletes attributes; shrinks, grows, transposes and retypes arrays; writes
out-of-range, negative and cyclic indices into trees; swaps members and sub-objects between models;
replaces numbers and strings; names hostile dtypes; sets derived counts that disagree with the arrays;
writes integers beyond 64 bits; moves a record layout's field offsets; puts a value of another type
where one was; adds state that would hide a method or class attribute); and hands each mutant to a child process that loads it the way the store does, within
small limits (FUZZ_LIMITS), warms it as --preload does and calls every prediction method on a few rows
(real rows, extreme values, missing values) the way a request does.  A mutant is fine when the load is
refused (ArtifactError) or each call answers or is refused as a 400.  Anything else is a finding: a crash
(the child died of a signal), a hang (no answer within the time limit), an error (an exception the
service would answer with a 500, or a load that failed other than by the decoder's own refusal) or
memory (the child's peak memory grew past MEMORY_BUDGET while it handled the mutant).

One long-lived child evaluates mutant after mutant under `nice`; it is restarted after a crash or a hang,
and every RESTART_EVERY mutants so that its peak memory is measured afresh.  tests/test_json_fuzz.py runs
a bounded sample; docs/json-model-format.md gives the full run and its figures:

    nice -n 19 python tests/json_fuzz.py --mutations 50000 --seed 7

which prints the count of each outcome and every finding (with --save DIR, the findings' files too).
tests/json_generate.py is the second, independent fuzzer (documents generated from the format's grammar
by Hypothesis); it uses the same child process.
"""

import argparse
import base64
import collections
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINE = ("refused", "served")                 # load refused, or every call answered or refused as a 400
FINDINGS = ("crash", "hang", "error", "memory")
# The limits mutants load under: every family's valid model fits, with room to grow by a mutation.
FUZZ_LIMITS = {"nodes": 200_000, "width": 10_000, "categories": 10_000, "array_bytes": 64 << 20}
MEMORY_BUDGET = 512 << 20      # how far one mutant may raise the child's peak memory (a model within the limits: far less)
RESTART_EVERY = 1000


# -- the documents ----------------------------------------------------------------------------------


def base_documents(names=None, version_1=True):
    """{case: parsed JSON model} for the coverage table's cases (all, or `names`), plus "<case> (v1)": the
    same model as format version 1 wrote it, for each case holding trees or histogram predictors."""
    import warnings

    import service
    import families as coverage

    documents = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names or coverage.CASES:
            estimator, _ = coverage.fit(name)
            documents[name] = json.loads(service.dump_json_model(estimator))
            old = as_version_1(documents[name])
            if version_1 and old != dict(documents[name], format_version=1):
                documents[f"{name} (v1)"] = old
    return documents


def case_of(name):
    """The coverage case a document name stands for ("<case> (v1)" is <case>'s model)."""
    return name[:-len(" (v1)")] if name.endswith(" (v1)") else name


def as_version_1(node):
    """A document as format version 1 wrote it: trees and histogram predictors as object nodes whose
    state holds their nodes as numpy records (NODE_DTYPE, PREDICTOR_RECORD_DTYPE), depths included."""
    if isinstance(node, list):
        return [as_version_1(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: as_version_1(value) for key, value in node.items()}
    if node.get("format_version") == 2:
        node["format_version"] = 1
    if node.get("$type") == "tree":
        from sklearn.tree._tree import NODE_DTYPE
        records, depths = _records(node["nodes"], NODE_DTYPE, "left_child", "right_child", -1)
        import numpy as np
        state = [["max_depth", int(depths.max(initial=0))], ["node_count", len(records)], ["nodes", array_node(records)],
                 ["values", node["value"]]]
        return {"$type": "object", "class": "sklearn.tree._tree.Tree",
                "args": [node["n_features"], array_node(np.array(node["n_classes"], dtype=np.intp)),
                         node["value"]["shape"][1]],
                "state": {"$type": "dict", "items": state}}
    if node.get("$type") == "tree_predictor":
        from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
        records, depths = _records(node["nodes"], PREDICTOR_RECORD_DTYPE, "left", "right", 0)
        records["depth"] = depths
        state = [[key, node[key]] for key in ("binned_left_cat_bitsets", "raw_left_cat_bitsets")]
        return {"$type": "object", "class": "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
                "state": {"$type": "dict", "items": state + [["nodes", array_node(records)]]}}
    return node


def _records(columns, dtype, left, right, leaf_child):
    """The node records of a tree node's columns, and each node's depth (walked here, one node at a time)."""
    import numpy as np

    arrays = {name: read_array(column) for name, column in columns.items()}
    records = np.zeros(len(next(iter(arrays.values()))), dtype=dtype)
    for name, array in arrays.items():
        records[name] = array
    depths = np.zeros(len(records), dtype=np.int64)
    for index in range(len(records)):
        for child in (int(records[left][index]), int(records[right][index])):
            if child != leaf_child and 0 <= child < len(records) and \
                    ("is_leaf" not in arrays or not records["is_leaf"][index]):
                depths[child] = depths[index] + 1
    return records, depths


# -- reading and writing ndarray nodes --------------------------------------------------------------


def _dtype(spec):
    import numpy as np

    return np.dtype(spec if isinstance(spec, str) else {key: spec[key] for key in
                                                        ("names", "formats", "offsets", "itemsize")})


def read_array(node):
    import numpy as np

    dtype = _dtype(node["dtype"])
    raw = base64.b64decode(node["data"])
    return np.frombuffer(raw, dtype=dtype).reshape(node["shape"], order=node.get("order", "C")).copy()


def array_node(array, dtype_spec=None):
    """An ndarray node for `array` (C order); a record dtype keeps the document's description."""
    if array.dtype.names:
        spec = dtype_spec if isinstance(dtype_spec, dict) else {
            "names": list(array.dtype.names), "formats": [array.dtype.fields[n][0].str for n in array.dtype.names],
            "offsets": [array.dtype.fields[n][1] for n in array.dtype.names], "itemsize": array.dtype.itemsize}
    else:
        spec = array.dtype.str
    return {"$type": "ndarray", "dtype": spec, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes(order="C")).decode()}


# -- where a document can be changed ---------------------------------------------------------------


def sites(node, path=()):
    """Every (path, node) below `node` that a mutation may change or replace."""
    found = [(path, node)]
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += sites(item, path + (i,))
    elif isinstance(node, dict):
        for key, item in node.items():
            if key not in ("$type", "class", "dtype", "data"):
                found += sites(item, path + (key,))
    return found


def get(node, path):
    for key in path:
        node = node[key]
    return node


def replaced(document, path, value, delete=False):
    """A copy of `document` with the value at `path` replaced (or deleted); only the path is copied."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = list(document) if isinstance(document, list) else dict(document)
    if rest:
        copy[head] = replaced(document[head], rest, value, delete)
    elif delete:
        del copy[head]
    else:
        copy[head] = value
    return copy


# -- mutations --------------------------------------------------------------------------------------

INTEGERS = (0, 1, -1, -2, 2, 3, 7, 255, 2**31 - 1, 2**31, -2**31, 2**63 - 1, 10**30)
HUGE_INTEGERS = (2**63, -2**63 - 1, 2**64, 2**128, -10**400, 10**400)
FLOATS = ("nan", "inf", "-inf", 0.0, -0.0, 1e308, -1e308, 5e-324)
STRINGS = ("", "filename", "file", "content", "x", "auto", "precomputed", "ovr", "l1", "onehot", "uniform")
# dtypes a forger could name: other byte orders, records with their own offsets and sizes, raw bytes, dates,
# objects read from bytes, text far wider than its items, and things that are not dtypes at all.
HOSTILE_DTYPES = (">f8", "=f8", "f8", "<f16", "V8", "|V0", "|S4", "<M8[ns]", "O", "|O", "<U999999", "<U0", "<f8,<i4",
                  "[('a', '<f8')]", 5, None, ["<f8"], {"names": ["a"], "formats": ["<f8"], "offsets": [2**31],
                                                       "itemsize": 8},
                  {"names": ["a"], "formats": ["<f8"], "offsets": [0], "itemsize": 1},
                  {"names": ["a", "b"], "formats": ["<i8", "|O"], "offsets": [0, 8], "itemsize": 16})
# Counts scikit-learn derives from the fitted arrays, and the format's own; a forger sets them to disagree.
# Names classes define (methods, properties, class attributes): a state key of one would hide it.
SHADOWING = ("predict", "predict_proba", "transform", "_validate_params", "_parameter_constraints", "get_params",
             "_impl", "classes_", "n_features_in_", "__module__", "__class__", "fit", "_more_tags", "loss_functions")
DERIVED = ("n_features_in_", "n_outputs_", "n_classes_", "n_trees_per_iteration_", "n_features", "n_classes",
           "node_count", "max_depth", "n_samples_fit_", "n_output_features_", "_n_out_full", "n_bins_",
           "n_estimators_", "n_iter_", "n_features_", "_n_features_outs")


def _number_like(rng):
    choice = rng.random()
    if choice < 0.6:
        return rng.choice(INTEGERS)
    value = rng.choice(FLOATS)
    return {"$type": "float", "value": value} if isinstance(value, str) else value


def _other_type(rng, node, donors):
    """A value of another type than `node`: type confusion."""
    pool = [None, True, 0, 1.5, "x", [], [1, 2], {"$type": "float", "value": "nan"},
            {"$type": "tuple", "items": [1]}, {"$type": "dict", "items": [["a", 1]]},
            {"$type": "ndarray", "dtype": "<f8", "shape": [1], "data": "AAAAAAAA8D8="},
            {"$type": "scalar", "dtype": "<i8", "data": "AQAAAAAAAAA="}, {"$type": "dtype", "dtype": "|O"},
            {"$type": "type", "name": "float64"}, {"$type": "slice", "items": [None, 2, None]},
            rng.choice(donors)[1]]
    choices = [value for value in pool if type(value) is not type(node) or
               isinstance(value, dict) and isinstance(node, dict) and value.get("$type") != node.get("$type")]
    return rng.choice(choices)


def mutate_array(node, rng, what):
    """A changed ndarray node: its shape, dtype or values."""
    import numpy as np

    try:
        array = read_array(node)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):   # an earlier change made it inconsistent
        return node, f"{what}: unchanged"
    if not array.dtype.names and array.dtype.kind not in "biufc":   # a hostile dtype an earlier change named
        return node, f"{what}: unchanged"
    op = rng.choice(("shrink", "grow", "transpose", "retype", "reshape", "empty", "poke", "poke", "poke",
                     "order", "dtype", "records"))
    if op == "order" and array.ndim > 1:
        changed = dict(node, order="F" if node.get("order", "C") == "C" else "C")
        return changed, f"{what}: memory order flipped"
    if op == "dtype":                           # the same bytes, described as something else
        dtype = rng.choice(HOSTILE_DTYPES)
        return dict(node, dtype=dtype), f"{what}: dtype {dtype!r}"
    if op == "records" and isinstance(node["dtype"], dict):       # a version 1 record layout, moved
        return _moved_layout(node, rng, what)
    if op == "shrink" and array.size:
        axis = rng.randrange(array.ndim) if array.ndim else 0
        if array.ndim:
            keep = rng.randrange(array.shape[axis])
            return array_node(np.take(array, range(keep), axis=axis), node["dtype"]), \
                f"{what}: axis {axis} cut to {keep}"
    if op == "grow" and array.ndim:
        axis = rng.randrange(array.ndim)
        extra = np.take(array, [0] * rng.choice((1, 2, 5)), axis=axis) if array.shape[axis] else \
            np.zeros(tuple(1 if i == axis else s for i, s in enumerate(array.shape)), array.dtype)
        return array_node(np.concatenate([array, extra], axis=axis), node["dtype"]), f"{what}: axis {axis} grown"
    if op == "transpose" and array.ndim > 1:
        return array_node(np.ascontiguousarray(array.T), node["dtype"]), f"{what}: transposed"
    if op == "retype" and not array.dtype.names:
        target = rng.choice(("<f4", "<f8", "<i4", "<i8", "|u1", "|b1", "<u8", "<f2", "<i2", "<c16", "<u4"))
        with np.errstate(all="ignore"):
            try:
                changed = array.astype(target)
            except (TypeError, ValueError):
                return node, f"{what}: unchanged"
        return array_node(changed), f"{what}: as {target}"
    if op == "reshape":
        if array.ndim > 1 or rng.random() < 0.5:
            return array_node(array.ravel(), node["dtype"]), f"{what}: flattened"
        return array_node(array.reshape(array.shape + (1,)), node["dtype"]), f"{what}: axis added"
    if op == "empty":
        shape = list(array.shape) or [0]
        shape[rng.randrange(len(shape))] = 0
        return array_node(np.zeros(shape, array.dtype), node["dtype"]), f"{what}: zero size {shape}"
    if not array.size:
        return node, f"{what}: unchanged"
    return _poked(node, array, rng, what)


def _poked(node, array, rng, what):
    """One value of the array changed: an index that points anywhere, a hostile number."""
    flat = array.reshape(-1)
    index = rng.randrange(len(flat))
    if array.dtype.names:                                # version 1 tree nodes: one field of one node
        field = rng.choice(array.dtype.names)
        kind = array.dtype.fields[field][0].kind
        if field in ("left_child", "right_child", "left", "right") and rng.random() < 0.5:
            value = rng.choice((index, 0, max(index - 1, 0), len(flat) - 1, len(flat)))   # cycles, self, end
        elif field == "depth":
            value = rng.choice((2**31, 2**32 - 1, 200_000, 0))      # what the native walker once trusted
        elif kind == "f":
            value = rng.choice((float("nan"), float("inf"), -float("inf"), 1e308, -1.0, 0.0))
        else:
            value = rng.choice(INTEGERS)
        flat[index][field] = _wrapped(value, array.dtype.fields[field][0])
        return array_node(flat.reshape(array.shape), node["dtype"]), f"{what}[{index}].{field} = {value!r}"
    if array.dtype.kind in "iub":
        value = rng.choice(INTEGERS + (len(flat), len(flat) + 1, index, max(index - 1, 0)))
    else:
        value = rng.choice((float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 0.0, -1.0))
    flat[index] = _wrapped(value, array.dtype)
    return array_node(flat.reshape(array.shape), node["dtype"]), f"{what}[{index}] = {value!r}"


def _moved_layout(node, rng, what):
    """A record description whose offsets, size, formats or names say something else about the same bytes."""
    spec = {key: list(value) if isinstance(value, list) else value for key, value in node["dtype"].items()}
    if not all(isinstance(spec.get(key), list) and spec[key] for key in ("names", "formats", "offsets")) or \
            type(spec.get("itemsize")) is not int:
        return node, f"{what}: unchanged"
    field = rng.randrange(min(len(spec["names"]), len(spec["formats"]), len(spec["offsets"])))
    change = rng.choice(("offset", "itemsize", "format", "name"))
    if change == "offset":
        spec["offsets"][field] = rng.choice((spec["itemsize"], 2**31, 2**40, -8, spec["offsets"][field] + 1))
    elif change == "itemsize":
        spec["itemsize"] = rng.choice((1, spec["itemsize"] - 1, spec["itemsize"] * 2, 2**31))
    elif change == "format":
        spec["formats"][field] = rng.choice(("|O", "<f8", "|u1", ">i8", "V8", "<U4"))
    else:
        spec["names"][field] = rng.choice(("depth", "left_child", "x", ""))
    return dict(node, dtype=spec), f"{what}: record layout's {change} of field {field} moved"


def _wrapped(value, dtype):
    """`value` as `dtype` holds it: integers wrap around as in C, floats become integers as C casts them."""
    import numpy as np

    if dtype.kind in "iub":
        if isinstance(value, float):
            value = int(value) if value == value and abs(value) < 2**63 else -1
        bits = 8 * dtype.itemsize
        return np.array(value & ((1 << bits) - 1), dtype=f"u{dtype.itemsize}").view(dtype)[()]
    return value


def mutate(document, rng, donors, strings):
    """One mutant of `document` and what was changed; `donors` are the (path, node) sites of all documents,
    to borrow parts from."""
    targets = sites(document)
    for _ in range(50):
        path, node = rng.choice(targets)
        what = ".".join(map(str, path)) or "document"
        strategy = rng.random()
        if strategy < 0.04 and path:                                       # type confusion
            value = _other_type(rng, node, donors)
            return replaced(document, path, value), f"{what} = a {type(value).__name__} {_clip(value)}"
        if strategy < 0.08 and path and path[-1] in DERIVED:               # derived counts that disagree
            value = rng.choice((node + 1 if type(node) is int else 0, 2**27, 2**31, 0, -1, 10**30,
                                [1], {"$type": "float", "value": "inf"}))
            return replaced(document, path, value), f"{what} = {_clip(value)} (derived)"
        if strategy < 0.11 and type(node) is int and path:                 # beyond what compiled code takes
            value = rng.choice(HUGE_INTEGERS)
            return replaced(document, path, value), f"{what} = {_clip(value)} (huge)"
        if path and path[-1] == "state" and isinstance(node, dict) and node and "$type" not in node:
            key = rng.choice(sorted(node))                                   # an estimator's attribute
            if rng.random() < 0.15:                                          # one its class defines, added
                name = rng.choice(SHADOWING)
                return replaced(document, path + (name,), rng.choice(donors)[1]), f"{what}.{name} added"
            if rng.random() < 0.7:
                return replaced(document, path + (key,), None, delete=True), f"{what}.{key} deleted"
            return replaced(document, path + (key,), rng.choice(HUGE_INTEGERS + (10**30,))), \
                f"{what}.{key} = a huge integer"
        if isinstance(node, dict) and node.get("$type") == "ndarray" and "data" in node:
            return (lambda changed: (replaced(document, path, changed[0]), changed[1]))(
                mutate_array(node, rng, what))
        if isinstance(node, dict) and node.get("$type") == "ndarray" and isinstance(node.get("items"), list) \
                and node["items"]:
            return _mutate_items(document, path, node, rng, what)
        if isinstance(node, dict) and node.get("$type") in ("estimator", "object", "neighbors_tree", "tree",
                                                            "tree_predictor") and path and rng.random() < 0.5:
            # swap in a part of the same kind (or found at the same key) from another model
            key = path[-1]
            same_key = [n for p, n in donors if p and p[-1] == key and n is not node]
            pool = same_key or [n for p, n in donors if isinstance(n, dict) and n.get("$type") == node["$type"]]
            if pool:
                return replaced(document, path, rng.choice(pool)), f"{what}: swapped for another model's"
        if isinstance(node, dict) and node.get("$type") == "object" and isinstance(node.get("args"), list) \
                and node["args"]:
            i = rng.randrange(len(node["args"]))
            value = _number_like(rng)
            return replaced(document, path + ("args", i), value), f"{what}.args[{i}] = {value!r}"
        if isinstance(node, dict) and node.get("$type") in ("tuple", "dict", "bunch", "set", "list") \
                and isinstance(node.get("items"), list) and node["items"]:
            items = list(node["items"])
            if rng.random() < 0.5:
                items.pop(rng.randrange(len(items)))
            else:
                items.append(items[rng.randrange(len(items))])
            return replaced(document, path, dict(node, items=items)), f"{what}: items changed"
        if isinstance(node, list) and node and rng.random() < 0.5:
            items = list(node)
            op = rng.random()
            if op < 0.4:
                items.pop(rng.randrange(len(items)))
            elif op < 0.7:
                items.append(items[rng.randrange(len(items))])
            else:
                items.reverse()
            return replaced(document, path, items), f"{what}: list changed"
        if isinstance(node, bool) or node is None:
            value = rng.choice((True, False, None, 0, 1, "x"))
            return replaced(document, path, value), f"{what} = {value!r}"
        if isinstance(node, (int, float)) and path:
            value = _number_like(rng) if rng.random() < 0.9 else rng.choice((None, "x", [1, 2]))
            return replaced(document, path, value), f"{what} = {value!r}"
        if isinstance(node, str) and path and path[-1] not in ("$type", "class"):
            pool = strings.get(path[-1], []) + list(STRINGS)
            value = rng.choice(pool)
            return replaced(document, path, value), f"{what} = {value!r}"
    return document, "unchanged"


def _mutate_items(document, path, node, rng, what):
    """A text or object array's items dropped, shuffled, reshaped, or one replaced by a huge integer."""
    items = list(node["items"])
    op = rng.random()
    if op < 0.3:
        items.pop(rng.randrange(len(items)))
        return replaced(document, path, dict(node, items=items, shape=[len(items)])), f"{what}: item dropped"
    if op < 0.5:
        rng.shuffle(items)
        return replaced(document, path, dict(node, items=items)), f"{what}: items shuffled"
    if op < 0.75:
        index = rng.randrange(len(items))
        items[index] = rng.choice(HUGE_INTEGERS + (2**63 - 1, 1e308, None, ""))
        return replaced(document, path, dict(node, items=items)), f"{what}[{index}] = {_clip(items[index])}"
    shape = node["shape"] if isinstance(node.get("shape"), list) else [len(items)]
    return replaced(document, path, dict(node, shape=list(reversed(shape)) + [1])), \
        f"{what}: shape changed"


def _clip(value, size=60):
    text = repr(value)
    return text if len(text) <= size else text[:size] + "..."


def string_pool(documents):
    """{state key: every string any document holds there}: swapping in another valid choice of a setting."""
    pool = collections.defaultdict(set)
    for document in documents:
        for path, node in sites(document):
            if isinstance(node, str) and path and isinstance(path[-1], str):
                pool[path[-1]].add(node)
    return {key: sorted(values) for key, values in pool.items()}


# -- the child process --------------------------------------------------------------------------------


def request_bodies(case):
    """Rows a client could send the case's model: real ones, extreme values and missing values."""
    import service
    import families as coverage

    x, _ = coverage.CASES[case][1]()
    rows = service.to_jsonable(x[:3] if not hasattr(x, "iloc") else x.iloc[:3])
    if not isinstance(rows[0], list):                     # text or labels: a list of strings
        return [rows, ["", "zzz unknown words", rows[0] * 3]]
    bodies = [rows]
    for value in (0, 1e300, -1e300, -1, None):
        bodies.append([[value if isinstance(item, (int, float)) or item is None else item for item in row]
                       for row in rows[:1]])
    bodies.append([[item for item in rows[0]] + [0]])       # one feature too many
    return bodies


def evaluate(case, path, bodies):
    """Load a mutant as the store would (within FUZZ_LIMITS), warm it as --preload would, and call every
    method as a request would: the outcome."""
    import service

    stat = os.stat(path)
    ref = service.ArtifactRef(case, 1, path, "model.json", ".json", stat.st_size, stat.st_mtime_ns)
    options = service.LoadOptions(json_limits=service.JsonLimits(**FUZZ_LIMITS))
    try:
        model = service._build_model(ref, options)
    except service.ArtifactError as error:
        if str(error).startswith(f"cannot load {ref.file} as json:"):   # the loader's wrapper, not the decoder
            return {"outcome": "error", "detail": f"load: not refused by the decoder: {str(error)[:300]}"}
        return {"outcome": "refused", "detail": str(error)[:300]}
    except BaseException as error:  # every other exception is what the service would answer as a 500
        return {"outcome": "error", "detail": f"load: {type(error).__name__}: {str(error)[:300]}"}
    service._warm(model, None)      # what --preload does: a row of zeros of the model's width, failures logged
    answered = 0
    for method in model.methods:
        for body in bodies:
            try:
                inputs = service.model_inputs(model, body, max_rows=1000)
                service.dumps(service.to_jsonable(model.call(method, inputs)))
                answered += 1
            except service.ServiceError as error:
                if error.status >= 500:
                    return {"outcome": "error", "detail": f"{method}: {error.status} {error.message[:300]}"}
            except BaseException as error:  # the service's 500
                return {"outcome": "error", "detail": f"{method}: {type(error).__name__}: {str(error)[:300]}"}
    return {"outcome": "served", "detail": f"{answered} calls answered"}


def _resident_memory():
    """The child's resident memory now, in bytes, with its peak reset to it (Linux's clear_refs: the peak
    getrusage reports would include the memory of the process the child was forked from)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _peak_memory()


def _peak_memory():
    """The child's peak resident memory since _resident_memory, in bytes."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def worker():
    """Read {"case", "path"} lines, answer one outcome line each; "selftest" crashes, hangs or grows on purpose."""
    import logging
    import warnings

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                          # nothing the model prints can garble the answers
    sys.path[:0] = [ROOT, HERE]
    warnings.simplefilter("ignore")        # the service runs with Python's default filters, not pytest's
    logging.disable(logging.WARNING)       # a failed warm-up is logged: not an answer
    import service  # noqa: F401  (imported before "ready": start-up time is not a mutant's time)
    import families  # noqa: F401
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    bodies = {}
    for line in sys.stdin:
        request = json.loads(line)
        before = _resident_memory()
        if request.get("selftest") == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if request.get("selftest") == "hang":
            time.sleep(3600)
        if request.get("selftest") == "memory":
            import numpy as np
            held = np.arange((MEMORY_BUDGET + (64 << 20)) // 8)      # written, and no two pages alike
            result = {"outcome": "served", "detail": f"held {held.nbytes >> 20} MiB"}
            del held
        else:
            case = request["case"]
            if case not in bodies:
                bodies[case] = request_bodies(case)
                before = _resident_memory()
            result = evaluate(case, request["path"], bodies[case])
        grown = _peak_memory() - before
        if grown > MEMORY_BUDGET and result["outcome"] in FINE:
            result = {"outcome": "memory", "detail": f"peak memory grew {grown >> 20} MiB ({result['detail']})"}
        reply.write(json.dumps(result) + "\n")
        reply.flush()


class Worker:
    """The long-lived child: one mutant at a time, with a time limit; restarted after a crash or hang, and
    every RESTART_EVERY mutants (its peak memory is then measured afresh)."""

    def __init__(self, timeout):
        self.timeout, self.process, self.asked = timeout, None, 0

    def start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="")
        self.process = subprocess.Popen(["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        cwd=ROOT, env=env, text=True, bufsize=1,
                                        preexec_fn=_limit_memory)
        self.asked = 0
        ready, _, _ = select.select([self.process.stdout], [], [], 300)
        if not ready or not self.process.stdout.readline():
            raise RuntimeError("the fuzzing worker did not start")

    def ask(self, request, timeout=None):
        if self.process is not None and self.asked >= RESTART_EVERY:
            self.stop()
        if self.process is None:
            self.start()
        self.asked += 1
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout or self.timeout)
        line = self.process.stdout.readline() if ready else None
        if line:
            return json.loads(line)
        if not ready:
            self.stop()
            return {"outcome": "hang", "detail": f"no answer within {timeout or self.timeout} s"}
        code = self.process.wait()
        self.stop()
        return {"outcome": "crash", "detail": f"child died: {signal.Signals(-code).name if code < 0 else code}"}

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
            self.process = None


def _limit_memory():
    """A forged size must fail as MemoryError in the child, not exhaust the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


class Tally:
    """Outcomes counted, findings kept (and saved), progress printed: shared by both fuzzers."""

    def __init__(self, seed, save=None, progress=None):
        self.seed, self.save, self.progress = seed, save, progress
        self.counts, self.findings, self.started = collections.Counter(), [], time.monotonic()

    def add(self, number, case, changes, text, result):
        self.counts[result["outcome"]] += 1
        if result["outcome"] in FINDINGS:
            finding = {"number": number, "case": case, "changes": changes, **result}
            self.findings.append(finding)
            if self.progress:
                print(f"FINDING {finding['outcome']} #{number} {case}: {finding['detail'][:200]}\n"
                      f"    after: {'; '.join(changes)}", file=sys.stderr, flush=True)
            if self.save:
                os.makedirs(self.save, exist_ok=True)
                with open(os.path.join(self.save, f"finding-{self.seed}-{number}.json"), "w",
                          encoding="utf-8") as handle:
                    handle.write(text)
        if self.progress and (number + 1) % self.progress == 0:
            print(f"{number + 1} mutants, {dict(self.counts)}, {time.monotonic() - self.started:.0f} s",
                  file=sys.stderr, flush=True)

    def report(self, mutations):
        return {"counts": dict(self.counts), "findings": self.findings, "mutations": mutations,
                "seconds": time.monotonic() - self.started}


def print_report(report, seed):
    """Every finding, then one line of counts; the exit code (1 when anything was found)."""
    for finding in report["findings"]:
        print(f"FINDING {finding['outcome']} #{finding['number']} {finding['case']}: {finding['detail']}\n"
              f"    after: {'; '.join(finding['changes'])}")
    counts = report["counts"]
    print(f"{report['mutations']} mutants in {report['seconds']:.0f} s (seed {seed}): " +
          ", ".join(f"{outcome} {counts.get(outcome, 0)}" for outcome in FINE + FINDINGS))
    return 1 if report["findings"] else 0


# -- the run ----------------------------------------------------------------------------------------


def run(mutations, seed, timeout=20.0, cases=None, save=None, documents=None, progress=None):
    """Fuzz; returns {"counts": {outcome: n}, "findings": [...], "seconds": s, "mutations": n}."""
    rng = random.Random(seed)
    documents = documents or base_documents(cases)
    names = sorted(documents)
    strings = string_pool(documents.values())
    donors = [site for document in documents.values() for site in sites(document)]
    tally = Tally(seed, save, progress)
    worker = Worker(timeout)
    with tempfile.TemporaryDirectory(prefix="json-fuzz-") as folder:
        path = os.path.join(folder, "model.json")
        try:
            for number in range(mutations):
                name = rng.choice(names)
                mutant, changes = documents[name], []
                for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3))):
                    mutant, change = mutate(mutant, rng, donors, strings)
                    changes.append(change)
                text = json.dumps(mutant)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
                tally.add(number, name, changes, text, worker.ask({"case": case_of(name), "path": path}))
        finally:
            worker.stop()
    return tally.report(mutations)


def command_line(doc, count, what):
    """Both fuzzers' options: `count` (how many documents), --seed, --timeout, --cases and --save."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(count, type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20.0, help=f"seconds one {what} may take (default 20)")
    parser.add_argument("--cases", help="comma-separated coverage cases (default: all)")
    parser.add_argument("--save", metavar="DIR", help="write each finding's file here")
    return parser


def main(argv=None):
    parser = command_line(__doc__, "--mutations", "mutant")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.worker:
        worker()
        return 0
    sys.path[:0] = [ROOT, HERE]
    report = run(arguments.mutations, arguments.seed, arguments.timeout,
                 arguments.cases.split(",") if arguments.cases else None, arguments.save, progress=500)
    return print_report(report, arguments.seed)


if __name__ == "__main__":
    sys.exit(main())
