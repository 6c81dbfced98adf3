"""Writing the JSON document a run asks for: to stdout and/or atomically to a file
(:func:`bnfold.onnx.io.write_text_atomic`; the paths were checked before any work, by
:func:`bnfold.cli.paths.check_writable`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from bnfold.cli.console import silence_stdout
from bnfold.errors import BnfoldError
from bnfold.onnx.io import write_text_atomic


def emit_json(document: dict[str, Any], *, to_stdout: bool, path: str | None) -> None:
    """``document`` as indented JSON, to stdout and/or atomically to ``path``."""
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if path is not None:
        write_text_atomic(path, text)
    if to_stdout:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:  # a full disk, a closed stdout: the caller asked for it
            silence_stdout()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BnfoldError(f"cannot write the JSON report to stdout ({reason})") from exc
