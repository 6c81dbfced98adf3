"""Issue 12 on the converter-shaped models (models/converters): every shape folds exactly or is
refused with the documented reason. Structure, report and onnxruntime numbers (ORT_DISABLE_ALL)
for each; the default verifying fold keeps every fold."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from bnfold import count_bn, fold_onnx
from conftest import assert_close, run_ort

converters = pytest.importorskip("models.converters")
registry = pytest.importorskip("models.registry")

# name -> (folds by source kind, skip reasons by source kind, op types left that the folds remove)
EXPECTED: dict[str, tuple[dict[str, int], dict[str, list[str]], tuple[str, ...]]] = {
    "torch-dynamo-resnet": ({"batchnorm": 6}, {}, ("BatchNormalization", "CastLike", "Expand", "Shape")),
    "torch-dynamo-linear-bn1d": ({"batchnorm": 2}, {}, ("BatchNormalization",)),
    "levit-linear-bn": ({"batchnorm": 2}, {}, ("BatchNormalization",)),
    "keras3-mobilenet": ({"mul-add chain": 3}, {}, ("Mul", "Add")),
    "tf2onnx-raw-nhwc": ({"batchnorm": 3}, {}, ("BatchNormalization",)),
    "tf2onnx-raw-conv3d": ({"batchnorm": 1}, {}, ("BatchNormalization",)),
    "resnetv2-preact": (
        {},
        {"batchnorm": ["unsupported-producer"] * 3},
        (),
    ),
    "paddle2onnx-identity-bn": ({"batchnorm": 3, "bias add": 2}, {}, ("BatchNormalization",)),
    "conv-bias-add": ({"bias add": 2}, {}, ("Add",)),
    "arcface-head": ({"batchnorm": 2}, {}, ("BatchNormalization",)),
    "tabular-bn-first": ({"batchnorm": 1}, {}, ("BatchNormalization",)),
    "mxnet-bn-data": ({"batchnorm": 2}, {"batchnorm": ["forward-padding"]}, ()),
    "mixnet-concat-bn": ({"batchnorm": 1}, {}, ("BatchNormalization",)),
    "trap-concat-branch-shared": ({}, {"batchnorm": ["producer-output-shared"]}, ()),
    "trap-mul-last-axis": ({}, {"mul-add chain": ["constant-on-last-axis"]}, ()),
    "trap-grouped-add-chw": ({}, {"bias add": ["not-per-channel"]}, ()),
    "trap-div-by-zero": ({}, {"mul-add chain": ["division-by-zero"]}, ()),
    "trap-reshape-merges-channel": ({}, {"batchnorm": ["axis-not-preserved"]}, ()),
}
if "keras3-tf2onnx-raw" in converters.BUILDERS:
    EXPECTED["keras3-tf2onnx-raw"] = ({"bias add": 2, "mul-add chain": 3}, {}, ("Mul", "Add"))


def feeds_for(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    spec = registry.CONVERTERS[name]
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, shape).astype(np.float32) for k, shape in spec.inputs.items()}


@pytest.mark.parametrize("name", list(EXPECTED), ids=list(EXPECTED))
def test_converter_shape_folds_exactly_or_is_refused_with_a_reason(name):
    folds, skips, gone = EXPECTED[name]
    model = converters.build(name)
    before = model.SerializeToString()
    result = fold_onnx(model)
    report = result.report
    assert Counter(f.source for f in report.folded) == Counter(folds), report
    got_skips: dict[str, list[str]] = {}
    for s in report.skipped:
        assert s.detail, s
        got_skips.setdefault(s.source, []).append(s.reason.value)
    assert got_skips == skips, report.skipped
    assert count_bn(result.model) == count_bn(model) - folds.get("batchnorm", 0)
    left = Counter(n.op_type for n in result.model.graph.node)
    assert all(left[op] == 0 for op in gone), left
    if not report.folded:
        assert result.model.SerializeToString() == before, "a refused shape must leave the graph unchanged"
        return
    onnx.checker.check_model(result.model, full_check=True)
    assert [v.name for v in result.model.graph.output] == [v.name for v in model.graph.output]
    for seed in range(2):
        feeds = feeds_for(name, seed)
        assert_close(run_ort(model, feeds), run_ort(result.model, feeds), rtol=2e-6)
    assert not fold_onnx(result.model).report.folded, "a second pass finds nothing"


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[0]], ids=str)
def test_converter_folds_survive_the_verifying_fold(name):
    folds = sum(EXPECTED[name][0].values())
    result = fold_onnx(converters.build(name), verify=True, inputs=feeds_for(name))
    assert result.verification.passed
    assert len(result.report.folded) == folds, result.report.skipped


def test_forward_folds_are_reported_as_forward():
    """arcface: features folds backward into the Gemm, bn2 forward through the Flatten into it."""
    report = fold_onnx(converters.build("arcface-head")).report
    got = {f.bn: (f.direction, f.through, f.producer_op) for f in report.folded}
    assert got == {
        "/features/BatchNormalization": ("backward", (), "Gemm"),
        "/bn2/BatchNormalization": ("forward", ("Flatten",), "Gemm"),
    }
