"""The one place that folds, verifies, rolls back and writes.

::

    fold_onnx(model)  ─┐                      ┌─ fold (the pass, bnfold.onnx)
    fold_path(src,dst)─┼─> fold_loaded(...) ──┼─ verify against the reference (bnfold.verify)
    torch export      ─┘   or the file flow   ├─ revert the folds that diverge, verify again
                                              └─ write: staged beside the output, moved in last

:func:`fold_loaded` works on a loaded ``ModelProto`` (the CLI's torch path and
:func:`bnfold.export` call it with a separate reference); :func:`fold_path` works file to file:
it loads lazily (large initializers are never parsed into Python), saves the candidate into a
staging folder beside the output (:class:`bnfold.onnx.io.Staging`), verifies the saved file
against the source, and publishes it (data first, then the model) only once it passed (or
``force``). ``in_place=True`` writes over the source the same way,
so a failed or interrupted run leaves the source as it was.

Every public function takes the six verification options as keywords (``inputs``, ``shapes``,
``seed``, ``samples``, ``atol``, ``rtol``) or as one ``options=VerifyOptions(...)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Sequence

from bnfold.onnxlib import onnx

from .errors import InputError
from .fold_math import Undecided
from .onnx.fold import count_bn, fold_model
from .onnx.io import Staging, is_lazy, load_model, save_model
from .report import FoldReport, FoldResult, VerifyReport
from .verify.options import DEFAULT, InputsLike, Shapes, VerifyOptions, verify_options

log = logging.getLogger(__name__)

__all__ = ["Progress", "analyze_onnx", "count_bn", "fold_loaded", "fold_onnx", "fold_path"]

Progress = Callable[[str], None]
"""Called with the step about to start: ``loading``, ``folding``, ``saving``, ``verifying``, then
the verification's own steps (``verifying: calibrating ...``, ``verifying: sample 2/3``,
``verifying: folded weights``)."""

ModelOrPath = onnx.ModelProto | str | os.PathLike


def fold_onnx(
    model: ModelOrPath,
    *,
    inplace: bool = False,
    base_dir: str | None = None,
    exclude: Collection[str] = (),
    verify: bool = False,
    inputs: InputsLike | None = None,
    shapes: Shapes | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    options: VerifyOptions | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model``.

    ``model`` is a ``ModelProto`` (copied unless ``inplace=True``) or a path (loaded; external
    data is read relative to it). ``exclude`` lists BN output tensor names to leave alone.

    With ``verify=True`` the folded model is checked against the original with onnxruntime at
    ``ORT_DISABLE_ALL``, every fold whose tensors diverge is reverted (reason
    ``verification-failed``), and the result is verified again; a model that still fails raises
    :class:`~bnfold.errors.VerificationError` carrying the report.
    """
    opts = verify_options(
        options, inputs=inputs, shapes=shapes, seed=seed, samples=samples, atol=atol, rtol=rtol
    )
    if isinstance(model, onnx.ModelProto):
        source = model
    elif isinstance(model, (str, os.PathLike)):
        source = load_model(os.fspath(model))
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(os.fspath(model)))
        inplace = True  # we own the freshly loaded copy
    else:
        raise InputError(f"fold_onnx: expected an onnx.ModelProto or a path, got {type(model).__name__}")
    return fold_loaded(
        source, inplace=inplace, base_dir=base_dir, exclude=exclude, verify=verify, options=opts
    )


def analyze_onnx(model: ModelOrPath, *, base_dir: str | None = None) -> FoldReport:
    """What :func:`fold_onnx` would do, without changing ``model``: ``folded`` lists the BN
    nodes that can still be folded, ``skipped`` those that would be left, with reasons."""
    return fold_onnx(model, base_dir=base_dir).report


def fold_loaded(
    model: onnx.ModelProto,
    *,
    inplace: bool = False,
    base_dir: str | None = None,
    exclude: Collection[str] = (),
    verify: bool = False,
    options: VerifyOptions = DEFAULT,
    force: bool = False,
    reference: ModelOrPath | None = None,
    intermediates: bool = True,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold a loaded model; with ``verify``, verify it against ``reference`` and roll back.

    ``reference`` is what the folded model must compute: by default ``model`` as it was (it is
    not changed before the verified result replaces it, when ``inplace``); a torch export passes
    the ONNX export of the unfolded module instead. ``intermediates=False`` compares graph
    outputs only (a reference whose tensor names mean something else). With ``force`` a result
    that still fails verification is returned (its report says so) instead of raising
    :class:`~bnfold.errors.VerificationError`.
    """
    start = time.perf_counter()
    excluded = frozenset(exclude)
    if not verify:
        work = model if inplace else _copy(model)
        report = fold_model(work, base_dir=base_dir, exclude=excluded)
        return FoldResult(model=work, report=report, seconds=time.perf_counter() - start)

    def make(excl: frozenset[str]) -> tuple[onnx.ModelProto, FoldReport, onnx.ModelProto]:
        work = _copy(model)
        rep = fold_model(work, base_dir=base_dir, exclude=excl)
        return work, rep, work

    from .verify.rollback import fold_verified  # lazy: onnxruntime and onnx are loaded to verify

    done = fold_verified(
        make,
        model if reference is None else reference,
        options=options,
        exclude=excluded,
        force=force,
        intermediates=intermediates,
        unchanged=(lambda folded: folded.graph == model.graph) if reference is None else None,
        progress=progress,
    )
    folded = done.payload
    if inplace:
        model.CopyFrom(folded)
        folded = model
    return FoldResult(
        model=folded, report=done.report, verification=done.verification, seconds=time.perf_counter() - start
    )


def fold_path(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    in_place: bool = False,
    verify: bool = True,
    force: bool = False,
    inputs: InputsLike | None = None,
    shapes: Shapes | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    options: VerifyOptions | None = None,
    external_data: bool | None = None,
    exclude: Sequence[str] = (),
    progress: Progress | None = None,
) -> FoldResult:
    """Fold ``src`` and write ``dst`` (or over ``src`` with ``in_place=True``); see the module docstring.

    Raises :class:`~bnfold.errors.VerificationError` (nothing written) when the folded model
    does not pass verification even after reverting the diverging folds, unless ``force``.
    ``external_data``: None keeps the source's layout (a data file if it has one).

    The returned ``FoldResult.model`` is the lazily loaded graph (large tensors are stubs that
    point into ``dst`` after a verified fold, else into ``src`` -- a folded one as a deferred
    fold whose values ``read_array`` and ``save_model`` compute -- or held in memory); the
    model itself is the file written.
    """
    opts = verify_options(
        options, inputs=inputs, shapes=shapes, seed=seed, samples=samples, atol=atol, rtol=rtol
    )
    start = time.perf_counter()
    src = os.path.abspath(os.fspath(src))
    if dst is None and not in_place:
        raise InputError("fold_path: pass dst, or in_place=True")
    dst = src if dst is None else os.path.abspath(os.fspath(dst))
    if src == dst and not in_place:
        raise InputError(f"{dst}: refusing to overwrite the input (write elsewhere, or pass in_place=True)")
    if in_place and dst != src:
        raise InputError(f"fold_path: in_place=True writes over {src}; dst names another file ({dst})")
    dst_dir = os.path.dirname(dst) or "."
    if not os.path.isdir(dst_dir):
        raise InputError(f"{dst}: cannot write: directory {dst_dir} does not exist")
    for optimistic in (True, False):
        # large folds are first checked where they are written (bnfold.fold_optimistic); when
        # one might not be exact, the whole fold runs again with every decision made first
        try:
            model, report, verification = _fold_file(
                src,
                dst,
                in_place=in_place,
                verify=verify,
                force=force,
                options=opts,
                external_data=external_data,
                exclude=exclude,
                note=progress or (lambda _msg: None),
                optimistic=optimistic,
            )
            break
        except Undecided as why:
            if not optimistic:  # pragma: no cover - a decided fold is never undecided
                raise
            log.debug("%s: folding again, deciding every fold first (%s)", src, why)
    return FoldResult(
        model=model, report=report, verification=verification, seconds=time.perf_counter() - start
    )


def _fold_file(
    src: str,
    dst: str,
    *,
    in_place: bool,
    verify: bool,
    force: bool,
    options: VerifyOptions,
    external_data: bool | None,
    exclude: Sequence[str],
    note: Progress,
    optimistic: bool,
) -> tuple[onnx.ModelProto, FoldReport, VerifyReport | None]:
    """:func:`fold_path` once: ``(model, report, verification)``; ``optimistic`` is passed to
    ``fold_model`` (:class:`~bnfold.fold_math.Undecided` leaves nothing written)."""
    src_dir = os.path.dirname(src)
    # whether the last make() left the graph as loaded: compared within one load, since a second
    # lazy load of the same file names its weight stubs differently
    graph_unchanged = [False]

    def make(
        excl: frozenset[str], out_path: str, location: str | None
    ) -> tuple[str, FoldReport, onnx.ModelProto]:
        note("loading")
        model = load_model(src, lazy=True)
        # "keep the input's layout" is decided on the source: a fold may replace every
        # external tensor with a new in-memory one, and the output must still use a data file
        layout = external_data
        if layout is None and _uses_external_data(model):
            layout = True
        note("folding")
        before = model.graph.SerializeToString()  # weightless: lazy stubs, not the weights
        report = fold_model(model, base_dir=src_dir, exclude=excl, optimistic=optimistic)
        graph_unchanged[0] = model.graph.SerializeToString() == before
        note("saving")
        save_model(model, out_path, source_dir=src_dir, external_data=layout, location=location)
        return out_path, report, model

    if not verify and not in_place:  # save_model writes atomically by itself
        _, report, model = make(frozenset(exclude), dst, None)
        return model, report, None

    with Staging(dst, reads=[src]) as stage:

        def make_staged(excl: frozenset[str]) -> tuple[str, FoldReport, onnx.ModelProto]:
            for leftover in os.listdir(stage.folder):
                os.remove(os.path.join(stage.folder, leftover))
            path, rep, model = make(excl, stage.path, stage.location)
            if rep.folded:  # the folded weights are in the staged file: keep no copy in memory
                model = load_model(path, lazy=True)
            note("verifying")
            return path, rep, model

        if verify:

            def unchanged(folded: onnx.ModelProto) -> bool:
                return graph_unchanged[0]

            from .verify.rollback import fold_verified

            done = fold_verified(
                make_staged,
                src,
                options=options,
                exclude=frozenset(exclude),
                force=force,
                unchanged=unchanged,
                progress=note,
            )
            model, report, verification = done.payload, done.report, done.verification
        else:
            _, report, model = make(frozenset(exclude), stage.path, stage.location)
            verification = None
        stage.publish()
    if verify and report.folded:  # it pointed into the staged file
        model = load_model(dst, lazy=True)
    return model, report, verification


def _uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model stores tensors in external data files (lazy stubs do not count)."""
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t) for t in model.graph.initializer
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
