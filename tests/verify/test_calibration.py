"""Calibrated tolerances (issue 13): a correct fold is judged against the noise a correct fold was
measured to make at each tensor, not against a fixed fraction of the tensor's own magnitude.

Before calibration, bnfold reverted every fold of YOLO-shaped and visformer-shaped models as
``verification-failed`` (a Sigmoid of very negative logits, deep Erf/Softmax tensors), and the run
still said "passed". The noise comes from a second run of the reference at ORT_ENABLE_BASIC, where
onnxruntime folds the BNs itself.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from noise_models import attention_stack, yolo_head
from onnx import numpy_helper

from bnfold import SkipReason, VerifyStatus, count_bn
from bnfold.api import fold_onnx
from bnfold.verify import verify
from conftest import assert_close, run_ort

compare = importlib.import_module("bnfold.verify.compare")

SHAPES = {
    "yolo-head": (lambda rng: yolo_head(rng, width=64, depth=6), 8),
    "attention-stack": (lambda rng: attention_stack(rng), 18),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_correct_folds_of_noisy_shapes_pass_verification_and_stay_folded(rng, shape):
    build, bns = SHAPES[shape]
    g = build(rng)
    model = g.model()
    result = fold_onnx(model, verify=True)
    # structure and report: every BN folded, none reverted
    assert count_bn(result.model) == 0 and len(result.report.folded) == bns and not result.report.skipped
    v = result.verification
    assert v.passed and v.calibrated and v.reverted == () and "reverting" not in v.message
    # the fixed rule alone would have failed here: some tensor is beyond rtol, inside rtol + noise
    beyond = [d for d in v.intermediates if d.max_rel > d.rtol]
    assert beyond and all(d.passed and d.max_rel <= d.rtol + d.noise for d in beyond)
    # numbers
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds), rtol=1e-4)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_uncalibrated_the_same_folds_are_reverted_and_the_pass_says_so(rng, shape, monkeypatch):
    """The old rule (no noise allowance) reverts every fold; the report must not read as a
    plain pass: ``reverted`` lists each fold with why, and the message says so."""
    monkeypatch.setattr(compare, "NOISE_FACTOR", 0.0)
    build, bns = SHAPES[shape]
    result = fold_onnx(build(rng).model(), verify=True)
    v = result.verification
    assert v.passed and len(v.reverted) == bns == len(result.report.skipped)
    assert all(s.reason is SkipReason.VERIFICATION_FAILED and s.detail for s in v.reverted)
    assert v.message.startswith(f"passed after reverting {bns} folds that diverged")
    assert set(v.suspect_folds) == {s.output for s in v.reverted}


def test_calibration_leaves_a_wrong_fold_visible_at_its_own_tensor(rng):
    """A 1e-3 error in one channel of one folded weight is still caught by onnxruntime at the
    fold point, where the calibrated noise is ~1e-7."""
    g = yolo_head(rng, width=64, depth=6)
    model = g.model()
    folded = fold_onnx(model).model
    conv = next(n for n in folded.graph.node if n.output[0] == "cls0_bn")
    init = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[1] *= np.float32(1 + 1e-3)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    v = verify(model, folded)
    assert v.status is VerifyStatus.FAILED and v.calibrated and "cls0_bn" in v.first_divergent
    (at_fold,) = [d for d in v.intermediates if d.name == "cls0_bn"]
    assert not at_fold.passed and at_fold.worst_channel == 1 and at_fold.noise < 1e-4


def test_reference_that_cannot_run_optimized_is_compared_uncalibrated(rng, monkeypatch):
    real = ort.InferenceSession

    def no_optimized(model, sess_options=None, **kwargs):
        if sess_options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : fusion broke")
        return real(model, sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", no_optimized)
    model = attention_stack(rng, blocks=1).model()
    v = verify(model, fold_onnx(model).model)
    assert v.calibrated is False and "tolerances not calibrated" in v.message
    assert all(d.noise == 0.0 for d in (*v.outputs, *v.intermediates))


def test_noise_is_zero_where_both_runs_agree():
    stats = compare.TensorStats("t", "intermediate", None, None)
    ref = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    stats.add(ref, ref.copy(), compare.noise_of(ref, ref.copy(), "intermediate"))
    assert stats.result().noise == 0.0 and stats.result().passed
    noisy = ref.copy()
    noisy[0, 1, 0] += 1e-3  # channel 1's scale is 7: noise 1.4e-4 relative, times NOISE_FACTOR
    stats.add(ref, ref.copy(), compare.noise_of(ref, noisy, "intermediate"))
    assert stats.result().noise == pytest.approx(compare.NOISE_FACTOR * 1e-3 / 7, rel=1e-3)
    assert compare.noise_of(ref, noisy, "output") == pytest.approx(1e-3, rel=1e-3)  # one per tensor


def test_onnx_checker_accepts_the_noise_models(rng):
    for build, _ in SHAPES.values():
        onnx.checker.check_model(build(rng).model(), full_check=True)


@pytest.mark.parametrize("budget", [0.0, float("inf")], ids=["noise-at-once", "tensors-kept"])
def test_calibration_kept_or_computed_at_once_gives_the_same_verdict(rng, budget, monkeypatch):
    """The calibration run's tensors are kept for the comparison only while they take less memory
    than the weights (else both reference sessions live together and the noise is computed at
    once): the two ways measure the very same noise, tensor by tensor."""
    calibrate = importlib.import_module("bnfold.verify.calibrate")
    run = importlib.import_module("bnfold.verify.run")
    g = yolo_head(rng, width=64, depth=6)
    model = g.model()
    folded = fold_onnx(model).model
    baseline = verify(model, folded)
    made = []
    monkeypatch.setattr(calibrate, "KEEP_BUDGET", budget)
    monkeypatch.setattr(run, "calibrate", lambda *a: made.append(calibrate.calibrate(*a)) or made[-1])
    v = verify(model, folded)
    (cal,) = made
    assert (cal.kept is None) == (budget == 0.0) and (cal.noises is None) == (budget != 0.0)
    assert v.passed and v.calibrated
    key = [(d.name, d.noise, d.max_rel, d.passed) for d in (*v.outputs, *v.intermediates)]
    assert key == [
        (d.name, d.noise, d.max_rel, d.passed) for d in (*baseline.outputs, *baseline.intermediates)
    ]
    assert any(d.noise > 0 for d in v.intermediates)
