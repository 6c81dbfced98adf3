"""The versions a run reports: bnfold's (in every JSON document) and its engines' (``--version``),
read from the installed distributions' metadata, so nothing heavy is imported."""

from __future__ import annotations

import importlib.metadata


def bnfold_version() -> str:
    try:
        return importlib.metadata.version("bnfold")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def versions_line() -> str:
    """``bnfold 0.1.0 (onnx 1.23.2, onnxruntime 1.31.1, torch 2.13.0)``, without importing them."""
    parts = []
    for dist in ("onnx", "onnxruntime", "torch"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            if dist != "torch":
                parts.append(f"{dist} missing")
    return f"bnfold {bnfold_version()} ({', '.join(parts)})"
