"""benchmarks/bn_coverage.py's counter of BN-like structures and its error measure: the numbers in the
coverage table are only as good as these."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from models import converters, registry

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bn_coverage.py"
_SPEC = importlib.util.spec_from_file_location("bnfold_coverage_bench", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
coverage = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = coverage  # dataclasses look their module up
_SPEC.loader.exec_module(coverage)

BEFORE = {
    "torch-dynamo-resnet": (6, 0, 0),
    "torch-dynamo-linear-bn1d": (2, 0, 0),
    "levit-linear-bn": (2, 0, 0),
    "mixnet-concat-bn": (1, 0, 0),
    "keras3-mobilenet": (0, 3, 0),  # 2 depthwise Conv -> Mul -> Add, MatMul -> Mul -> Add
    "keras3-tf2onnx-raw": (0, 3, 2),  # (C,) constants on NHWC, found through the Transposes
    "tf2onnx-raw-nhwc": (3, 0, 0),
    "tf2onnx-raw-conv3d": (1, 0, 0),
    "resnetv2-preact": (3, 0, 0),
    "paddle2onnx-identity-bn": (3, 0, 2),  # MatMul -> Add is a linear layer's bias: not counted
    "arcface-head": (2, 0, 0),
    "tabular-bn-first": (1, 0, 0),
    "mxnet-bn-data": (3, 0, 0),
    "conv-bias-add": (0, 0, 2),
    "trap-mul-last-axis": (0, 0, 0),  # (C,) on NCHW is not per-channel
    "trap-grouped-add-chw": (0, 0, 0),  # (1,C,H,W) is not per-channel
    "trap-div-by-zero": (0, 1, 0),  # per-channel, but not foldable: a correct folder leaves it
    "trap-reshape-merges-channel": (1, 0, 0),
    "trap-concat-branch-shared": (1, 0, 0),
}


def test_every_converter_model_has_an_expected_count() -> None:
    assert set(BEFORE) == set(registry.converter_names())
    assert set(coverage.IDEAL) <= set(BEFORE)
    assert all(coverage.IDEAL[n] <= sum(BEFORE[n]) for n in coverage.IDEAL)


@pytest.mark.parametrize("name", list(BEFORE), ids=list(BEFORE))
def test_counts_bn_affine_chains_and_bias_adds(name: str) -> None:
    s = coverage.count_structures(converters.build(name))
    assert (s.bn, s.affine, s.bias) == BEFORE[name]


@pytest.mark.parametrize(
    ("const", "rank", "axis", "channels", "expected"),
    [
        ((8,), 4, 1, 8, False),  # broadcasts over the last axis of NCHW
        ((8,), 4, 3, 8, True),  # NHWC: the channel axis is the last
        ((1, 8, 1, 1), 4, 1, 8, True),
        ((8, 1, 1), 4, 1, 8, True),
        ((), 4, 1, 8, True),
        ((1,), 4, 1, 8, True),
        ((1, 8, 6, 6), 4, 1, 8, False),
        ((1, 4, 1, 1), 4, 1, 8, False),  # does not match the channel count
        ((8,), 2, 1, 8, True),
        ((1, 1, 8, 1, 1), 4, 1, 8, False),  # higher rank than the tensor
    ],
)
def test_per_channel_follows_numpy_broadcasting(
    const: tuple[int, ...], rank: int, axis: int, channels: int, expected: bool
) -> None:
    assert coverage.per_channel(const, rank, axis, channels) is expected


def test_a_matmul_bias_add_is_not_a_structure_but_its_scale_is() -> None:
    """``MatMul -> Add (C,)`` is the normal form of a linear layer (MatMul has no bias input)."""
    model = converters.build("keras3-mobilenet")
    assert coverage.count_structures(model).affine == 3
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[0].endswith("MatMul:0"))
    (add,) = [n for n in model.graph.node if mul.output[0] in n.input]
    add.input[0] = mul.input[0]
    model.graph.node.remove(mul)
    assert coverage.count_structures(model) == coverage.Structures(0, 2, 0)


def test_graph_feeds_are_seeded_and_feed_a_symbolic_batch_as_1(tmp_path: Path) -> None:
    path = tmp_path / "k.onnx"
    path.write_bytes(converters.build("keras3-mobilenet").SerializeToString())
    feeds = coverage.graph_feeds(str(path))
    assert list(feeds) == ["keras_tensor"] and feeds["keras_tensor"].shape == (1, 16, 16, 3)
    assert feeds["keras_tensor"].dtype == np.float32
    assert np.array_equal(feeds["keras_tensor"], coverage.graph_feeds(str(path))["keras_tensor"])


def test_relative_error_scales_by_the_reference_and_catches_non_finite_changes() -> None:
    ref = np.array([1.0, -4.0, np.inf, np.nan], np.float32)
    assert coverage.relative_error(ref, ref.copy()) == 0.0
    out = ref.copy()
    out[0] = 1.004
    assert coverage.relative_error(ref, out) == pytest.approx(0.001, rel=1e-3)
    out = ref.copy()
    out[2] = 7.0
    assert coverage.relative_error(ref, out) == np.inf
    out = ref.copy()
    out[1] = np.nan
    assert coverage.relative_error(ref, out) == np.inf
    assert coverage.relative_error(ref, ref[:3]) == np.inf


def test_a_wrong_cell_is_flagged() -> None:
    ok = coverage.Cell(coverage.Structures(1, 0, 0), 1e-6)
    wrong = coverage.Cell(coverage.Structures(), 0.5)
    assert not ok.wrong and str(ok) == "1 (1 bn) · 1.0e-06"
    assert wrong.wrong and str(wrong).startswith("**WRONG**")
    assert coverage.Cell(coverage.Structures(), float("nan")).wrong
