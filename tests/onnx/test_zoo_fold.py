"""Issue 2's acceptance check: every zoo model exported by torch with BN kept
(TrainingMode.PRESERVE) folds completely except the BNs the zoo documents as unfoldable,
each of those has a reason, and onnxruntime (ORT_DISABLE_ALL) outputs match."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold import count_bn, fold_onnx
from conftest import run_ort

pytest.importorskip("torch")
registry = pytest.importorskip("models.registry")

SMALL = registry.names(large=False)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("name", SMALL, ids=SMALL)
def test_zoo_model_folds_completely_and_exactly(name, zoo_dir):
    spec = registry.get(name)
    path = registry.build_onnx(name)
    model = onnx.load(str(path))
    assert count_bn(model) == spec.bn_count
    result = fold_onnx(model)
    report = result.report
    assert len(report.folded) == spec.expected_foldable, report.skipped
    assert len(report.skipped) == spec.expected_unfoldable
    assert all(s.reason.value in spec.unfoldable_reasons and s.detail for s in report.skipped)
    assert count_bn(result.model) == spec.expected_unfoldable
    onnx.checker.check_model(result.model, full_check=True)
    # nothing left to fold: a second pass folds nothing
    assert not fold_onnx(result.model).report.folded
    worst = 0.0
    for seed in range(2):
        feeds = registry.example_arrays(name, seed=seed)
        ref = run_ort(model, feeds)
        out = run_ort(result.model, feeds)
        for r, o in zip(ref, out):
            scale = max(float(np.abs(r).max()), 1e-12)
            worst = max(worst, float(np.abs(r.astype(np.float64) - o).max()) / scale)
    print(f"{name}: folded {len(report.folded)}, left {len(report.skipped)}, max rel err {worst:.2e}")
    assert worst < 1e-5
