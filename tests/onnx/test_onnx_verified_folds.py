"""Every fold kind survives the default verifying fold (issue 9).

Verification compares tensors by name with onnxruntime at ORT_DISABLE_ALL; it is sound only
because the pass keeps the name rule (a surviving name holds the same values). Before the
restructure a MatMul -> Add fold kept the MatMul's name for scaled values, the verifier blamed
the round and reverted every fold of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnfold import SkipReason, count_bn, fold_onnx
from conftest import assert_close, run_ort
from onnx_builders import (
    G,
    conv_bn,
    conv_bn_bn,
    conv_bn_in_function,
    conv_bn_in_subgraph,
    gemm_bn,
    matmul_bn,
)

CASES = {
    "conv": (lambda rng: conv_bn(rng), 1),
    "conv-no-bias": (lambda rng: conv_bn(rng, bias=False), 1),
    "conv-transpose-grouped": (lambda rng: conv_bn(rng, op="ConvTranspose", group=2), 1),
    "depthwise": (lambda rng: conv_bn(rng, group=4, cout=4), 1),
    "gemm": (lambda rng: gemm_bn(rng), 1),
    "matmul": (lambda rng: matmul_bn(rng, add=False), 1),
    "matmul-add": (lambda rng: matmul_bn(rng, add=True), 1),
    "conv-bn-bn": (lambda rng: conv_bn_bn(rng), 2),
    "conv-bn-bn-no-bias": (lambda rng: conv_bn_bn(rng, bias=False), 2),
    "if": (lambda rng: conv_bn_in_subgraph(rng, op="If"), 2),
    "loop": (lambda rng: conv_bn_in_subgraph(rng, op="Loop"), 1),
    "function": (lambda rng: conv_bn_in_function(rng), 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fold_kind_survives_verification(rng, case):
    build, n_bn = CASES[case]
    g = build(rng)
    model = g.model()
    assert count_bn(model) == n_bn
    # the If condition takes both values (generated inputs would draw one)
    inputs = [{**g.feeds, "cond": np.array(c)} for c in (True, False)] if "cond" in g.feeds else None
    result = fold_onnx(model, verify=True, inputs=inputs)
    assert result.verification is not None and result.verification.passed, result.verification
    assert len(result.report.folded) == n_bn, result.report.skipped
    assert not result.report.skipped
    assert count_bn(result.model) == 0
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))


def conv_and_matmul_add(rng: np.random.Generator) -> G:
    """One Conv -> BN and one MatMul -> Add -> BN side by side."""
    g = conv_bn(rng)
    g.input("v", [4, 6])
    g.node("MatMul", ["v", g.init("Bm", rng.normal(0, 1, (6, 7)).astype(np.float32))], ["mm"])
    g.node("Add", ["mm", g.init("cm", rng.normal(0, 1, 7).astype(np.float32))], ["ya"])
    g.bn("ya", 7, "za", prefix="bn_mm")
    g.output("za", shape=[4, 7])
    return g


def test_matmul_add_fold_is_not_reverted_by_verification(rng):
    """The CLI (which verifies) folded 0 of these 2 BN: the MatMul kept its output name for
    scaled values, the verifier found that name different from the reference, could not blame a
    fold, and reverted the whole round (both reported verification-failed)."""
    g = conv_and_matmul_add(rng)
    model = g.model()
    result = fold_onnx(model, verify=True)
    assert len(result.report.folded) == 2, result.report.skipped
    assert not [s for s in result.report.skipped if s.reason is SkipReason.VERIFICATION_FAILED]
    assert result.verification.passed
    writers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert writers["za"] == "Add" and writers["z"] == "Conv"
    assert "mm" not in writers, "the MatMul's output changed values, so it must have a new name"
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))
