"""Fixtures for the tests of bnfold.onnx.io."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.onnx.io import load as load_mod


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture(autouse=True)
def small_stub_threshold(monkeypatch):
    """The test models are small: make their kilobyte-sized tensors stubs, as large ones are."""
    monkeypatch.setattr(load_mod, "LAZY_THRESHOLD", 1024)
