# SHIM: removed at integration
"""Moved to :mod:`bnfold.torch.inputs`."""

from __future__ import annotations

from .torch.inputs import TORCH_MISSING, load_factory, load_torch_artifact, require_torch

__all__ = ["TORCH_MISSING", "load_factory", "load_torch_artifact", "require_torch"]
