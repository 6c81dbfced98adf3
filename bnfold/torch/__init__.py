"""The PyTorch path: fold at module level, export to ONNX, load the user's PyTorch files.

- :mod:`~bnfold.torch.modules`: which modules are BatchNorms and producers; tracing with them kept.
- :mod:`~bnfold.torch.site`: one BN call: the checks that prove it folds, or the reason.
- :mod:`~bnfold.torch.fuse`: the folded producer, through :mod:`bnfold.fold_math`.
- :mod:`~bnfold.torch.fold`: :func:`fold_module`, the walk over the module tree.
- :mod:`~bnfold.torch.onnx_export`: :func:`export`: fold, export, fold in ONNX, verify, write.
- :mod:`~bnfold.torch.compare`: the exported model against the torch module.
- :mod:`~bnfold.torch.inputs`: ``.pt2`` archives, TorchScript, factories (:func:`load_torch_artifact`,
  :func:`load_factory`).

Importing this package does not import torch; the names below load it on first use, and
:func:`require_torch` says how to install it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .inputs import TORCH_MISSING, load_factory, load_torch_artifact, require_torch

__all__ = ["TORCH_MISSING", "export", "fold_module", "load_factory", "load_torch_artifact", "require_torch"]

_LAZY = {"fold_module": ".fold", "export": ".onnx_export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_torch()
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'bnfold.torch' has no attribute {name!r}")
