"""The versions a run reports: bnfold's (in every JSON document) and its engines' (``--version``),
read from the installed distributions' metadata, so nothing heavy is imported."""

from __future__ import annotations

import importlib
import json
import urllib.parse
from typing import Any


def _metadata() -> Any:
    """``importlib.metadata``, imported when a version is asked for (9 ms a fold without a
    report does not need)."""
    return importlib.import_module("importlib.metadata")


def bnfold_version() -> str:
    metadata = _metadata()
    try:
        return str(metadata.version("bnfold"))
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def versions_line() -> str:
    """``bnfold 0.1.0 (onnx 1.23.2, onnxruntime 1.31.1, torch 2.13.0)``, without importing them."""
    metadata = _metadata()
    parts = []
    for dist in ("onnx", "onnxruntime", "torch"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            if dist != "torch":
                parts.append(f"{dist} missing")
    return f"bnfold {bnfold_version()} ({', '.join(parts)})"


def install_command(extra: str) -> str:
    """How to add ``extra`` to this installation, in the form that works for it:
    ``pip install 'bnfold[torch]'`` from an index, ``pip install -e '/src/bnfold[torch]'`` for a
    source checkout installed with ``-e`` (where ``bnfold[torch]`` would fetch another copy)."""
    metadata = _metadata()
    try:
        direct = metadata.distribution("bnfold").read_text("direct_url.json")
        info = json.loads(direct) if direct else {}
    except (metadata.PackageNotFoundError, ValueError):
        info = {}
    url = info.get("url", "") if isinstance(info, dict) else ""
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        editable = "-e " if info.get("dir_info", {}).get("editable") else ""
        return f"pip install {editable}'{path}[{extra}]'"
    return f"pip install 'bnfold[{extra}]'"
