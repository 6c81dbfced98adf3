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
from collections.abc import Sequence
from typing import Any

from bnfold.errors import BnfoldError, InputError
from bnfold.onnxlib import onnx

from .external import is_inside, resolve_location
from .wire import (
    F_ENTRY_KEY,
    F_ENTRY_VALUE,
    F_TENSOR_EXTERNAL_DATA,
    WT_LEN,
    WireError,
    iter_fields,
    release_pages,
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
    for location in scan_locations(out_path):
        with contextlib.suppress(BnfoldError):
            out.add(os.path.realpath(resolve_location(out_dir, location, "", out_path)))
    return out


def _tensor_paths(descriptor: Any) -> dict[int, Any]:
    """Fields of ``descriptor`` whose messages can hold a TensorProto: number -> descriptor."""
    found = _TENSOR_PATHS.get(descriptor.full_name)
    if found is None:  # not setdefault: its argument would walk the descriptors on every call
        found = _TENSOR_PATHS[descriptor.full_name] = _find_tensor_paths(descriptor, set())
    return found


_TENSOR_PATHS: dict[str, dict[int, Any]] = {}


def _find_tensor_paths(descriptor: Any, seen: set[str]) -> dict[int, Any]:
    seen = seen | {descriptor.full_name}
    out: dict[int, Any] = {}
    for fd in descriptor.fields:
        sub = fd.message_type
        if sub is None:
            continue
        if (
            sub.full_name == onnx.TensorProto.DESCRIPTOR.full_name
            or sub.full_name in seen
            or _find_tensor_paths(sub, seen)
        ):
            out[fd.number] = sub
    return out


def scan_locations(path: str) -> set[str]:
    """The external data ``location`` of every tensor in the model file at ``path``, anywhere
    (graph, subgraphs, attributes, functions), read at the wire level: no parse, no payload."""
    found: set[str] = set()
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            _scan(mm, 0, len(mm), onnx.ModelProto.DESCRIPTOR, found, 0, [0])
    except (OSError, ValueError, WireError, RecursionError):
        return set()
    return found


def _scan(
    mm: mmap.mmap, start: int, end: int, descriptor: Any, found: set[str], depth: int, released: list[int]
) -> None:
    """Collect locations below ``descriptor``'s message at ``start:end``; ``released[0]``: how far
    the pages the scan passed are unmapped (see :func:`~bnfold.onnx.io.wire.release_pages`)."""
    if descriptor.full_name == onnx.TensorProto.DESCRIPTOR.full_name:
        for number, _, _, e_start, e_end in iter_fields(mm, start, end):
            if number == F_TENSOR_EXTERNAL_DATA:
                entry = {key: mm[v0:v1] for key, _, _, v0, v1 in iter_fields(mm, e_start, e_end)}
                if entry.get(F_ENTRY_KEY) == b"location" and F_ENTRY_VALUE in entry:
                    found.add(entry[F_ENTRY_VALUE].decode("utf-8", "replace"))
        released[0] = release_pages(mm, released[0], end)
        return
    paths = _tensor_paths(descriptor)
    if depth > 100:  # protobuf itself refuses deeper nesting
        raise WireError(start, truncated=False)
    for number, wire_type, _, v_start, v_end in iter_fields(mm, start, end):
        sub = paths.get(number)
        if sub is not None and wire_type == WT_LEN:
            _scan(mm, v_start, v_end, sub, found, depth + 1, released)


def model_files(path: str) -> set[str]:
    """Real paths of a model file and of every data file it names that stays inside its folder."""
    path = os.path.abspath(path)
    out = {os.path.realpath(path)}
    for location in scan_locations(path):
        with contextlib.suppress(BnfoldError):
            out.add(os.path.realpath(resolve_location(os.path.dirname(path), location, "", path)))
    return out


def ensure_not_overwriting(
    inputs: Sequence[str | os.PathLike[str]], outputs: Sequence[str | os.PathLike[str]]
) -> None:
    """Refuse, with InputError, an output that is an input model or a data file an input reads.

    For an in-place fold, leave the input itself out of ``outputs``: the save publishes it
    safely (see :mod:`bnfold.onnx.io.atomic`).
    """
    protected: dict[str, str] = {}
    for model in inputs:
        for real in model_files(os.fspath(model)):
            protected.setdefault(real, os.fspath(model))
    for out in outputs:
        real = os.path.realpath(os.fspath(out))
        if real in protected:
            source = protected[real]
            what = "the input model" if real == os.path.realpath(source) else f"a data file of {source}"
            raise InputError(f"{os.fspath(out)}: is {what}; refusing to overwrite it (write elsewhere)")


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
