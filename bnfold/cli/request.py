"""The fold command's options once checked (:class:`FoldRequest`), and the outcome of running
them: written (:func:`written`) or refused by verification (:func:`not_written`). Shared by the
ONNX path (:mod:`bnfold.cli.fold`) and the PyTorch path (:mod:`bnfold.cli.fold_torch`)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from bnfold.cli.console import one_line
from bnfold.cli.paths import TORCH_SUFFIXES
from bnfold.cli.results import EXIT_FINDINGS, EXIT_OK, FoldOutcome
from bnfold.errors import VerificationError
from bnfold.report import FoldReport, VerifyReport, VerifyStatus

if TYPE_CHECKING:  # bnfold.verify imports onnxruntime: only when a fold runs
    from bnfold.verify import VerifyOptions


@dataclasses.dataclass(frozen=True)
class FoldRequest:
    """The fold command's options, checked: what to read, where to write, how to verify."""

    source: str
    """A model path, or the ``--factory`` spec."""
    output: str
    verify: bool
    force: bool
    options: VerifyOptions
    """Inputs and tolerances of the verification (``--inputs`` and ``--shape`` also build the
    example inputs of a PyTorch export)."""
    external_data: bool | None
    exclude: tuple[str, ...]
    output_names: tuple[str, ...]
    """PyTorch: the exported outputs' names (empty: the exporter's)."""
    strict: bool
    factory: str | None
    weights: str | None
    trust_pickles: bool = False
    """PyTorch: allow a .pt2 archive's pickled members to be loaded (they run code)."""

    @property
    def is_torch(self) -> bool:
        return self.factory is not None or self.source.lower().endswith(TORCH_SUFFIXES)


def written(
    req: FoldRequest,
    *,
    report: FoldReport | None,
    verification: VerifyReport | None,
    start: float,
    **fields: Any,
) -> FoldOutcome:
    """The outcome of a fold that wrote ``req.output``: exit 1 when verification failed
    (``--force``) or, with ``--strict``, when a BN is left."""
    error = None
    if verification is not None and not verification.passed:
        error = f"verification {verification.status.value}; written because of --force"
    elif req.strict and report is not None and report.skipped:
        n = len(report.skipped)
        error = f"--strict: {n} BatchNormalization node{'s' if n != 1 else ''} left"
    return FoldOutcome(
        source=req.source,
        output=req.output,
        written=True,
        exit_code=EXIT_FINDINGS if error else EXIT_OK,
        report=report,
        verification=verification,
        seconds=time.perf_counter() - start,
        error=error,
        strict=req.strict,
        **fields,
    )


def not_written(req: FoldRequest, exc: VerificationError, *, start: float, **fields: Any) -> FoldOutcome:
    """The outcome of a fold whose verification did not pass: nothing written, exit 1."""
    verification = exc.report if exc.report is not None else getattr(exc.result, "verification", None)
    not_run = verification is not None and verification.status is VerifyStatus.NOT_RUN
    hint = "--force writes it anyway" + (", --no-verify skips verification" if not_run else "")
    return FoldOutcome(
        source=req.source,
        output=req.output,
        written=False,
        exit_code=EXIT_FINDINGS,
        verification=verification,
        seconds=time.perf_counter() - start,
        error=f"{one_line(str(exc))} ({hint})",
        strict=req.strict,
        **fields,
    )
