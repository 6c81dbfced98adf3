"""Fold a file into a file: load lazily, fold, save atomically, verify the saved file, roll back.

This is what the CLI runs. Large initializers are never parsed into Python (see
:func:`bnfold.io.load_model` with ``lazy=True``); the saved candidate is verified against the
source file with onnxruntime, and ``dst`` appears only once the candidate passed (or ``force``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx

from .errors import InputError
from .onnx_fold import _fold_model
from .report import FoldReport, FoldResult

Progress = Callable[[str], None]


def fold_path(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    verify: bool = True,
    force: bool = False,
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    external_data: bool | None = None,
    exclude: Sequence[str] = (),
    progress: Progress | None = None,
) -> FoldResult:
    """Fold ``src`` and write ``dst``; see the module docstring.

    Raises :class:`~bnfold.errors.VerificationError` (``dst`` untouched) when the folded model
    does not pass verification even after reverting the diverging folds, unless ``force``.

    The returned ``FoldResult.model`` is the lazily loaded graph (large tensors are stubs that
    point into ``src``); the model itself is the file at ``dst``.
    """
    from .io import load_model, save_model

    start = time.perf_counter()
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if src == dst:
        raise InputError(f"{dst}: refusing to overwrite the input (write elsewhere, or use in-place mode)")
    src_dir = os.path.dirname(src)
    note = progress or (lambda _msg: None)

    dst_dir = os.path.dirname(dst) or "."
    if not os.path.isdir(dst_dir):
        raise InputError(f"{dst}: cannot write: directory {dst_dir} does not exist")

    def make(excl: frozenset[str], out_path: str) -> tuple[str, FoldReport, onnx.ModelProto]:
        note("loading")
        model = load_model(src, lazy=True)
        # "keep the input's layout" is decided on the source: a fold may replace every
        # external tensor with a new in-memory one, and the output must still use a data file
        layout = external_data
        if layout is None and _uses_external_data(model):
            layout = True
        note("folding")
        report = _fold_model(model, base_dir=src_dir, exclude=excl)
        note("saving")
        save_model(model, out_path, source_dir=src_dir, external_data=layout)
        return out_path, report, model

    if not verify:
        _, report, model = make(frozenset(exclude), dst)
        return FoldResult(model=model, report=report, seconds=time.perf_counter() - start)

    from .safe import fold_verified

    staging = tempfile.mkdtemp(prefix=".bnfold-", dir=dst_dir)
    try:
        staged = os.path.join(staging, os.path.basename(dst))

        def make_staged(excl: frozenset[str]) -> tuple[str, FoldReport, onnx.ModelProto]:
            for leftover in os.listdir(staging):
                os.remove(os.path.join(staging, leftover))
            path, rep, model = make(excl, staged)
            note("verifying")
            return path, rep, model

        done = fold_verified(
            make_staged,
            src,
            exclude=frozenset(exclude),
            inputs=inputs,
            shapes=shapes,
            seed=seed,
            samples=samples,
            atol=atol,
            rtol=rtol,
            force=force,
        )
        # data files first, the model last: a reader never sees a model without its data
        names = sorted(os.listdir(staging), key=lambda n: n == os.path.basename(dst))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(dst_dir, name))
        return FoldResult(
            model=done.payload,
            report=done.report,
            verification=done.verification,
            seconds=time.perf_counter() - start,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model stores tensors in external data files (lazy stubs do not count)."""
    from .io import is_lazy

    return any(
        t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t) for t in model.graph.initializer
    )
