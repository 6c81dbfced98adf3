"""Correspondence by meaning (issue 13): a name the candidate kept after another tool folded the BN
behind it (onnxsim, onnxoptimizer: the Conv keeps its own output name, which now holds the
post-BN values) is paired with the reference tensor it holds, confirmed on the first sample.

Before, such a tensor was compared with the reference's pre-BN tensor of the same name: a false
alarm on a correct fold. The candidates here are written with onnx.helper the way those tools
write them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import VerifyStatus
from bnfold.verify import verify
from conftest import bn_stats

F32 = TensorProto.FLOAT


def _bn_affine(rng, c):
    gamma, beta, mean, var = (a.astype(np.float64) for a in bn_stats(rng, c))
    s = gamma / np.sqrt(var + 1e-5)
    return (gamma, beta, mean, var), s, beta - mean * s


def conv_bn_pair(rng, *, fault: float = 0.0, keep_conv_name: bool = True):
    """Reference: x -> Conv (writes c) -> BN (writes z) -> Relu -> out. Candidate: the BN folded
    into the Conv, which writes ``c`` (peer convention) or ``z``; ``fault`` scales channel 1."""
    w = rng.normal(0, 1, (6, 3, 3, 3))
    b = rng.normal(0, 1, 6)
    stats, s, t = _bn_affine(rng, 6)
    ref_nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["z"]),
        helper.make_node("Relu", ["z"], ["out"]),
    ]
    ref_inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip("WB", (w, b))] + [
        numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip(("g", "beta", "mean", "var"), stats)
    ]
    w2, b2 = w * s[:, None, None, None], b * s + t
    w2[1] *= 1 + fault
    kept = "c" if keep_conv_name else "z"
    cand_nodes = [
        helper.make_node("Conv", ["x", "W", "B"], [kept], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [kept], ["out"]),
    ]
    cand_inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip("WB", (w2, b2))]
    return _model(ref_nodes, ref_inits, [1, 3, 8, 8]), _model(cand_nodes, cand_inits, [1, 3, 8, 8])


def _model(nodes, inits, shape, out_shape=(1, 6, 8, 8)):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, shape)],
        [helper.make_tensor_value_info("out", F32, list(out_shape))],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_conv_keeping_its_name_after_absorbing_the_bn_is_compared_with_the_bn_output(rng):
    ref, cand = conv_bn_pair(rng)
    report = verify(ref, cand)
    assert report.passed, report.message
    (alias,) = report.intermediates
    assert (alias.name, alias.matched_by, alias.passed) == ("z", "fold-alias", True)
    assert report.matched == {"fold-alias": 1}
    (weights,) = report.weights  # the static check sees the alias fold point too
    assert weights.name == "z" and weights.passed


def test_a_wrong_fold_behind_a_kept_name_is_caught_at_that_tensor(rng):
    ref, cand = conv_bn_pair(rng, fault=1e-3)
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and report.first_divergent == ("z",)
    (alias,) = report.intermediates
    assert alias.matched_by == "fold-alias" and not alias.passed and alias.worst_channel == 1
    (weights,) = report.weights
    assert weights.name == "z" and not weights.passed and weights.worst_channel == 1


def test_a_fold_under_float32_noise_behind_a_kept_name_is_caught_by_the_weights_check(rng):
    ref, cand = conv_bn_pair(rng, fault=1e-5)
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and report.first_divergent == ("z",)
    assert report.intermediates[0].passed and not report.weights[0].passed


def test_the_bn_output_name_kept_is_matched_by_name(rng):
    ref, cand = conv_bn_pair(rng, keep_conv_name=False)
    report = verify(ref, cand)
    assert report.passed and [(d.name, d.matched_by) for d in report.intermediates] == [("z", "name")]
    assert report.matched == {"name": 1}


def test_a_kept_name_that_holds_nothing_of_the_reference_is_not_compared(rng):
    """MatMul -> Add -> BN folded the way other tools do it: the MatMul keeps its name ``m`` with
    its weight scaled, so ``m`` holds ``x W s``, a tensor the reference never computes. Compared
    by name it failed; it is now left out and counted."""
    w = rng.normal(0, 1, (5, 4))
    bias = rng.normal(0, 1, 4)
    stats, s, t = _bn_affine(rng, 4)
    ref = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["z"]),
            helper.make_node("Relu", ["z"], ["out"]),
        ],
        [
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ]
        + [
            numpy_helper.from_array(a.astype(np.float32), n)
            for n, a in zip(("g", "beta", "mean", "var"), stats)
        ],
        [2, 5],
        (2, 4),
    )
    cand = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["out"]),
        ],
        [
            numpy_helper.from_array((w * s).astype(np.float32), "W"),
            numpy_helper.from_array((bias * s + t).astype(np.float32), "b"),
        ],
        [2, 5],
        (2, 4),
    )
    report = verify(ref, cand)
    assert report.passed, report.message
    assert [(d.name, d.matched_by) for d in report.intermediates] == [("z", "name")]
    assert report.matched == {"name": 1, "unconfirmed": 1}


@pytest.mark.parametrize("order", [["b", "a"], ["a", "b"]], ids=["reordered", "same-order"])
def test_outputs_are_matched_by_name_in_any_order(rng, order):
    def model(outs):
        g = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
            "g",
            [helper.make_tensor_value_info("x", F32, [2, 3])],
            [helper.make_tensor_value_info(o, F32, [2, 3]) for o in outs],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    report = verify(model(["a", "b"]), model(order))
    assert report.passed and [d.name for d in report.outputs] == ["a", "b"] and not report.message


def test_checker_accepts_the_simulated_peer_models(rng):
    for m in conv_bn_pair(rng):
        onnx.checker.check_model(m, full_check=True)
