"""bnfold: fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul exactly, and prove it.

Public API::

    fold_onnx(model, ...) -> FoldResult        # the ONNX pass (bnfold.onnx), verified (bnfold.api)
    analyze_onnx(model) -> FoldReport          # what would fold, changing nothing
    fold_path(src, dst, ...) -> FoldResult     # file to file, verified, atomic (bnfold.api)
    VerifyOptions(inputs=..., shapes=..., ...) # verification options, one frozen dataclass
    verify(reference, candidate, ...) -> VerifyReport   # onnxruntime at ORT_DISABLE_ALL
    fold_module(module, ...) -> (module, FoldReport)    # PyTorch (needs the torch extra)
    export(module, example_inputs, path, ...) -> ExportResult

``import bnfold`` does not import torch; ``fold_module`` and ``export`` load it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import analyze_onnx, fold_onnx, fold_path
from .errors import BnfoldError, InputError, MissingDependencyError, ShapeError, VerificationError
from .onnx.fold import count_bn
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
from .verify.options import VerifyOptions

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
    "VerifyOptions",
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


if TYPE_CHECKING:
    from .verify.run import verify
else:

    def verify(*args: Any, **kwargs: Any) -> VerifyReport:
        """:func:`bnfold.verify.run.verify`, imported on first call: verification loads
        onnxruntime and onnx, which ``import bnfold`` and a fold without verification do not."""
        from .verify.run import verify as run

        return run(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("fold_module", "export"):
        from . import torch as bnfold_torch

        return getattr(bnfold_torch, name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
