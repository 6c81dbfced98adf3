"""The verifier on folds made by other tools (issue 13): onnxoptimizer, onnxsim and onnxslim fold
the zoo's BNs their own way (onnxsim and onnxoptimizer let the Conv keep its own output name).
Their correct folds must pass; a 1e-3 fault in one channel of one of their folds must fail, named.
onnxoptimizer leaves the folded weights as run-time Mul/Div/Sqrt nodes (so no static weights check
there): the fault is an Add on the bias, which works whatever computes it.

Before correspondence by meaning, 48 of the 60 onnxoptimizer/onnxsim folds of the zoo failed
(every model whose BN follows a Conv); onnxslim keeps the BN's output name and passed.
Needs the ``bench`` extra (the peer tools) and torch (the zoo); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.verify import verify

pytest.importorskip("torch")
registry = pytest.importorskip("models.registry")

MODELS = ["resnet-basic", "mobilenetv2", "detection-head"]


def _onnxoptimizer(m: onnx.ModelProto) -> onnx.ModelProto:
    onnxoptimizer = pytest.importorskip("onnxoptimizer", reason="peer tool not installed (bench extra)")
    return onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])


def _onnxsim(m: onnx.ModelProto) -> onnx.ModelProto:
    onnxsim = pytest.importorskip("onnxsim", reason="peer tool not installed (bench extra)")
    return onnxsim.simplify(m)[0]


def _onnxslim(m: onnx.ModelProto) -> onnx.ModelProto:
    onnxslim = pytest.importorskip("onnxslim", reason="peer tool not installed (bench extra)")
    return onnxslim.slim(m)


PEERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxoptimizer": _onnxoptimizer,
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
}


def peer_fold(peer: str, model: onnx.ModelProto) -> onnx.ModelProto:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return PEERS[peer](work)


def fold_points(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(candidate Conv, the reference BN output it now computes) for every Conv+BN the peer folded."""
    bn_of = {n.input[0]: n.output[0] for n in reference.graph.node if n.op_type == "BatchNormalization"}
    produced = {o for n in candidate.graph.node for o in n.output}
    points = []
    for node in candidate.graph.node:
        if node.op_type != "Conv":
            continue
        y = node.output[0]
        if y in bn_of.values():
            points.append((node, y))
        elif y in bn_of and bn_of[y] not in produced:
            points.append((node, bn_of[y]))
    return points


def peer_case(
    peer: str, name: str
) -> tuple[onnx.ModelProto, onnx.ModelProto, list[tuple[onnx.NodeProto, str]]]:
    """(the zoo model, the peer's fold of it, the peer's fold points)."""
    reference = onnx.load(str(registry.build_onnx(name)))
    candidate = peer_fold(peer, reference)
    return reference, candidate, fold_points(reference, candidate)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_correct_peer_folds_pass(peer, name):
    reference, candidate, points = peer_case(peer, name)
    report = verify(reference, candidate)
    assert report.passed, report.message
    assert points and all(w.passed for w in report.weights)
    if peer != "onnxoptimizer":  # constant weights: statically checked where the layers match
        assert report.weights
    compared = {d.name for d in report.intermediates}
    assert {y for _, y in points} <= compared, "every fold point is compared at runtime"
    if peer != "onnxslim":  # they keep the Conv's name: the fold points are aliases
        assert report.matched.get("fold-alias", 0) >= len(points)


def renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every intermediate tensor renamed (``t0``, ``t1``...), as most tools do."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = {v.name for v in (*out.graph.input, *out.graph.output)} | {t.name for t in out.graph.initializer}
    names: dict[str, str] = {}
    for node in out.graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        for k, o in enumerate(node.output):
            if o and o not in keep:
                names[o] = f"t{len(names)}"
                node.output[k] = names[o]
    del out.graph.value_info[:]
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_correct_peer_folds_with_every_name_changed_pass_matched_by_structure(peer, name):
    reference, candidate, points = peer_case(peer, name)
    report = verify(reference, renamed(candidate))
    assert report.passed, report.message
    compared = {d.name for d in report.intermediates if d.matched_by == "structure"}
    assert {y for _, y in points} <= compared, "every fold point is compared at runtime"


@pytest.mark.parametrize("names", ["shared", "renamed"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_a_fault_in_one_channel_of_a_peer_fold_is_caught_and_named(peer, name, names):
    reference, candidate, points = peer_case(peer, name)
    node, y = points[len(points) // 2]
    bn = next(n for n in reference.graph.node if n.output[0] == y)
    inits = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    gamma, beta = inits[bn.input[1]], inits[bn.input[2]]
    delta = np.zeros_like(beta)
    delta[1] = 1e-3 * (abs(gamma[1]) + abs(beta[1]))  # ~1e-3 of channel 1's magnitude
    candidate.graph.initializer.append(numpy_helper.from_array(delta, f"{y}__delta"))
    at = list(candidate.graph.node).index(node)  # after whatever computes the bias
    candidate.graph.node.insert(at, helper.make_node("Add", [node.input[2], f"{y}__delta"], [f"{y}__fault"]))
    node.input[2] = f"{y}__fault"
    report = verify(reference, candidate if names == "shared" else renamed(candidate))
    assert not report.passed and y in report.first_divergent
