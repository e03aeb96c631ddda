"""A second, independent fuzzer for JSON models: parts generated from the format's grammar by Hypothesis.

tests/json_fuzz.py changes a valid model a value at a time.  This one builds what goes in: at a site of a
valid model (an attribute, an array, a member, a tree), a new node drawn from the format's grammar (every
node type, nested, with Hypothesis's boundary-seeking integers and floats, every dtype name of the format
and hostile ones, shapes that do and do not match their data) or, where a tree or histogram predictor was,
a new structure generated node by node: almost-trees (a child pointing back, at itself, at a shared node
or past the end; a missing child), features at and past the width, NaN and infinite thresholds, flags
that are not 0 or 1, columns of other dtypes or lengths, values of other shapes, in the current format or
as version 1 records.  It shares nothing with the mutator but the child process that judges each document
(json_fuzz.Worker: the same outcomes, limits, warm-up and memory check), and Hypothesis shrinks a finding
to a smallest document that still fails.

    nice -n 19 python tests/json_generate.py --examples 50000 --seed 7

prints the count of each outcome and, if any, the shrunk finding.  Counts are exact when nothing is found;
after a finding they include Hypothesis's shrinking attempts.
"""

import base64
import itertools
import json
import math
import os
import sys
import tempfile

import json_fuzz


def strategies():
    """The grammar's strategies, built once Hypothesis and service are imported: {name: strategy}."""
    from hypothesis import strategies as st
    import service

    integers = st.one_of(st.integers(-3, 64), st.sampled_from(json_fuzz.INTEGERS + json_fuzz.HUGE_INTEGERS),
                         st.integers())
    floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from((0.0, -0.0, 1e308, 5e-324)))
    plain = st.one_of(st.none(), st.booleans(), integers, floats, st.text(max_size=6))
    names = st.sampled_from(service.JSON_DTYPES + ("|O", "<U1", "<U12") + json_fuzz.HOSTILE_DTYPES)

    @st.composite
    def ndarray(draw, children):
        dtype = draw(names)
        shape = draw(st.lists(st.one_of(st.integers(0, 5), st.sampled_from((2**31, 2**40, 10**20))), max_size=3))
        node = {"$type": "ndarray", "dtype": dtype, "shape": shape}
        if isinstance(dtype, str) and dtype in service.JSON_DTYPES:
            size = math.prod(shape) * int(dtype[2:]) if dtype[1] != "b" else math.prod(shape)
            exact = size <= 4096 and draw(st.booleans())
            node["data"] = base64.b64encode(draw(st.binary(min_size=size, max_size=size) if exact else
                                                 st.binary(max_size=64))).decode()
            if draw(st.integers(0, 9)) == 0:
                node["order"] = draw(st.sampled_from(("F", "X", 1)))
        else:
            node["items"] = draw(st.lists(children, max_size=6))
        return node

    def tagged(children):
        items = st.lists(children, max_size=4)
        pairs = st.lists(st.tuples(st.one_of(st.text(max_size=6), integers), children).map(list), max_size=4)
        return st.one_of(
            ndarray(children),
            st.builds(lambda d, b: {"$type": "scalar", "dtype": d, "data": base64.b64encode(b).decode()},
                      names, st.binary(max_size=16)),
            st.sampled_from(("nan", "inf", "-inf", "1e400", "NaN")).map(lambda v: {"$type": "float", "value": v}),
            st.builds(lambda t, i: {"$type": t, "items": i}, st.sampled_from(("tuple", "set", "frozenset", "slice")),
                      items),
            st.builds(lambda t, p: {"$type": t, "items": p}, st.sampled_from(("dict", "bunch")), pairs),
            names.map(lambda d: {"$type": "dtype", "dtype": d}),
            st.sampled_from(service._NUMPY_TYPES + ("object_", "void")).map(lambda n: {"$type": "type", "name": n}),
            st.builds(lambda c, a: {"$type": "object", "class": c, "args": a},
                      st.sampled_from(sorted(service.JSON_OBJECTS) + sorted(service.JSON_STRUCTURES)), items),
            st.builds(lambda c, s: {"$type": "object", "class": c, "state": s},
                      st.sampled_from(sorted(service.JSON_OBJECTS)), children),
            st.builds(lambda c, s: {"$type": "estimator", "class": c, "state": s},
                      st.sampled_from(sorted(service.JSON_ESTIMATORS)), st.dictionaries(st.text(max_size=8),
                                                                                         children, max_size=4)),
            st.builds(lambda s: {"$type": "random_state", "state": s}, children),
            st.builds(lambda g, s: {"$type": "generator", "bit_generator": g, "state": s},
                      st.sampled_from(service.JSON_BIT_GENERATORS), children),
            st.builds(lambda c, d, n, m, p: {"$type": "neighbors_tree", "class": c, "data": d, "leaf_size": n,
                                             "metric": m, "metric_params": p},
                      st.sampled_from(service.JSON_NEIGHBOR_TREES), children, integers,
                      st.sampled_from(("euclidean", "minkowski", "haversine", "x")), children),
            st.builds(lambda a, k: {"$type": "partial", "function": "sklearn.utils.check_array", "args": a,
                                    "keywords": k}, items, pairs),
        )

    nodes = st.recursive(plain, lambda children: st.one_of(st.lists(children, max_size=4), tagged(children)),
                         max_leaves=12)
    return {"nodes": nodes, "integers": integers}


# What one generated structure gets wrong (at most one thing, so that what follows it is reached too).
FAULTS = ("none", "none", "children", "children", "empty", "feature", "threshold", "flag", "column", "value",
          "n_features", "n_classes", "bitsets")
TREE_FIELDS = {"left_child": "<i8", "right_child": "<i8", "feature": "<i8", "threshold": "<f8", "impurity": "<f8",
               "n_node_samples": "<i8", "weighted_n_node_samples": "<f8", "missing_go_to_left": "|u1"}
PREDICTOR_FIELDS = {"value": "<f8", "count": "<u4", "feature_idx": "<i8", "num_threshold": "<f8",
                    "missing_go_to_left": "|u1", "left": "<u4", "right": "<u4", "gain": "<f8", "is_leaf": "|u1",
                    "bin_threshold": "|u1", "is_categorical": "|u1", "bitset_idx": "<u4"}


def layout(draw, most, leaf_child):
    """(left, right, is_leaf) of a random tree of at most `most` nodes, laid out depth first as scikit-learn
    lays trees out."""
    from hypothesis import strategies as st

    left, right, leaf = [leaf_child] * most, [leaf_child] * most, [True] * most
    stack, free = [0], 1
    while stack:
        index = stack.pop()
        if free + 2 <= most and draw(st.integers(0, 3)):
            left[index], right[index], leaf[index] = free, free + 1, False
            stack += [free + 1, free]
            free += 2
    return left[:free], right[:free], leaf[:free]


def broken_children(draw, left, right, leaf):
    """One inner node's child pointed back, at itself, at another's child, past the end or nowhere."""
    from hypothesis import strategies as st

    inner = [index for index, is_leaf in enumerate(leaf) if not is_leaf]
    index = draw(st.sampled_from(inner or [0]))
    count = len(left)
    side = draw(st.sampled_from((left, right)))
    side[index] = draw(st.sampled_from((0, index, max(index - 1, 0), count - 1, count, count + 1, -1, -2,
                                        2**31 - 1, 2**32 - 1, left[index], right[index])))


def structures(kind, hints, records=False):
    """A tree or histogram predictor (`kind`) in the current format, generated node by node after `hints`
    (n_features, n_classes per output), with at most one fault (FAULTS); with `records`, its node fields
    whole (to be written as version 1 records)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        import numpy as np

        predictor = kind == "tree_predictor"
        fault = draw(st.sampled_from([f for f in FAULTS if not records or f != "column"]))
        n_features = hints[0]
        left, right, leaf = layout(draw, draw(st.integers(1, 31)), 0 if predictor else -1)
        if fault == "children":
            broken_children(draw, left, right, leaf)
        finite = st.one_of(st.floats(allow_nan=False), st.sampled_from((0.0, -0.0, 5e-324)))
        inner = [index for index, is_leaf in enumerate(leaf) if not is_leaf] or [0]
        columns = {"feature": [draw(st.integers(0, n_features - 1)) if not is_leaf else 0 if predictor else -2
                               for is_leaf in leaf],
                   "threshold": [draw(finite) for _ in leaf],
                   "missing_go_to_left": [draw(st.integers(0, 1)) for _ in leaf]}
        if fault == "feature":
            columns["feature"][draw(st.sampled_from(inner))] = draw(st.sampled_from((n_features, -1, -2, 2**31)))
        if fault == "threshold":
            columns["threshold"][draw(st.sampled_from(inner))] = math.nan
        if fault == "flag":
            columns["missing_go_to_left"][draw(st.sampled_from(inner))] = draw(st.integers(2, 255))
        if predictor:
            node, types = _predictor(draw, fault, columns, left, right, leaf), dict(PREDICTOR_FIELDS)
        else:
            node, types = _tree(draw, fault, columns, left, right, hints), dict(TREE_FIELDS)
        if fault == "empty":
            node["nodes"] = {key: [] for key in node["nodes"]}
        if fault == "column":
            _break_column(draw, node["nodes"], types)
        with np.errstate(all="ignore"):
            node["nodes"] = {key: json_fuzz.array_node(np.array(values, dtype=np.float64 if types[key][1] == "f"
                                                                else np.int64).astype(types[key]))
                             for key, values in node["nodes"].items()}
        return node
    return build()


def _tree(draw, fault, columns, left, right, hints):
    """A tree node of these columns, its values of the hinted outputs and classes (one fault may change them)."""
    from hypothesis import strategies as st
    import numpy as np

    n_features, n_classes = hints
    count, outputs, widest = len(left), len(n_classes), max(n_classes)
    rows = max(count + (draw(st.sampled_from((1, -1))) if fault == "value" else 0), 0)
    values = draw(st.lists(st.floats(0, 100), min_size=rows * outputs * widest, max_size=rows * outputs * widest))
    node = {"$type": "tree", "n_features": n_features, "n_classes": list(n_classes),
            "value": json_fuzz.array_node(np.array(values, dtype=np.float64).reshape(rows, outputs, widest)),
            "nodes": {"left_child": left, "right_child": right, "feature": columns["feature"],
                      "threshold": columns["threshold"], "impurity": [0.0] * count, "n_node_samples": [1] * count,
                      "weighted_n_node_samples": [1.0] * count, "missing_go_to_left": columns["missing_go_to_left"]}}
    if fault == "n_features":
        node["n_features"] = draw(st.sampled_from((n_features + 1, 2**27, 0, -1, 2**63 - 1)))
    if fault == "n_classes":
        node["n_classes"] = draw(st.sampled_from(([widest + 1] * outputs, [0], [], list(n_classes) + [1], [2**62])))
    return node


def _predictor(draw, fault, columns, left, right, leaf):
    """A predictor node of these columns and its categorical bitsets (one fault may break those)."""
    from hypothesis import strategies as st
    import numpy as np

    count = len(left)
    splits = draw(st.integers(0, 3))
    nodes = {"value": [draw(st.floats(-10, 10)) for _ in leaf], "count": [1] * count,
             "feature_idx": columns["feature"], "num_threshold": columns["threshold"],
             "missing_go_to_left": columns["missing_go_to_left"], "left": [v % 2**32 for v in left],
             "right": [v % 2**32 for v in right], "gain": [0.0] * count, "is_leaf": [int(v) for v in leaf],
             "bin_threshold": [0] * count, "is_categorical": [0] * count,
             "bitset_idx": [draw(st.integers(0, max(splits - 1, 0))) for _ in leaf]}
    width, dtype = 8, "<u4"
    if fault == "bitsets":
        nodes["is_categorical"][draw(st.integers(0, count - 1))] = 1
        nodes["bitset_idx"] = [draw(st.sampled_from((splits, splits + 1, 2**32 - 1))) for _ in leaf]
        width, dtype = draw(st.sampled_from((8, 7))), draw(st.sampled_from(("<u4", "<i4")))
    if fault == "flag":
        nodes[draw(st.sampled_from(("is_leaf", "is_categorical")))][draw(st.integers(0, count - 1))] = 2
    node = {"$type": "tree_predictor", "nodes": nodes}
    for key in ("binned_left_cat_bitsets", "raw_left_cat_bitsets"):
        node[key] = json_fuzz.array_node(np.zeros((splits, width), dtype=dtype))
    return node


def _break_column(draw, nodes, types):
    """One node field of another dtype or length, missing, or one the loader computes given too."""
    from hypothesis import strategies as st

    name = draw(st.sampled_from(sorted(nodes)))
    broken = draw(st.sampled_from(("dtype", "length", "missing", "extra")))
    if broken == "dtype":
        types[name] = draw(st.sampled_from(("<f4", "<i4", ">i8", "<u8", "|u1")))
    elif broken == "length":
        nodes[name] = list(nodes[name]) + [0]
    elif broken == "missing":
        del nodes[name]
    else:
        nodes["depth"], types["depth"] = [2**31] * len(nodes[name]), "<u4"


def hints_of(node):
    """(n_features, n_classes per output) of a structure site, in either format (a predictor's: a guess)."""
    if node.get("$type") == "tree":
        return node["n_features"], node["n_classes"]
    if node.get("args"):
        return node["args"][0], json_fuzz.read_array(node["args"][1]).tolist()
    return 4, [1]


def documents_to_try(grammar, documents):
    """Hypothesis's strategy of (document name, what was put where, the document): half the time one of the
    document's trees or predictors generated anew, else any site given a node of the grammar."""
    from hypothesis import strategies as st
    import service

    names = sorted(documents)
    places = {name: json_fuzz.sites(documents[name])[1:] for name in names}
    structures_at = {name: [(path, node) for path, node in places[name] if isinstance(node, dict) and (
        node.get("$type") in ("tree", "tree_predictor") or node.get("class") in service.JSON_STRUCTURES)]
        for name in names}

    @st.composite
    def document(draw):
        name = draw(st.sampled_from(names))
        if structures_at[name] and draw(st.booleans()):
            path, node = draw(st.sampled_from(structures_at[name]))
            version_1 = node.get("$type") == "object"
            replacement = draw(structures(service.JSON_STRUCTURES[node["class"]] if version_1 else node["$type"],
                                          hints_of(node), records=version_1))
            if version_1:
                replacement = json_fuzz.as_version_1(replacement)
        else:
            path, node = draw(st.sampled_from(places[name]))
            replacement = draw(grammar["integers"] if type(node) is int and draw(st.booleans()) else grammar["nodes"])
        what = ".".join(map(str, path)) + f" = {json_fuzz._clip(replacement, 120)}"
        return name, what, json_fuzz.replaced(documents[name], path, replacement)
    return document()


def run(examples, seed, timeout=20.0, cases=None, save=None, documents=None, progress=None):
    """Generate `examples` documents and judge each; returns json_fuzz.run's report (its "mutations": examples)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as seeded

    documents = documents or json_fuzz.base_documents(cases)
    grammar = strategies()
    tally = json_fuzz.Tally(seed, save, progress)
    worker = json_fuzz.Worker(timeout)
    numbers = itertools.count()
    with tempfile.TemporaryDirectory(prefix="json-generate-") as folder:
        path = os.path.join(folder, "model.json")

        @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet)
        @seeded(seed)
        @given(documents_to_try(grammar, documents))
        def judge(tried):
            name, what, document = tried
            text = json.dumps(document)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            result = worker.ask({"case": json_fuzz.case_of(name), "path": path})
            tally.add(next(numbers), name, [what], text, result)
            assert result["outcome"] in json_fuzz.FINE, f"{name}: {what}: {result}"

        try:
            judge()
        except AssertionError as error:
            tally.findings.append({"number": "shrunk", "case": "", "changes": [], "outcome": "smallest",
                                   "detail": str(error)[:2000]})
        finally:
            worker.stop()
    return tally.report(next(numbers))


def main(argv=None):
    arguments = json_fuzz.command_line(__doc__, "--examples", "document").parse_args(argv)
    sys.path[:0] = [json_fuzz.ROOT, json_fuzz.HERE]
    report = run(arguments.examples, arguments.seed, arguments.timeout,
                 arguments.cases.split(",") if arguments.cases else None, arguments.save, progress=500)
    return json_fuzz.print_report(report, arguments.seed)


if __name__ == "__main__":
    sys.exit(main())
