# SHIM: removed at integration
"""Moved to :mod:`bnfold.torch` (fold_module, export)."""

from __future__ import annotations

from .torch.fold import fold_module
from .torch.onnx_export import export

__all__ = ["export", "fold_module"]
