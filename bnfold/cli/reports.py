"""Writing the reports a run asks for: the JSON document (stdout and/or a file) and any other
report file, always atomically, with the report paths checked before any work is done."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import typer

from bnfold.errors import InputError


def check_writable(path: str | None, option: str) -> None:
    """Refuse a report path whose folder does not exist before doing any work."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise typer.BadParameter(f"{path} is a directory", param_hint=option)
    if not os.path.isdir(folder):
        raise typer.BadParameter(f"{path}: folder {folder} does not exist", param_hint=option)


def emit_json(document: dict[str, Any], *, to_stdout: bool, path: str | None) -> None:
    """``document`` as indented JSON, to stdout and/or atomically to ``path``."""
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if path is not None:
        write_text_atomic(path, text)
    if to_stdout:
        sys.stdout.write(text)
        sys.stdout.flush()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename:
    an interrupted run leaves the old file or the complete new one, never a partial one.

    Moves to ``bnfold.onnx.io.write_text_atomic`` (the one atomic writer) at integration."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
