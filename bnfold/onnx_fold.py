# SHIM: removed at integration
"""Old home of the ONNX pass, kept while the restructure (issue 9) lands.

The pass lives in :mod:`bnfold.onnx` (``fold.fold_model``, ``graph.Scope``/``ModelIndex``,
``constants.NotConstant``, ``absorb.ABSORBERS``); ``fold_onnx``/``analyze_onnx`` move to
``bnfold.api``. This module re-exports every name others import from it today.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import onnx

from .errors import InputError
from .onnx.fold import count_bn, fold_model
from .report import FoldReport, FoldResult

__all__ = ["analyze_onnx", "count_bn", "fold_onnx"]

_fold_model = fold_model


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    inplace: bool = False,
    base_dir: str | None = None,
    exclude: Collection[str] = (),
    verify: bool = False,
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model`` (see ``bnfold.api.fold_onnx``)."""
    start = time.perf_counter()
    if isinstance(model, onnx.ModelProto):
        source = model
    elif isinstance(model, (str, os.PathLike)):
        from .onnx.io import load_model

        source = load_model(os.fspath(model))
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(os.fspath(model)))
        inplace = True  # we own the freshly loaded copy
    else:
        raise InputError(f"fold_onnx: expected an onnx.ModelProto or a path, got {type(model).__name__}")

    if not verify:
        work = source if inplace else _copy(source)
        report = fold_model(work, base_dir=base_dir, exclude=frozenset(exclude))
        return FoldResult(model=work, report=report, seconds=time.perf_counter() - start)

    from .safe import fold_verified

    def make(excl: frozenset[str]) -> tuple[onnx.ModelProto, FoldReport, onnx.ModelProto]:
        work = _copy(source)
        rep = fold_model(work, base_dir=base_dir, exclude=excl)
        return work, rep, work

    done = fold_verified(
        make,
        source,
        exclude=frozenset(exclude),
        inputs=inputs,
        shapes=shapes,
        seed=seed,
        samples=samples,
        atol=atol,
        rtol=rtol,
    )
    if inplace:
        source.CopyFrom(done.payload)
        done_model = source
    else:
        done_model = done.payload
    return FoldResult(
        model=done_model,
        report=done.report,
        verification=done.verification,
        seconds=time.perf_counter() - start,
    )


def analyze_onnx(
    model: onnx.ModelProto | str | os.PathLike[str], *, base_dir: str | None = None
) -> FoldReport:
    """What :func:`fold_onnx` would do, without changing ``model``."""
    return fold_onnx(model, base_dir=base_dir).report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
