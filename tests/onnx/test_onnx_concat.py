"""BN after Concat(axis=1), split per branch and folded into each branch's layer (issue 12 item 8)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold import SkipReason, count_bn, fold_onnx
from conftest import assert_close, run_ort
from onnx_builders import G, assert_refused


def concat_bn(rng, *, axis: int = 1, relu_branch: bool = False, shared: bool = False) -> G:
    """x -> [Conv 3 ch, Conv(group) 2 ch, Gemm-free MatMul-free Conv 4 ch] -> Concat -> BN -> Relu."""
    g = G(rng)
    g.input("x", [2, 4, 6, 6])
    branches = []
    for i, (c, group) in enumerate(((3, 1), (2, 2), (4, 1))):
        w = rng.normal(0, 1, (c, 4 // group, 3, 3)).astype(np.float32)
        ins = ["x", g.init(f"W{i}", w)] + (
            [g.init(f"B{i}", rng.normal(0, 1, c).astype(np.float32))] if i else []
        )
        g.node("Conv", ins, [f"c{i}"], pads=[1, 1, 1, 1], group=group)
        branches.append(f"c{i}")
    if relu_branch:
        g.node("Relu", ["c1"], ["r1"])
        branches[1] = "r1"
    if shared:
        g.node("Neg", ["c2"], ["side"])
        g.output("side", shape=[2, 4, 6, 6])
    g.node("Concat", branches, ["cat"], axis=axis)
    g.bn("cat", 9, "z")
    g.node("Relu", ["z"], ["out"])
    g.output("out", shape=[2, 9, 6, 6])
    return g


def test_bn_after_concat_is_split_into_each_branch(rng):
    g = concat_bn(rng)
    model = g.model()
    result = fold_onnx(model)
    [f] = result.report.folded
    assert (f.producer_op, f.through, f.output) == ("Concat", ("Concat",), "z")
    assert count_bn(result.model) == 0
    writers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert writers["z"] == "Concat", "the Concat writes the BN's output"
    assert not {"c0", "c1", "c2", "cat"} & set(writers), "every changed branch output is renamed"
    onnx.checker.check_model(result.model, full_check=True)
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))
    verified = fold_onnx(model, verify=True)
    assert verified.verification.passed and len(verified.report.folded) == 1


def test_concat_branch_read_elsewhere_blocks_the_split(rng):
    """PITFALLS 28: folding into a branch that also feeds another node would change that node."""
    g = concat_bn(rng, shared=True)
    model = g.model()
    result = fold_onnx(model)
    [s] = result.report.skipped
    assert s.reason is SkipReason.PRODUCER_OUTPUT_SHARED and "branch 'c2'" in s.detail
    assert result.model == model


def test_concat_branch_without_a_layer_blocks_the_split(rng):
    g = concat_bn(rng, relu_branch=True)
    assert_refused(g, SkipReason.UNSUPPORTED_PRODUCER)


def test_concat_on_another_axis_is_refused(rng):
    g = G(rng)
    g.input("x", [2, 4, 3, 3])
    for i in range(2):
        g.node("Conv", ["x", g.init(f"W{i}", rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32))], [f"c{i}"])
    g.nodes.append(helper.make_node("Concat", ["c0", "c1"], ["cat"], axis=2))
    g.bn("cat", 4, "z")
    g.output("z", shape=[2, 4, 6, 3])
    assert_refused(g, SkipReason.CHANNEL_AXIS_MISMATCH)
