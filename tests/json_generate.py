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

import argparse
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


def near_tree(draw, count, leaf_child):
    """(left, right, is_leaf) of `count` nodes laid out depth first, as scikit-learn does, then perhaps broken:
    a child pointing back, at itself, at another's child or past the end, or one child missing."""
    from hypothesis import strategies as st

    left, right, leaf = [leaf_child] * count, [leaf_child] * count, [True] * count
    stack, free = [0], 1
    while stack:
        index = stack.pop()
        if free + 2 <= count and draw(st.booleans()):
            left[index], right[index], leaf[index] = free, free + 1, False
            stack += [free + 1, free]
            free += 2
    for _ in range(draw(st.integers(0, 2))):
        index = draw(st.integers(0, max(count - 1, 0))) if count else 0
        if not count:
            break
        side = draw(st.sampled_from((left, right)))
        side[index] = draw(st.sampled_from((0, index, max(index - 1, 0), count - 1, count, count + 1, leaf_child,
                                            2**31 - 1)))
        leaf[index] = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else leaf[index]
    return left, right, leaf


def structures(original, columns_whole=False):
    """A tree or histogram predictor like `original` (its width and classes as hints), generated whole; with
    `columns_whole`, its node fields all present, of their own dtypes and as long (version 1 records)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        import numpy as np

        count = draw(st.one_of(st.integers(1, 24), st.just(0)))
        predictor = original["$type"] == "tree_predictor"
        left, right, leaf = near_tree(draw, count, 0 if predictor else -1)
        n_features = original.get("n_features", 4)
        features = [draw(st.sampled_from((0, 1, n_features - 1, n_features, -1, -2, 2**31)))
                    if not is_leaf or predictor else -2 for is_leaf in leaf]
        thresholds = draw(st.lists(st.one_of(st.floats(), st.sampled_from((math.nan, math.inf))),
                                   min_size=count, max_size=count))
        if predictor:
            columns = {"value": thresholds, "count": [1] * count, "feature_idx": features, "num_threshold": thresholds,
                       "missing_go_to_left": draw(st.lists(st.integers(0, 2), min_size=count, max_size=count)),
                       "left": [v % 2**32 for v in left], "right": [v % 2**32 for v in right], "gain": [0.0] * count,
                       "is_leaf": [int(v) for v in leaf], "bin_threshold": [0] * count,
                       "is_categorical": draw(st.lists(st.integers(0, 1), min_size=count, max_size=count)),
                       "bitset_idx": draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))}
            types = {"value": "<f8", "count": "<u4", "feature_idx": "<i8", "num_threshold": "<f8",
                     "missing_go_to_left": "|u1", "left": "<u4", "right": "<u4", "gain": "<f8", "is_leaf": "|u1",
                     "bin_threshold": "|u1", "is_categorical": "|u1", "bitset_idx": "<u4"}
        else:
            columns = {"left_child": left, "right_child": right, "feature": features, "threshold": thresholds,
                       "impurity": [0.0] * count, "n_node_samples": [1] * count,
                       "weighted_n_node_samples": [1.0] * count,
                       "missing_go_to_left": draw(st.lists(st.integers(0, 2), min_size=count, max_size=count))}
            types = {"left_child": "<i8", "right_child": "<i8", "feature": "<i8", "threshold": "<f8",
                     "impurity": "<f8", "n_node_samples": "<i8", "weighted_n_node_samples": "<f8",
                     "missing_go_to_left": "|u1"}
        broken = "none" if columns_whole else draw(st.sampled_from(("none", "none", "none", "dtype", "length",
                                                                     "missing", "extra")))
        name = draw(st.sampled_from(sorted(columns)))
        if broken == "dtype":
            types[name] = draw(st.sampled_from(("<f4", "<i4", "|O", ">i8", "<u8")))
        elif broken == "length":
            columns[name] = columns[name] + columns[name][:1] + [0]
        elif broken == "missing":
            del columns[name], types[name]
        elif broken == "extra":
            columns["depth"], types["depth"] = [2**31] * count, "<u4"
        nodes = {}
        for key, values in columns.items():
            with np.errstate(all="ignore"):
                array = np.array([v if types[key] != "|O" else 0 for v in values]).astype(
                    types[key] if types[key] != "|O" else "<i8")
            nodes[key] = json_fuzz.array_node(array) if types[key] != "|O" else \
                {"$type": "ndarray", "dtype": "|O", "shape": [len(values)], "items": list(values)}
        node = {"$type": original["$type"], "nodes": nodes}
        if predictor:
            for key in ("binned_left_cat_bitsets", "raw_left_cat_bitsets"):
                node[key] = json_fuzz.array_node(np.zeros((draw(st.integers(0, 3)), draw(st.sampled_from((8, 7)))),
                                                          dtype=draw(st.sampled_from(("<u4", "<u4", "<i4")))))
        else:
            outputs, classes = draw(st.integers(1, 2)), draw(st.integers(1, 3))
            rows = count + draw(st.sampled_from((0, 0, 0, 1, -1)))
            node["value"] = json_fuzz.array_node(np.zeros((max(rows, 0), outputs, classes)))
            node["n_features"] = draw(st.sampled_from((n_features, n_features, n_features + 1, 2**27, 0, -1)))
            node["n_classes"] = draw(st.sampled_from(([classes] * outputs, [classes + 1] * outputs, [0], [],
                                                      [classes] * outputs + [1])))
        return node
    return build()


def documents_to_try(grammar, documents):
    """Hypothesis's strategy of (document name, what was put where, the document)."""
    from hypothesis import strategies as st
    import service

    names = sorted(documents)
    places = {name: json_fuzz.sites(documents[name])[1:] for name in names}

    @st.composite
    def document(draw):
        name = draw(st.sampled_from(names))
        path, node = draw(st.sampled_from(places[name]))
        if isinstance(node, dict) and node.get("$type") in ("tree", "tree_predictor") and draw(st.booleans()):
            replacement = draw(structures(node))
        elif isinstance(node, dict) and node.get("class") in service.JSON_STRUCTURES and draw(st.booleans()):
            replacement = json_fuzz.as_version_1(draw(structures({"$type": service.JSON_STRUCTURES[node["class"]]},
                                                                 columns_whole=True)))
        elif type(node) is int and draw(st.booleans()):
            replacement = draw(grammar["integers"])
        else:
            replacement = draw(grammar["nodes"])
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds one document may take (default 20)")
    parser.add_argument("--cases", help="comma-separated coverage cases (default: all)")
    parser.add_argument("--save", metavar="DIR", help="write each finding's file here")
    arguments = parser.parse_args(argv)
    sys.path[:0] = [json_fuzz.ROOT, json_fuzz.HERE]
    report = run(arguments.examples, arguments.seed, arguments.timeout,
                 arguments.cases.split(",") if arguments.cases else None, arguments.save, progress=500)
    return json_fuzz.print_report(report, arguments.seed)


if __name__ == "__main__":
    sys.exit(main())
