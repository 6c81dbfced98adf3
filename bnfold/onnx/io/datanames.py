"""Which external data file a save writes, and which data files it retires.

An output ``out.onnx`` keeps its tensors in ``out.onnx.data``, or in ``out.onnx.<n>.data`` when
that name is taken by a file the source model reads or the model being replaced still uses:
the new data never overwrites data that a model on disk needs. Once the new model is in
place, the replaced model's data files named after the output are deleted (never a source's).
"""

from __future__ import annotations

import contextlib
import os

from bnfold.errors import BnfoldError, InputError

from .external import data_files, is_inside, resolve_location
from .load import load_model


def own_data_names(out_path: str) -> list[str]:
    """The data file names bnfold gives the output at ``out_path``, in order of preference."""
    base = os.path.basename(out_path)
    return [f"{base}.data"] + [f"{base}.{i}.data" for i in range(1, 1000)]


def old_data_files(out_path: str) -> set[str]:
    """Real paths of the data files the model now at ``out_path`` uses (none if it is not one).

    Only looked up when a data file named after the output exists: nothing else can clash.
    """
    out_dir = os.path.dirname(out_path)
    if not os.path.isfile(out_path) or not any(
        os.path.exists(os.path.join(out_dir, n)) for n in own_data_names(out_path)[:8]
    ):
        return set()
    try:
        old = load_model(out_path, lazy=True)  # reads no payload
    except BnfoldError:
        return set()
    out: set[str] = set()
    for location in data_files(old):
        with contextlib.suppress(BnfoldError):
            out.add(os.path.realpath(resolve_location(out_dir, location, "", out_path)))
    return out


def choose_data_name(out_path: str, display: str, location: str | None, taken: set[str]) -> str:
    """The data file's name for ``out_path``: ``location`` if given, else the first free own name.

    ``taken``: real paths that must not be written (sources, the replaced model's data).
    """
    out_dir = os.path.dirname(out_path)
    if location is not None:
        if not is_inside(location):
            raise InputError(
                f"{display}: external data location {location!r} must be a relative path inside the output's directory"
            )
        target = os.path.realpath(os.path.join(out_dir, location))
        if target in taken or target == os.path.realpath(out_path):
            raise InputError(
                f"{display}: external data location {location!r} is a file the source model reads from "
                "or the model being replaced uses; choose another name"
            )
        return location
    for name in own_data_names(out_path):
        if os.path.realpath(os.path.join(out_dir, name)) not in taken:
            return name
    raise BnfoldError(f"{display}: no free name for the external data file")  # pragma: no cover


def obsolete_data_files(out_path: str, old_data: set[str], keep: set[str]) -> list[str]:
    """The replaced model's data files to delete: only those named after the output, none in ``keep``."""
    out_dir = os.path.dirname(out_path)
    own = {os.path.realpath(os.path.join(out_dir, n)) for n in own_data_names(out_path)}
    return sorted(p for p in old_data if p in own and p not in keep)
