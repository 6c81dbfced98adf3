"""Which external data file a save writes, and which data files it retires.

An output ``out.onnx`` keeps its tensors in ``out.onnx.data``, or in ``out.onnx.<n>.data`` when
that name is taken by a file the source model reads or the model being replaced still uses:
the new data never overwrites data that a model on disk needs. Once the new model is in
place, the replaced model's data files named after the output are deleted (never a source's).
"""

from __future__ import annotations

import contextlib
import mmap
import os

from bnfold.errors import BnfoldError, InputError

from .external import is_inside, resolve_location
from .wire import (
    F_ENTRY_KEY,
    F_ENTRY_VALUE,
    F_GRAPH_INITIALIZER,
    F_MODEL_GRAPH,
    F_TENSOR_EXTERNAL_DATA,
    WT_LEN,
    WireError,
    iter_fields,
)


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
    out: set[str] = set()
    for location in _scan_locations(out_path):
        with contextlib.suppress(BnfoldError):
            out.add(os.path.realpath(resolve_location(out_dir, location, "", out_path)))
    return out


def _scan_locations(path: str) -> set[str]:
    """The ``location`` values of the main graph's initializers, read at the wire level (no parse)."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for number, wire_type, _, start, end in iter_fields(mm, 0, len(mm)):
                if number == F_MODEL_GRAPH and wire_type == WT_LEN:
                    _scan_graph(mm, start, end, found)
    except (OSError, ValueError, WireError):
        return set()
    return found


def _scan_graph(mm: mmap.mmap, start: int, end: int, found: set[str]) -> None:
    for number, wire_type, _, t_start, t_end in iter_fields(mm, start, end):
        if number != F_GRAPH_INITIALIZER or wire_type != WT_LEN:
            continue
        for field, _, _, e_start, e_end in iter_fields(mm, t_start, t_end):
            if field != F_TENSOR_EXTERNAL_DATA:
                continue
            entry = {key: mm[v_start:v_end] for key, _, _, v_start, v_end in iter_fields(mm, e_start, e_end)}
            if entry.get(F_ENTRY_KEY) == b"location" and F_ENTRY_VALUE in entry:
                found.add(entry[F_ENTRY_VALUE].decode("utf-8", "replace"))


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
    out_dir = os.path.realpath(os.path.dirname(out_path))
    own = set(own_data_names(out_path))
    return sorted(
        p for p in old_data if os.path.dirname(p) == out_dir and os.path.basename(p) in own and p not in keep
    )
