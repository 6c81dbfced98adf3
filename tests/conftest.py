"""Shared fixtures: a seeded rng, BN statistics that are never near the identity, and an
onnxruntime runner at ORT_DISABLE_ALL (so BN really executes in the reference run)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)


def bn_stats(rng: np.random.Generator, c: int, dtype: type = np.float32) -> list[np.ndarray]:
    """gamma, beta, mean, var: non-trivial (gamma != 1 with mixed signs, beta/mean != 0, random var)."""
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.normal(0.0, 0.5, c)
    mean = rng.normal(0.0, 0.5, c)
    var = rng.uniform(0.5, 2.0, c)
    return [a.astype(dtype) for a in (gamma, beta, mean, var)]


def run_ort(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run on onnxruntime's CPU provider with every graph optimization disabled."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def assert_close(ref: list[np.ndarray], out: list[np.ndarray], *, rtol: float = 1e-5) -> float:
    """Every output within ``rtol`` of the reference's magnitude; returns the worst relative error."""
    worst = 0.0
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert r.shape == o.shape and r.dtype == o.dtype
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        scale = max(float(np.abs(r64).max()), 1e-30)
        err = float(np.abs(r64 - o64).max()) / scale
        worst = max(worst, err)
        assert err <= rtol, f"relative error {err:.3g} > {rtol}"
    return worst
