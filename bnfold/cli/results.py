"""What a command run produces: frozen dataclasses for ``bnfold MODEL`` (:class:`FoldOutcome`)
and ``bnfold check`` (:class:`CheckResult` of :class:`ModelCheck`), their exit codes and their
JSON documents (the schema the README documents). Nothing here prints or reads a model."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfold.cli.versions import bnfold_version
from bnfold.report import FoldReport, VerifyReport, jsonable

if TYPE_CHECKING:  # bnfold.verify imports onnxruntime: only when a command verifies
    from bnfold.cli.npz_casts import InputCast
    from bnfold.verify import VerifyOptions

EXIT_OK = 0
EXIT_FINDINGS = 1
"""Verification failed, a foldable BN left in ``check``, ``--strict`` with a BN left."""
EXIT_USAGE = 2
"""A usage or input error."""
EXIT_INTERNAL = 3
"""A bug in bnfold."""
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it


class Interrupted(Exception):
    """Ctrl-C, saying what was already written (an empty message: nothing was)."""


SCHEMA_VERSION = 1
"""Version of the JSON documents; bumped when a key changes meaning or disappears."""


def envelope(command: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The top level shared by every JSON document: schema and tool version, then the payload."""
    return {
        "schema_version": SCHEMA_VERSION,
        "bnfold_version": bnfold_version(),
        "command": command,
        **payload,
    }


@dataclass(frozen=True)
class ModelStats:
    """Size of a model on disk and in nodes."""

    nodes: int
    """Nodes in the main graph, its subgraphs (If/Loop/Scan bodies) and model-local functions."""
    batchnorm: int
    """BatchNormalization nodes among them."""
    bytes: int
    """The ``.onnx`` file plus every external-data file it references."""
    external_files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "batchnorm": self.batchnorm, "bytes": self.bytes}


# --------------------------------------------------------------------------------------------
# fold


@dataclass(frozen=True)
class FoldOutcome:
    """Everything the CLI knows after ``bnfold MODEL``: what ran, what was written, and why not."""

    source: str
    output: str
    written: bool
    exit_code: int
    report: FoldReport | None = None
    """The ONNX fold (for PyTorch inputs: the fold of the exported graph)."""
    module_report: FoldReport | None = None
    """PyTorch inputs only: the module-level fold."""
    verification: VerifyReport | None = None
    before: ModelStats | None = None
    after: ModelStats | None = None
    seconds: float = 0.0
    error: str | None = None
    """Why nothing was written (verification failed) or why the exit code is 1 (--strict)."""
    strict: bool = False
    export: Mapping[str, Any] | None = None
    """PyTorch inputs only: ``ExportResult.extra`` (exporter, ``torch_vs_onnx`` comparison)."""
    input_casts: tuple[InputCast, ...] = ()
    """``--inputs`` arrays cast to the model's input dtypes (every value exact, or refused)."""

    def to_dict(self) -> dict[str, Any]:
        return envelope(
            "fold",
            {
                "input": self.source,
                "output": self.output,
                "written": self.written,
                "exit_code": self.exit_code,
                "error": self.error,
                "strict": self.strict,
                "seconds": self.seconds,
                "before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None,
                "report": self.report.to_dict() if self.report else None,
                "module_report": self.module_report.to_dict() if self.module_report else None,
                "verification": self.verification.to_dict() if self.verification else None,
                "export": jsonable(dict(self.export)) if self.export is not None else None,
                "input_casts": [c.to_dict() for c in self.input_casts],
            },
        )


# --------------------------------------------------------------------------------------------
# check


class CheckStatus(str, enum.Enum):
    """Outcome of checking one model. The value is the code used in JSON and JUnit XML."""

    CLEAN = "clean"
    FINDINGS = "findings"
    ERROR = "error"


@dataclass(frozen=True)
class CheckOptions:
    """What to check. Shared by every model of a run, so it must pickle (worker processes)."""

    against: str | None = None
    """Reference model to verify equivalence with; only meaningful for a single model."""
    strict: bool = False
    """Count every BatchNormalization left (for any reason) as a finding."""
    verify: VerifyOptions | None = None
    """Inputs and tolerances of the ``against`` comparison; None: the defaults."""


@dataclass(frozen=True)
class ModelCheck:
    """The result of checking one model."""

    path: str
    status: CheckStatus
    report: FoldReport | None = None
    """``folded`` = BN that could be folded, ``skipped`` = BN that must stay, with reasons."""
    verification: VerifyReport | None = None
    stats: ModelStats | None = None
    findings: tuple[str, ...] = ()
    """One sentence per finding, for people (JUnit failure text, the summary table)."""
    error: str | None = None
    """Why the model could not be checked (one line, naming the file)."""
    error_type: str | None = None
    """``input-error`` (bad file, exit 2) or ``internal-error`` (a bug in bnfold)."""
    traceback: str | None = field(default=None, repr=False)
    """Formatted traceback of ``error``, for ``--debug``; not part of the JSON."""
    seconds: float = 0.0

    @property
    def bn_foldable(self) -> int:
        return len(self.report.folded) if self.report else 0

    @property
    def bn_left(self) -> int:
        return len(self.report.skipped) if self.report else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status.value,
            "bn_total": self.report.bn_total if self.report else None,
            "bn_foldable": self.bn_foldable if self.report else None,
            "bn_left": self.bn_left if self.report else None,
            "findings": list(self.findings),
            "report": self.report.to_dict() if self.report else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "nodes": self.stats.nodes if self.stats else None,
            "bytes": self.stats.bytes if self.stats else None,
            "error": self.error,
            "error_type": self.error_type,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CheckResult:
    """The result of checking many models, in the order they were given."""

    models: tuple[ModelCheck, ...]
    options: CheckOptions = field(default_factory=CheckOptions)
    seconds: float = 0.0

    def count(self, status: CheckStatus) -> int:
        return sum(1 for m in self.models if m.status is status)

    @property
    def exit_code(self) -> int:
        """0 when every model is clean, 1 when any has findings, 2 when any could not be read,
        3 when checking one hit a bug in bnfold (so CI can tell a bug from bad input)."""
        if any(m.error_type == "internal-error" for m in self.models):
            return EXIT_INTERNAL
        if any(m.status is CheckStatus.ERROR for m in self.models):
            return EXIT_USAGE
        if any(m.status is CheckStatus.FINDINGS for m in self.models):
            return EXIT_FINDINGS
        return EXIT_OK

    def summary(self) -> dict[str, int]:
        return {
            "models": len(self.models),
            "clean": self.count(CheckStatus.CLEAN),
            "findings": self.count(CheckStatus.FINDINGS),
            "errors": self.count(CheckStatus.ERROR),
            "bn_total": sum(m.report.bn_total for m in self.models if m.report),
            "bn_foldable": sum(m.bn_foldable for m in self.models),
            "bn_left": sum(m.bn_left for m in self.models),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "against": self.options.against,
            "strict": self.options.strict,
            "exit_code": self.exit_code,
            "seconds": self.seconds,
            "summary": self.summary(),
            "models": [m.to_dict() for m in self.models],
        }

    def document(self) -> dict[str, Any]:
        """The ``bnfold check --json`` document."""
        return envelope("check", self.to_dict())
