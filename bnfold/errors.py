"""Typed errors for bad input. The CLI maps every BnfoldError to one line on stderr and exit 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import ExportResult, FoldResult, VerifyReport
    from .verify.rollback import Verified


class BnfoldError(Exception):
    """Base class: a problem with the user's input or environment, with a message they can act on.

    ``cli_message``, when given, says the same in the command line's words (``--shape x=1x3x8x8``
    where the API's message says ``shapes={'x': (1, 3, 8, 8)}``); the CLI prints it instead."""

    exit_code: int = 2

    def __init__(self, message: str = "", *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message


class InputError(BnfoldError):
    """A file is missing, unreadable, not an ONNX model, or its external data is missing."""


class ShapeError(BnfoldError):
    """An input dimension could not be resolved; the message names the input and says how to pass --shape."""


class MissingDependencyError(BnfoldError):
    """An optional extra (torch) is needed for this path."""


class VerificationError(BnfoldError):
    """Safe folding could not produce a model that passes verification; ``report`` holds the
    details, ``result`` what was folded (not written): the fold's result, or a torch export's."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        report: VerifyReport | None = None,
        result: FoldResult | ExportResult | Verified | None = None,
    ) -> None:
        super().__init__(message)
        self.report = report
        self.result = result
