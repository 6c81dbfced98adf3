"""Forward folds (issue 12 item 7): a BN or a per-channel Mul/Add chain before a layer, folded
into the layer it feeds: Gemm, MatMul, through Flatten, and Conv only without padding (or
without shift)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold import SkipReason, count_bn, fold_onnx
from conftest import assert_close, run_ort
from onnx_builders import G, assert_refused


def bn_then(rng, layer: str, *, pads: int = 0, group: int = 1, flatten: bool = False, trans_b: int = 1) -> G:
    """x -> BN -> [Dropout -> Flatten] -> layer -> Relu -> out; the BN is on a graph input, so
    nothing precedes it to fold backward into."""
    g = G(rng)
    if layer == "Conv":
        g.input("x", [2, 4, 6, 6])
        g.bn("x", 4, "n")
        w = rng.normal(0, 1, (6, 4 // group, 3, 3)).astype(np.float32)
        ins = ["n", g.init("W", w), g.init("B", rng.normal(0, 1, 6).astype(np.float32))]
        g.node("Conv", ins, ["y"], pads=[pads] * 4, group=group)
        out_shape = [2, 6, 6 + 2 * pads - 2, 6 + 2 * pads - 2]
    elif flatten:  # BN2d -> Dropout -> Flatten -> Gemm (face-recognition heads)
        g.input("x", [2, 3, 2, 2])
        g.bn("x", 3, "n")
        g.node("Dropout", ["n"], ["d"])
        g.node("Flatten", ["d"], ["f"], axis=1)
        w = rng.normal(0, 1, (5, 12) if trans_b else (12, 5)).astype(np.float32)
        g.node("Gemm", ["f", g.init("W", w), g.init("C", rng.normal(0, 1, 5).astype(np.float32))], ["y"],
               transB=trans_b, alpha=0.5, beta=2.0)  # fmt: skip
        out_shape = [2, 5]
    elif layer == "Gemm":
        g.input("x", [3, 4])
        g.bn("x", 4, "n")
        w = rng.normal(0, 1, (5, 4) if trans_b else (4, 5)).astype(np.float32)
        g.node("Gemm", ["n", g.init("W", w)], ["y"], transB=trans_b, alpha=1.5)
        out_shape = [3, 5]
    else:  # MatMul, rank 2 or rank 3
        rank3 = layer == "MatMul3"
        g.input("x", [2, 3, 4] if rank3 else [3, 4])
        if rank3:  # a Mul/Add chain on the last axis (a BN would normalize axis 1)
            g.node("Mul", ["x", g.init("s", rng.uniform(0.5, 2, 4).astype(np.float32))], ["m"])
            g.node("Add", ["m", g.init("t", rng.normal(0, 1, 4).astype(np.float32))], ["n"])
        else:
            g.bn("x", 4, "n")
        g.node("MatMul", ["n", g.init("W", rng.normal(0, 1, (4, 5)).astype(np.float32))], ["y"])
        out_shape = [2, 3, 5] if rank3 else [3, 5]
    g.node("Relu", ["y"], ["out"])
    g.output("out", shape=out_shape)
    return g


CASES = {
    "gemm-transB": {"layer": "Gemm", "trans_b": 1},
    "gemm": {"layer": "Gemm", "trans_b": 0},
    "flatten-gemm": {"layer": "Gemm", "flatten": True, "trans_b": 1},
    "flatten-gemm-noT": {"layer": "Gemm", "flatten": True, "trans_b": 0},
    "matmul": {"layer": "MatMul"},
    "matmul-rank3-chain": {"layer": "MatMul3"},
    "conv-unpadded": {"layer": "Conv"},
    "conv-unpadded-grouped": {"layer": "Conv", "group": 2},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_fold(rng, case):
    g = bn_then(rng, **CASES[case])
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1, result.report.skipped
    f = result.report.folded[0]
    assert f.direction == "forward" and f.output == "n"
    assert f.through == (("Dropout", "Flatten") if CASES[case].get("flatten") else ())
    assert count_bn(result.model) == 0 and not {"Mul", "Add"} & {
        n.op_type for n in result.model.graph.node[:1]
    }
    writers = {o for n in result.model.graph.node for o in n.output}
    assert "y" in writers, "the layer keeps its output name: its values are unchanged"
    assert "n" not in writers and "f" not in writers, "looked-through outputs changed values: renamed"
    onnx.checker.check_model(result.model, full_check=True)
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds), rtol=2e-6)
    verified = fold_onnx(model, verify=True)
    assert verified.verification.passed and len(verified.report.folded) == 1


def test_padded_conv_takes_no_shift_forward(rng):
    """MXNet's bn_data -> zero-padded conv0: the padded border never saw the shift."""
    g = bn_then(rng, "Conv", pads=1)
    model = g.model()
    result = fold_onnx(model)
    assert not result.report.folded
    [s] = result.report.skipped
    assert s.reason is SkipReason.FORWARD_PADDING and "pads" in s.detail and s.producer_op == "Conv"
    assert result.model == model


def test_padded_conv_takes_a_map_without_shift(rng):
    """A scale alone is exact through zero padding (0 * s = 0)."""
    g = G(rng)
    g.input("x", [2, 4, 6, 6])
    g.node("Mul", ["x", g.init("s", rng.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32))], ["n"])
    g.node(
        "Conv",
        ["n", g.init("W", rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32))],
        ["y"],
        pads=[1, 1, 1, 1],
    )
    g.output("y", shape=[2, 6, 6, 6])
    model = g.model()
    result = fold_onnx(model)
    assert [(f.source, f.direction) for f in result.report.folded] == [("mul-add chain", "forward")]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))


def test_bn_feeding_two_layers_is_not_folded_forward(rng):
    g = bn_then(rng, "Gemm")
    g.node("Neg", ["n"], ["side"])
    g.output("side", shape=[3, 4])
    result = fold_onnx(g.model())
    assert [s.reason for s in result.report.skipped] == [SkipReason.NO_PRODUCER]


def test_bn_on_a_sequence_axis_before_a_rank3_matmul_is_refused(rng):
    """BN on (N, L, F) normalizes L; the MatMul reads F: not its input-feature axis."""
    g = G(rng)
    g.input("x", [2, 4, 4])
    g.bn("x", 4, "n")
    g.node("MatMul", ["n", g.init("W", rng.normal(0, 1, (4, 5)).astype(np.float32))], ["y"])
    g.output("y", shape=[2, 4, 5])
    assert_refused(g, SkipReason.CHANNEL_AXIS_MISMATCH)


def test_flatten_that_splits_channels_is_refused(rng):
    """Flatten(axis=2) of (N, C, H, W) mixes channels into rows: axis not preserved."""
    g = G(rng)
    g.input("x", [2, 3, 2, 2])
    g.bn("x", 3, "n")
    g.node("Flatten", ["n"], ["f"], axis=2)
    g.node("Gemm", ["f", g.init("W", rng.normal(0, 1, (2, 5)).astype(np.float32))], ["y"])
    g.output("y", shape=[6, 5])
    assert_refused(g, SkipReason.AXIS_NOT_PRESERVED)


def test_backward_reason_wins_when_a_layer_precedes(rng):
    """Conv (output also read elsewhere) -> BN -> Gemm: the backward refusal is reported."""
    g = G(rng)
    g.input("x", [3, 4])
    g.node("Gemm", ["x", g.init("A", rng.normal(0, 1, (4, 4)).astype(np.float32))], ["p"])
    g.node("Neg", ["p"], ["side"])
    g.bn("p", 4, "n")
    g.node("Gemm", ["n", g.init("W", rng.normal(0, 1, (4, 5)).astype(np.float32))], ["y"], transA=1)
    g.output("y", shape=[4, 5])
    g.output("side", shape=[3, 4])
    result = fold_onnx(g.model())
    assert [s.reason for s in result.report.skipped] == [SkipReason.PRODUCER_OUTPUT_SHARED]


def test_gemm_with_transposed_a_is_refused(rng):
    g = G(rng)
    g.input("x", [4, 3])
    g.bn("x", 4, "n")
    g.node("Gemm", ["n", g.init("W", rng.normal(0, 1, (3, 5)).astype(np.float32))], ["y"], transA=1)
    g.output("y", shape=[4, 5])
    result = fold_onnx(g.model())
    assert [s.reason for s in result.report.skipped] == [SkipReason.UNSUPPORTED_ATTRIBUTE]


def test_forward_into_a_shared_weight_clones_it(rng):
    g = bn_then(rng, "Gemm")
    g.input("x2", [3, 4])
    g.node("Gemm", ["x2", "W"], ["y2"], transB=1)
    g.output("y2", shape=[3, 5])
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1 and result.report.folded[0].new_initializers
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))
