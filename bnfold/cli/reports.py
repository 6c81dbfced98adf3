"""Writing the reports a run asks for: the JSON document (stdout and/or a file) and any other
report file, always atomically, with the report paths checked before any work is done."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from bnfold.cli.console import silence_stdout
from bnfold.errors import BnfoldError
from bnfold.onnx.io import write_text_atomic
from bnfold.onnx.io.atomic import check_output


def check_writable(path: str | None, option: str) -> None:
    """Refuse a report path whose folder does not exist, or that names a special file or an
    unwritable place, before doing any work."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise typer.BadParameter(f"{path} is a directory", param_hint=option)
    if not os.path.isdir(folder):
        raise typer.BadParameter(f"{path}: folder {folder} does not exist", param_hint=option)
    check_output(os.path.abspath(path), path)


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
