"""The static weights check (bnfold.verify.weights), through verify(): exact folds pass in every
layout, a fold computed in float32 by another tool passes, errors far below float32 runtime
noise fail at the right channel, and fold points it cannot model are left to the runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import VerifyStatus, fold_onnx, verify
from bnfold.verify import WEIGHT_ULPS
from onnx_builders import G, conv_bn

F32_EPS = float(np.finfo(np.float32).eps)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy()


def replace(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(value, name))


def absorber(model: onnx.ModelProto, out: str = "z") -> onnx.NodeProto:
    return next(n for n in model.graph.node if out in n.output)


LAYOUTS = {
    "conv": {},
    "conv-no-bias": {"bias": False},
    "conv-depthwise": {"cin": 6, "group": 6},
    "conv1d": {"rank": 1},
    "conv3d": {"rank": 3},
    "convtranspose": {"op": "ConvTranspose"},
    "convtranspose-groups": {"op": "ConvTranspose", "group": 2},
    "float16": {"dtype": np.float16},
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_exact_fold_passes_and_one_channel_error_fails_at_that_channel(rng, layout):
    g = conv_bn(rng, eps=1e-5, **LAYOUTS[layout])
    ref = g.model()
    folded = fold_onnx(ref).model
    good = verify(ref, folded)
    (w,) = good.weights
    assert good.status is VerifyStatus.PASSED and w.passed and w.kind == "weights" and w.name == "z"
    dtype = np.dtype(LAYOUTS[layout].get("dtype", np.float32))
    assert w.rtol == WEIGHT_ULPS * float(np.finfo(dtype).eps)
    assert w.max_rel <= np.finfo(dtype).eps / 2  # bnfold rounds once

    node = absorber(folded)
    weight = initializer(folded, node.input[1])
    # channel 4 of 6; ConvTranspose (C_in, C_out/g, k): with 2 groups channel 4 is group 1, column 1
    index = (slice(2, 4), 1) if layout == "convtranspose-groups" else (slice(None), 4)
    index = index if node.op_type == "ConvTranspose" else (4,)
    error = 1e-2 if dtype == np.float16 else 1e-5  # 1e-5: 10x under the float32 runtime tolerance
    weight[index] *= dtype.type(1 + error)
    replace(folded, node.input[1], weight)
    bad = verify(ref, folded)
    (w,) = bad.weights
    assert bad.status is VerifyStatus.FAILED and bad.first_divergent == ("z",)
    assert not w.passed and w.worst_channel == 4 and w.max_rel == pytest.approx(error, rel=0.1)
    assert "folded weights at 'z'" in bad.message and "channel 4" in bad.message


def test_fold_computed_in_float32_by_another_tool_passes(rng):
    """torch.nn.utils.fusion.fuse_conv_bn_weights computes in the weight's dtype: measured within
    2 float32 ulps on 200k random channels; the check allows 4."""
    g = conv_bn(rng, eps=1e-5, cout=64)
    ref = g.model()
    folded = fold_onnx(ref).model
    f32 = {n: initializer(ref, n) for n in ("W", "B", "bn_scale", "bn_bias", "bn_mean", "bn_var")}
    r = np.float32(1) / np.sqrt(f32["bn_var"] + np.float32(1e-5))
    w32 = f32["W"] * (f32["bn_scale"] * r).reshape(-1, 1, 1, 1)
    b32 = (f32["B"] - f32["bn_mean"]) * r * f32["bn_scale"] + f32["bn_bias"]
    node = absorber(folded)
    replace(folded, node.input[1], w32.astype(np.float32))
    replace(folded, node.input[2], b32.astype(np.float32))
    report = verify(ref, folded)
    assert report.status is VerifyStatus.PASSED, report.message
    assert 0 < report.weights[0].max_rel <= 2 * F32_EPS


def gemm_model(rng, *, matmul: bool = False) -> G:
    """x[2,5] -> Gemm(transB=1, beta=0.5, C (1,4)) or MatMul(B (5,4)) -> BN -> Relu."""
    g = G(rng)
    g.input("x", [2, 5])
    if matmul:
        g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (5, 4)).astype(np.float32))], ["y"])
    else:
        ins = ["x", g.init("B", rng.normal(0, 1, (4, 5)).astype(np.float32))]
        ins.append(g.init("C", rng.normal(0, 1, (1, 4)).astype(np.float32)))
        g.node("Gemm", ins, ["y"], transB=1, beta=0.5)
    g.bn("y", 4, "z")
    g.node("Relu", ["z"], ["out"])
    g.output("out", shape=[None, 4])
    return g


@pytest.mark.parametrize("matmul", [False, True], ids=["gemm-transB-beta", "matmul-to-gemm"])
def test_gemm_and_matmul_folds_are_checked(rng, matmul):
    ref = gemm_model(rng, matmul=matmul).model()
    folded = fold_onnx(ref).model
    assert absorber(folded).op_type == "Gemm"
    good = verify(ref, folded)
    assert good.status is VerifyStatus.PASSED and len(good.weights) == 1 and good.weights[0].passed
    node = absorber(folded)
    c = initializer(folded, node.input[2])
    c.reshape(-1)[2] += np.float32(1e-5) * max(1.0, abs(float(c.reshape(-1)[2])))
    replace(folded, node.input[2], c)
    bad = verify(ref, folded)
    assert bad.status is VerifyStatus.FAILED and bad.weights[0].worst_channel == 2


def test_training_mode_reference_bn_fails_the_fold_outright(rng):
    g = conv_bn(rng)
    folded = fold_onnx(g.model()).model
    ref = g.model()
    bn = absorber(ref)
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["rm", "rv"])
    report = verify(ref, folded)
    assert report.status is VerifyStatus.FAILED and not report.weights[0].passed
    assert "training_mode=1" in report.message


def test_fold_points_it_cannot_model_are_left_to_the_runtime_comparison(rng):
    """Different attributes (pads) mean a different layer: no static check, and the runtime
    comparison decides (here it fails: the shapes differ)."""
    g = conv_bn(rng)
    ref = g.model()
    folded = fold_onnx(ref).model
    node = absorber(folded)
    del node.attribute[:]
    report = verify(ref, folded)
    assert report.weights == () and report.status is VerifyStatus.FAILED


def test_user_tolerances_loosen_the_check_and_intermediates_false_disables_it(rng):
    ref = conv_bn(rng).model()
    folded = fold_onnx(ref).model
    node = absorber(folded)
    weight = initializer(folded, node.input[1])
    weight[1] *= np.float32(1 + 1e-3)
    replace(folded, node.input[1], weight)
    assert verify(ref, folded).status is VerifyStatus.FAILED
    loose = verify(ref, folded, rtol=1e-2)
    assert loose.status is VerifyStatus.PASSED and loose.weights[0].rtol == 1e-2
    assert verify(ref, folded, intermediates=False).weights == ()


def test_weights_are_read_from_external_data_of_model_paths(rng, tmp_path):
    ref = conv_bn(rng, cin=32, cout=64).model()  # W: 73 KiB, past the lazy-loading threshold
    folded = fold_onnx(ref).model
    paths = []
    for name, model in (("ref", ref), ("cand", folded)):
        path = tmp_path / name / f"{name}.onnx"
        path.parent.mkdir()
        onnx.save(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0
        )
        paths.append(path)
    report = verify(*paths)
    assert report.status is VerifyStatus.PASSED and len(report.weights) == 1 and report.weights[0].passed


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_weights_checked_in_row_blocks_report_as_one_block(rng, layout, monkeypatch):
    """The check runs over blocks of axis-0 rows (never a float64 copy of a whole weight): with
    one row (one group of a grouped ConvTranspose) per block it reports the very same figures,
    and a wrong channel fails with the same count, whichever block holds it."""
    import importlib

    weights = importlib.import_module("bnfold.verify.weights")
    ref = conv_bn(rng, eps=1e-5, **LAYOUTS[layout]).model()
    folded = fold_onnx(ref).model
    node = absorber(folded)
    weight = initializer(folded, node.input[1])
    dtype = weight.dtype
    index = (slice(2, 4), 1) if layout == "convtranspose-groups" else (slice(None), 4)  # channel 4
    weight[index if node.op_type == "ConvTranspose" else (4,)] *= dtype.type(1.03)
    weight.reshape(-1)[0] *= dtype.type(1.03)
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    replace(bad, node.input[1], weight)
    whole = [weights.check_weights(ref, m) for m in (folded, bad)]
    monkeypatch.setattr(weights, "BLOCK_ELEMENTS", 1)
    blocked = [weights.check_weights(ref, m) for m in (folded, bad)]
    for (b,), (w,) in zip(blocked, whole):  # the mean sums in another order: equal to rounding
        assert dataclasses.replace(b.diff, mean_abs=w.diff.mean_abs) == w.diff and b.problem == w.problem
        assert b.diff.mean_abs == pytest.approx(w.diff.mean_abs, rel=1e-12)
    (good,), (wrong,) = whole
    assert good.diff.passed and not wrong.diff.passed and wrong.diff.mismatched > 1
