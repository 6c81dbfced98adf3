"""The interface check (issue 13): what a model accepts is part of what it computes. Each case
passed verification before: a candidate that folded an overridable weight and dropped it as an
input, one that keeps the input but ignores it, one that fixed a dynamic batch to 1."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import VerifyStatus
from bnfold.api import fold_onnx
from bnfold.verify import verify
from conftest import bn_stats

F32 = TensorProto.FLOAT


def model(rng, *, batch="N", overridable=("W",), x_type=F32, out_type=F32) -> onnx.ModelProto:
    """x (batch, 3, 6, 6) -> Conv(W, B) -> BN -> Relu -> out; the ``overridable`` initializers are
    also graph inputs (IR 8)."""
    rng = np.random.default_rng(7) if rng is None else rng
    inits = {
        "W": rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32),
        "B": rng.normal(0, 1, 4).astype(np.float32),
        **dict(zip(("g", "beta", "mean", "var"), bn_stats(rng, 4))),
    }
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=F32),
        helper.make_node("Conv", ["xf", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["z"]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Cast", ["r"], ["out"], to=out_type),
    ]
    inputs = [helper.make_tensor_value_info("x", x_type, [batch, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(n, F32, list(inits[n].shape)) for n in overridable]
    g = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("out", out_type, [batch, 4, 6, 6])],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def same_model(**changes) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    return model(np.random.default_rng(3)), model(np.random.default_rng(3), **changes)


def test_bnfold_keeps_an_overridable_weight_and_passes():
    ref = model(np.random.default_rng(3))
    result = fold_onnx(ref, verify=True)  # the pass refuses to bake an overridable weight in
    assert not result.report.folded and result.verification.passed


def test_an_overridable_weight_folded_away_fails():
    ref = model(np.random.default_rng(3))
    cand = model(np.random.default_rng(3), overridable=())
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and "['W']" in report.message
    assert "no longer inputs of the candidate" in report.message


def test_an_overridable_weight_kept_as_input_but_ignored_fails():
    """The candidate reads a baked copy of W: W is still an input, but feeding it changes nothing."""
    ref = model(np.random.default_rng(3))
    cand = model(np.random.default_rng(3))
    w = next(t for t in cand.graph.initializer if t.name == "W")
    cand.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w), "W_baked"))
    conv = next(n for n in cand.graph.node if n.op_type == "Conv")
    conv.input[1] = "W_baked"
    assert verify(ref, ref).passed
    report = verify(ref, cand)
    assert (
        report.status is VerifyStatus.FAILED and "does not use them as the reference does" in report.message
    )
    assert "['W']" in report.message


@pytest.mark.parametrize(
    "changes, says",
    [
        (
            {"batch": 1},
            "input 'x' dimension 0 is dynamic ('N') in the reference, fixed to 1 in the candidate",
        ),
        ({"x_type": TensorProto.DOUBLE}, "input 'x' is float in the reference, double in the candidate"),
        ({"out_type": TensorProto.DOUBLE}, "output 'out' is float in the reference, double in the candidate"),
    ],
    ids=["batch-fixed", "input-type", "output-type"],
)
def test_interface_changes_fail_with_a_sentence(changes, says):
    ref, cand = same_model(**changes)
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and says in report.message


def test_an_input_dropped_or_added_fails():
    ref, cand = same_model()
    extra = onnx.ModelProto()
    extra.CopyFrom(cand)
    extra.graph.input.append(helper.make_tensor_value_info("y", F32, [1]))
    report = verify(ref, extra)
    assert (
        report.status is VerifyStatus.FAILED and "candidate input(s) ['y'] are not inputs" in report.message
    )
    report = verify(extra, cand)
    assert (
        report.status is VerifyStatus.FAILED
        and "input 'y' of the reference is not an input" in report.message
    )


def test_rank_change_fails():
    ref, cand = same_model()
    cand.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 1
    report = verify(ref, cand)
    assert (
        report.status is VerifyStatus.FAILED and "input 'x' has rank 4 in the reference, 5" in report.message
    )
