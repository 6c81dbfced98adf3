"""bnfold: fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul exactly, and prove it.

Public API::

    fold_onnx(model, ...) -> FoldResult        # ONNX pass (bnfold.onnx_fold)
    analyze_onnx(model) -> FoldReport          # what would fold, changing nothing
    fold_path(src, dst, ...) -> FoldResult     # file to file, verified, atomic (bnfold.pipeline)
    verify(reference, candidate, ...) -> VerifyReport   # onnxruntime at ORT_DISABLE_ALL
    fold_module(module, ...) -> (module, FoldReport)    # PyTorch (needs the torch extra)
    export(module, example_inputs, path, ...) -> ExportResult

``import bnfold`` does not import torch; ``fold_module`` and ``export`` load it on first use.
"""

from __future__ import annotations

from typing import Any

from .errors import BnfoldError, InputError, MissingDependencyError, ShapeError, VerificationError
from .onnx_fold import analyze_onnx, count_bn, fold_onnx
from .pipeline import fold_path
from .report import (
    ExportResult,
    Folded,
    FoldReport,
    FoldResult,
    InputSpec,
    Skipped,
    SkipReason,
    TensorDiff,
    VerifyReport,
    VerifyStatus,
)
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "BnfoldError",
    "ExportResult",
    "FoldReport",
    "FoldResult",
    "Folded",
    "InputError",
    "InputSpec",
    "MissingDependencyError",
    "ShapeError",
    "SkipReason",
    "Skipped",
    "TensorDiff",
    "VerificationError",
    "VerifyReport",
    "VerifyStatus",
    "__version__",
    "analyze_onnx",
    "count_bn",
    "export",
    "fold_module",
    "fold_onnx",
    "fold_path",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in ("fold_module", "export"):
        try:
            from . import torch_fold
        except ImportError as exc:  # torch missing
            raise MissingDependencyError(
                "the PyTorch path needs torch: pip install 'bnfold[torch]' (see README: Choosing your torch)"
            ) from exc
        return getattr(torch_fold, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
