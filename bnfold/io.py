"""Load and save ONNX models: external data, lazy loading, streaming atomic writes.

Loading
-------
:func:`load_model` reads a model and turns every problem with the file into one
:class:`~bnfold.errors.InputError` line that names it. With ``lazy=True`` it does not parse
the large initializer payloads at all: the file is ``mmap``-ed and scanned at the protobuf
wire level (``ModelProto.graph`` = field 7, ``GraphProto.initializer`` = field 5,
``TensorProto.raw_data`` = field 9, numbers taken from onnx's descriptors). Each main-graph
initializer whose ``raw_data`` is at least :data:`LAZY_THRESHOLD` bytes becomes a *stub*: a
``TensorProto`` with name, dims, data type and doc string, ``data_location=EXTERNAL`` and
``external_data`` entries ``location`` (the model file's base name), ``offset`` and
``length`` (where the payload lies in the ``.onnx`` file) plus bnfold's own entries
(``bnfold.embedded=1``, ``bnfold.base_dir``, ``bnfold.stamp``). Tensors that already live in
external data files stay references (annotated with ``bnfold.base_dir``); nothing of them is
read. Initializers inside subgraphs, sparse initializers and tensors in node attributes are
parsed normally (and their external data loaded), so they are correct but not lazy.

A stub is not a model onnxruntime or ``onnx.save`` understand (onnxruntime rejects unknown
external-data keys): read values with :func:`read_array`, write the model with
:func:`save_model`, or embed everything with :func:`materialize`.

Saving
------
:func:`save_model` writes the ``ModelProto`` wire format itself, so that it never builds one
message over 2 GB and never holds a stub's payload in Python memory: the model minus its
graph and the graph minus its initializers are serialized normally (small), the graph's
length is computed up front from the parts, and each initializer is emitted in order -- in
memory tensors serialized one at a time, stub and external payloads copied from their source
file with ``os.copy_file_range``. Fields come out in field-number order, so an embedded save
is byte-for-byte what ``model.SerializeToString()`` gives.

The write is atomic: a temporary file in the destination directory, ``fsync``, then
``os.replace``; on any error the temporary files are removed and an existing destination is
left untouched. External data goes to ``<output file name>.data`` next to the output (a
different name when that is a data file the source model reads from).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from bnfold.errors import BnfoldError, InputError

__all__ = [
    "EXTERNAL_THRESHOLD",
    "LAZY_THRESHOLD",
    "copy_except",
    "is_lazy",
    "load_model",
    "materialize",
    "read_array",
    "save_model",
]

logger = logging.getLogger(__name__)

LAZY_THRESHOLD = 64 * 1024
"""Payloads of at least this many bytes become stubs in :func:`load_model` ``(lazy=True)``.

Reading a stub costs a file open and read (~30 us, against ~3 us for an embedded tensor), so
small tensors such as BatchNormalization parameters stay in memory; they weigh little."""

EXTERNAL_THRESHOLD = 1024
"""Tensors of at least this many bytes go to the external data file when one is written."""

_PROTOBUF_LIMIT = 2**31 - 1
"""protobuf refuses to parse a message of 2 GB or more."""

_ALIGN = 4096
"""External payloads of at least this size start on a page boundary (onnxruntime can mmap them)."""

_COPY_CHUNK = 1 << 30
_WRITEBACK_EVERY = 32 << 20
_WRITE_BUFFER = 1 << 20

_MARKER = "bnfold.embedded"
_BASE_DIR = "bnfold.base_dir"
_STAMP = "bnfold.stamp"
_RESERVED_PREFIX = "bnfold."

_F_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_F_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_F_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_F_TENSOR_EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number
_F_TENSOR_DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number
_F_ENTRY_KEY = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name["key"].number
_F_ENTRY_VALUE = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name["value"].number

_WT_VARINT, _WT_I64, _WT_LEN, _WT_SGROUP, _WT_EGROUP, _WT_I32 = 0, 1, 2, 3, 4, 5

_EXTERNAL = onnx.TensorProto.EXTERNAL
_PACKED_TYPES = frozenset(
    value
    for name, value in onnx.TensorProto.DataType.items()
    if name in {"INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2"}
)


# --------------------------------------------------------------------------------------------
# protobuf wire format
# --------------------------------------------------------------------------------------------


class _WireError(Exception):
    """The bytes are not a well-formed protobuf message. ``truncated``: a field runs past the end."""

    def __init__(self, pos: int, *, truncated: bool, needed: int = 0, number: int = 0) -> None:
        super().__init__(pos)
        self.pos = pos
        self.number = number
        self.truncated = truncated
        self.needed = needed
        """For a truncated length-delimited field: the file size it needs."""


def _read_varint(buf: bytes | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _WireError(start, truncated=True)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError(start, truncated=False)


def _iter_fields(buf: bytes | mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(number, wire_type, field_start, value_start, value_end)`` for each field.

    For a length-delimited field the value span excludes the length prefix.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _WireError(field_start, truncated=False)
        if wire_type == _WT_VARINT:
            _, value_end = _read_varint(buf, pos, end)
            value_start = pos
        elif wire_type == _WT_LEN:
            length, value_start = _read_varint(buf, pos, end)
            value_end = value_start + length
        elif wire_type == _WT_I64:
            value_start, value_end = pos, pos + 8
        elif wire_type == _WT_I32:
            value_start, value_end = pos, pos + 4
        else:  # groups are not used by onnx.proto; 6 and 7 do not exist
            raise _WireError(field_start, truncated=False)
        if value_end > end:
            raise _WireError(field_start, truncated=True, needed=value_end, number=number)
        pos = value_end
        yield number, wire_type, field_start, value_start, value_end


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, _WT_LEN) + _varint(len(payload)) + payload


def _entry_bytes(key: str, value: str) -> bytes:
    entry = _len_field(_F_ENTRY_KEY, key.encode()) + _len_field(_F_ENTRY_VALUE, value.encode())
    return _len_field(_F_TENSOR_EXTERNAL_DATA, entry)


def _split_fields(buf: bytes, number: int) -> tuple[bytes, bytes]:
    """Split a serialized message into its fields numbered below ``number`` and the rest.

    protobuf serializes known fields in field-number order, so inserting field ``number``
    between the two halves gives the bytes ``SerializeToString`` would.
    """
    for field_number, _, field_start, _, _ in _iter_fields(buf, 0, len(buf)):
        if field_number > number:
            return buf[:field_start], buf[field_start:]
    return buf, b""


def _is_repeated(fd: object) -> bool:
    """``FieldDescriptor.is_repeated`` (protobuf >= 5.28), else the older ``label``."""
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


@functools.cache
def _field_table(descriptor: Any) -> dict[int, tuple[str, frozenset[int], Any]]:
    """field number -> (name, acceptable wire types, message descriptor or None)."""
    out: dict[int, tuple[str, frozenset[int], Any]] = {}
    for fd in descriptor.fields:
        if fd.type in (fd.TYPE_MESSAGE, fd.TYPE_STRING, fd.TYPE_BYTES):
            wire_types = {_WT_LEN}
        elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FIXED64, fd.TYPE_SFIXED64):
            wire_types = {_WT_I64}
        elif fd.type in (fd.TYPE_FLOAT, fd.TYPE_FIXED32, fd.TYPE_SFIXED32):
            wire_types = {_WT_I32}
        else:
            wire_types = {_WT_VARINT}
        if _is_repeated(fd):
            wire_types.add(_WT_LEN)  # packed
        out[fd.number] = (fd.name, frozenset(wire_types), fd.message_type)
    return out


# --------------------------------------------------------------------------------------------
# diagnosing files that are not ONNX models
# --------------------------------------------------------------------------------------------


def _magic_hint(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint?), not an ONNX model; export it with torch.onnx.export"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself; run `git lfs pull` to fetch it"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "an HTML/XML page (a failed download?), not an ONNX model"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (a Keras model?), not an ONNX model"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "a Python pickle (a PyTorch checkpoint?), not an ONNX model"
    if stripped.startswith((b"ir_version", b"<")):
        return "ONNX text format, not a binary ONNX model; convert it with onnx.parser"
    return None


def _first_wire_error(
    data: bytes | mmap.mmap, start: int, end: int, descriptor: Any, where: str
) -> tuple[_WireError | None, int, str] | None:
    """The first place ``data[start:end]`` stops being a well-formed ``descriptor`` message.

    Returns ``(wire_error_or_None, byte, where)``; None when the bytes look well formed.
    """
    fields = _field_table(descriptor)
    try:
        for number, wire_type, field_start, value_start, value_end in _iter_fields(data, start, end):
            info = fields.get(number)
            if info is None or wire_type not in info[1]:
                return None, field_start, f"unexpected field {number} in {where}"
            if info[2] is not None:
                found = _first_wire_error(data, value_start, value_end, info[2], f"{where}.{info[0]}")
                if found is not None:
                    return found
    except _WireError as err:
        if err.number in fields:
            where = f"{where}.{fields[err.number][0]}"
        return err, err.pos, where
    return None


def _diagnose(data: bytes | mmap.mmap, size: int) -> str:
    """One phrase saying why ``data`` does not parse as a ModelProto."""
    hint = _magic_hint(bytes(data[:64]))
    if hint:
        return hint
    found = _first_wire_error(data, 0, size, onnx.ModelProto.DESCRIPTOR, "model")
    if found is None:
        return "corrupt ONNX model (protobuf parse failed)"
    err, pos, where = found
    if err is not None and err.truncated:
        needed = f"needs {err.needed} bytes" if err.needed else "runs past the end"
        return (
            f"truncated: {where} (from byte {pos}) {needed} but the file has {size}; "
            "the copy or download was probably cut short"
        )
    if where == "model" or where.startswith("unexpected field") and where.endswith(" in model"):
        what = where if err is None else "malformed field"
        return f"not an ONNX model (protobuf parse failed at byte {pos}: {what})"
    what = where if err is None else f"malformed field in {where}"
    return f"corrupt ONNX model (protobuf parse failed at byte {pos}: {what})"


def _check_model_fields(model: onnx.ModelProto, path: str) -> None:
    missing = [
        what
        for what, ok in (
            ("graph", model.HasField("graph")),
            ("ir_version", model.HasField("ir_version")),
            ("opset_import", len(model.opset_import) > 0),
        )
        if not ok
    ]
    if missing:
        raise InputError(f"{path}: not an ONNX model (it parses, but has no {', no '.join(missing)})")


# --------------------------------------------------------------------------------------------
# external data references
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ExternalRef:
    location: str
    offset: int
    length: int | None
    base_dir: str | None
    embedded: bool
    """A bnfold stub: the payload is the raw_data field inside the source .onnx file."""
    stamp: str | None


def _external_ref(tensor: onnx.TensorProto, where: str) -> _ExternalRef:
    values: dict[str, str] = {}
    for entry in tensor.external_data:
        values[entry.key] = entry.value
    location = values.get("location", "")
    if not location:
        raise InputError(f"{where}: tensor '{tensor.name}' is marked external but has no location")
    numbers: dict[str, int | None] = {}
    for key in ("offset", "length"):
        raw = values.get(key)
        if raw is None or raw == "":
            numbers[key] = None
            continue
        try:
            numbers[key] = int(raw)
        except ValueError:
            numbers[key] = -1
        if numbers[key] is None or numbers[key] < 0:  # type: ignore[operator]
            raise InputError(f"{where}: tensor '{tensor.name}' has an invalid external data {key} {raw!r}")
    return _ExternalRef(
        location=location,
        offset=numbers["offset"] or 0,
        length=numbers["length"],
        base_dir=values.get(_BASE_DIR),
        embedded=values.get(_MARKER) == "1",
        stamp=values.get(_STAMP),
    )


def _file_stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _resolve_location(base_dir: str, location: str, tensor_name: str, where: str) -> str:
    """The path of an external data file, refused unless it stays inside ``base_dir``.

    The check is lexical (absolute paths and ``..`` components are refused); symbolic links
    inside ``base_dir`` are followed, as in the Hugging Face cache layout.
    """
    if not _is_inside(location):
        raise InputError(
            f"{where}: tensor '{tensor_name}' points outside the model's directory "
            f"(external data location {location!r}); only relative paths inside it are allowed"
        )
    parts = location.replace("\\", "/").split("/")
    return os.path.join(base_dir, *[p for p in parts if p not in ("", ".")])


def _is_inside(location: str) -> bool:
    """Whether a relative location provably stays inside its base directory (lexically)."""
    parts = location.replace("\\", "/").split("/")
    return not (
        not location
        or os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or (len(location) > 1 and location[1] == ":")
        or ".." in parts
        or "\x00" in location
        or all(p in ("", ".") for p in parts)
    )


def _payload_span(
    tensor: onnx.TensorProto, base_dir: str | None, where: str
) -> tuple[str, int, int, _ExternalRef]:
    """``(path, offset, length)`` of an external or stub tensor's bytes, checked against the file."""
    ref = _external_ref(tensor, where)
    base = ref.base_dir if ref.base_dir is not None else base_dir  # recorded by load_model: exact
    if base is None:
        raise InputError(
            f"{where}: tensor '{tensor.name}' stores its data in {ref.location!r}; "
            "pass the directory of the model it came from (base_dir / source_dir)"
        )
    path = _resolve_location(base, ref.location, tensor.name, where)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(
            f"{where}: external data file {ref.location!r} for tensor '{tensor.name}' is missing "
            f"(looked in {base}); copy it next to the model"
        ) from None
    except PermissionError:
        raise InputError(
            f"{where}: permission denied reading external data file {ref.location!r} "
            f"for tensor '{tensor.name}'"
        ) from None
    except OSError as err:
        raise InputError(
            f"{where}: cannot read external data file {ref.location!r} for tensor "
            f"'{tensor.name}' ({err.strerror})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{where}: external data location {ref.location!r} of tensor '{tensor.name}' is not a file"
        )
    if ref.embedded and ref.stamp is not None and ref.stamp != _file_stamp(st):
        raise InputError(
            f"{path}: changed on disk since it was loaded lazily (tensor '{tensor.name}'); load it again"
        )
    length = ref.length if ref.length is not None else st.st_size - ref.offset
    if ref.offset + length > st.st_size or length < 0:
        raise InputError(
            f"{where}: external data file {ref.location!r} is too short for tensor '{tensor.name}' "
            f"(needs bytes {ref.offset}..{ref.offset + length}, the file has {st.st_size}); "
            "it is truncated or belongs to another model"
        )
    return path, ref.offset, length, ref


def _read_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InputError(f"{path}: ended after {len(data)} of {length} bytes at offset {offset}")
    return data


def _graph_tensors(graph: onnx.GraphProto, *, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def _model_tensors(model: onnx.ModelProto, *, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: graph, subgraphs, node attributes, functions, training info."""
    if model.HasField("graph"):
        yield from _graph_tensors(model.graph, initializers=main_initializers)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for info in model.training_info:
        for g in (info.initialization, info.algorithm):
            yield from _graph_tensors(g)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == _EXTERNAL


def _set_embedded(tensor: onnx.TensorProto, data: bytes) -> None:
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def _reject_reserved_keys(tensor: onnx.TensorProto, path: str) -> None:
    for entry in tensor.external_data:
        if entry.key.startswith(_RESERVED_PREFIX):
            raise InputError(
                f"{path}: tensor '{tensor.name}' carries bnfold's internal external-data key "
                f"{entry.key!r} (a lazily loaded model saved with onnx.save?); save it with "
                "bnfold.io.save_model instead"
            )


def _add_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    entry = tensor.external_data.add()
    entry.key = key
    entry.value = value


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def _open_model_file(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, with one-line errors for the usual problems."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        where = "" if os.path.isdir(parent) else f" (directory {parent} does not exist either)"
        raise InputError(f"{path}: no such file{where}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            inside = sorted(n for n in os.listdir(path) if n.endswith(".onnx"))
        except OSError:
            inside = []
        hint = f"; did you mean {os.path.join(path, inside[0])}?" if len(inside) == 1 else ""
        raise InputError(f"{path}: is a directory, not an ONNX model file{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an ONNX model")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise InputError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    return fd, st


def load_model(
    path: str | os.PathLike[str], *, lazy: bool = False, load_external_data: bool = True
) -> onnx.ModelProto:
    """Load an ONNX model, raising :class:`InputError` with one actionable line on bad input.

    ``lazy=True``: large main-graph initializers become stubs that point into the file (see
    the module docstring); tensors in external data files stay references; nothing large is
    read. ``lazy=False``: the whole model is parsed and, with ``load_external_data=True``, all
    external data is loaded into memory (like ``onnx.load``). With ``load_external_data=False``
    external tensors stay plain references: pass ``base_dir``/``source_dir`` when you read or
    save them. Either way the existence and size of every external data file is checked.
    """
    path = os.fspath(path)
    fd, st = _open_model_file(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    if lazy and not _utf8(os.path.abspath(path)):
        lazy, load_external_data = False, True  # stubs record paths in protobuf strings (UTF-8)
    try:
        if lazy:
            model = _load_lazy(fd, st, path, base_dir)
        else:
            model = _load_eager(fd, st, path)
    finally:
        os.close(fd)
    _check_model_fields(model, path)
    _check_external(model, path, base_dir, lazy=lazy, load=load_external_data and not lazy)
    return model


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_eager(fd: int, st: os.stat_result, path: str) -> onnx.ModelProto:
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            data = f.read()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{path}: {_diagnose(data, len(data))}") from None
    return model


def _load_lazy(fd: int, st: os.stat_result, path: str, base_dir: str) -> onnx.ModelProto:
    size = st.st_size
    try:
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot map the file ({err})") from None
    try:
        try:
            data = _lazy_bytes(mm, size, os.path.basename(path), base_dir, _file_stamp(st))
        except _WireError:
            raise InputError(f"{path}: {_diagnose(mm, size)}") from None
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError):
            raise InputError(f"{path}: {_diagnose(mm, size)}") from None
    finally:
        mm.close()
    return model


def _lazy_bytes(mm: mmap.mmap, size: int, file_name: str, base_dir: str, stamp: str) -> bytes:
    """The model's bytes with each large main-graph ``raw_data`` replaced by a stub reference."""
    parts: list[bytes] = []
    graph_parts: list[bytes] = []
    for number, wire_type, field_start, value_start, value_end in _iter_fields(mm, 0, size):
        if number == _F_MODEL_GRAPH and wire_type == _WT_LEN:
            _lazy_graph(mm, value_start, value_end, graph_parts, file_name, base_dir, stamp)
        else:
            parts.append(mm[field_start:value_end])
    for chunk in graph_parts:  # merged by protobuf: one graph field per chunk is equivalent
        parts.append(_tag(_F_MODEL_GRAPH, _WT_LEN) + _varint(len(chunk)) + chunk)
    return b"".join(parts)


def _lazy_graph(
    mm: mmap.mmap,
    start: int,
    end: int,
    out: list[bytes],
    file_name: str,
    base_dir: str,
    stamp: str,
) -> None:
    pieces: list[bytes] = []
    run_start: int | None = None  # a run of fields copied verbatim
    common = _entry_bytes(_MARKER, "1") + _entry_bytes(_BASE_DIR, base_dir) + _entry_bytes(_STAMP, stamp)
    base_entry = _entry_bytes(_BASE_DIR, base_dir)
    for number, wire_type, field_start, value_start, value_end in _iter_fields(mm, start, end):
        if number != _F_GRAPH_INITIALIZER or wire_type != _WT_LEN:
            if run_start is None:
                run_start = field_start
            continue
        if run_start is not None:
            pieces.append(mm[run_start:field_start])
            run_start = None
        tensor = _lazy_tensor(mm, value_start, value_end, file_name, common, base_entry)
        pieces.append(_tag(_F_GRAPH_INITIALIZER, _WT_LEN) + _varint(len(tensor)) + tensor)
    if run_start is not None:
        pieces.append(mm[run_start:end])
    out.append(b"".join(pieces))


def _lazy_tensor(
    mm: mmap.mmap, start: int, end: int, file_name: str, common: bytes, base_entry: bytes
) -> bytes:
    raw_spans: list[tuple[int, int, int, int]] = []
    external = False
    for number, wire_type, field_start, value_start, value_end in _iter_fields(mm, start, end):
        if number == _F_TENSOR_RAW_DATA and wire_type == _WT_LEN:
            raw_spans.append((field_start, value_start, value_end, 0))
        elif number == _F_TENSOR_DATA_LOCATION and wire_type == _WT_VARINT:
            external = _read_varint(mm, value_start, value_end)[0] == _EXTERNAL
    if external:
        return mm[start:end] + base_entry
    if not raw_spans or raw_spans[-1][2] - raw_spans[-1][1] < LAZY_THRESHOLD:
        return mm[start:end]
    # drop every raw_data field (the last one wins in protobuf) and point at the last payload
    kept: list[bytes] = []
    pos = start
    for field_start, _, value_end, _ in raw_spans:
        kept.append(mm[pos:field_start])
        pos = value_end
    kept.append(mm[pos:end])
    _, payload_start, payload_end, _ = raw_spans[-1]
    kept.append(_entry_bytes("location", file_name))
    kept.append(_entry_bytes("offset", str(payload_start)))
    kept.append(_entry_bytes("length", str(payload_end - payload_start)))
    kept.append(common)
    kept.append(_tag(_F_TENSOR_DATA_LOCATION, _WT_VARINT) + _varint(_EXTERNAL))
    return b"".join(kept)


def _check_external(model: onnx.ModelProto, path: str, base_dir: str, *, lazy: bool, load: bool) -> None:
    """Validate every external reference; load the ones that should be in memory."""
    if lazy and model.HasField("graph"):
        for tensor in model.graph.initializer:
            if _is_external(tensor):
                _reject_reserved_keys_except_ours(tensor, path)
                if not _external_ref(tensor, path).embedded:
                    _payload_span(tensor, base_dir, path)
    for tensor in _model_tensors(model, main_initializers=not lazy):
        if not _is_external(tensor):
            continue
        _reject_reserved_keys(tensor, path)
        if tensor.HasField("raw_data"):
            continue
        file_path, offset, length, _ = _payload_span(tensor, base_dir, path)
        if load or lazy:  # lazy: everything outside the main graph's initializers is embedded
            _set_embedded(tensor, _read_bytes(file_path, offset, length))


def _reject_reserved_keys_except_ours(tensor: onnx.TensorProto, path: str) -> None:
    """A lazily loaded tensor: the file's own entries are the ones before those the scan appended."""
    entries = list(tensor.external_data)
    ours = 6 if entries and entries[-1].key == _STAMP else 1
    for entry in entries[:-ours]:
        if entry.key.startswith(_RESERVED_PREFIX):
            raise InputError(
                f"{path}: tensor '{tensor.name}' carries bnfold's internal external-data key "
                f"{entry.key!r} (a lazily loaded model saved with onnx.save?); save it with "
                "bnfold.io.save_model instead"
            )


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a stub made by :func:`load_model` ``(lazy=True)``."""
    return _is_external(tensor) and any(e.key == _MARKER and e.value == "1" for e in tensor.external_data)


# --------------------------------------------------------------------------------------------
# read_array / materialize
# --------------------------------------------------------------------------------------------


def read_array(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    """The value of any TensorProto: embedded (raw_data or typed fields), external, or a stub.

    ``base_dir`` is the directory external locations are relative to; tensors from
    :func:`load_model` record theirs, which takes precedence. Embedded tensors may come back as
    read-only views: copy before writing into them.
    """
    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    if tensor.HasField("raw_data"):  # onnx's half-converted state: the data is still here
        embedded = _tensor_head(tensor)
        embedded.raw_data = tensor.raw_data
        return numpy_helper.to_array(embedded)
    where = tensor.name or "<tensor>"
    path, offset, length, _ = _payload_span(tensor, base_dir, f"tensor '{where}'")
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(f"{path}: tensor '{where}' is a string tensor, which cannot be stored externally")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        raise InputError(f"{path}: tensor '{where}' has unknown data type {tensor.data_type}") from None
    shape = tuple(int(d) for d in tensor.dims)
    count = math.prod(shape)
    if tensor.data_type in _PACKED_TYPES or dtype.itemsize * count != length:
        if tensor.data_type not in _PACKED_TYPES:
            raise InputError(
                f"{path}: tensor '{where}' of shape {shape} and type {dtype} needs "
                f"{dtype.itemsize * count} bytes but its external data holds {length}"
            )
        tmp = onnx.TensorProto()
        tmp.CopyFrom(tensor)
        _set_embedded(tmp, _read_bytes(path, offset, length))
        return numpy_helper.to_array(tmp)
    stored = dtype if np.little_endian else dtype.newbyteorder("<")  # raw data is little-endian
    array = np.fromfile(path, dtype=stored, count=count, offset=offset)
    if array.size != count:
        raise InputError(f"{path}: ended before the {length} bytes of tensor '{where}' at offset {offset}")
    if stored is not dtype:  # pragma: no cover - big-endian hosts
        array = array.astype(dtype)
    return array.reshape(shape)


def materialize(model: onnx.ModelProto, *, base_dir: str | None = None) -> None:
    """Load every stub and external tensor of ``model`` into memory, in place.

    Afterwards the model is an ordinary in-memory ModelProto that onnxruntime and ``onnx.save``
    accept (subject to the 2 GB protobuf limit).
    """
    for tensor in _model_tensors(model):
        if _is_external(tensor) and not tensor.HasField("raw_data"):
            path, offset, length, _ = _payload_span(tensor, base_dir, f"tensor '{tensor.name}'")
            _set_embedded(tensor, _read_bytes(path, offset, length))
        elif _is_external(tensor):
            del tensor.external_data[:]
            tensor.ClearField("data_location")


# --------------------------------------------------------------------------------------------
# save_model
# --------------------------------------------------------------------------------------------


_MEMORY = "memory"
"""An in-memory tensor written with its own SerializeToString."""
_MEMORY_RAW = "memory-raw"
"""An in-memory tensor still marked external (onnx's half-converted state): raw_data + head."""
_SOURCE = "source"
"""A stub or external tensor: the payload is copied from a file."""


@dataclass
class _Item:
    """How one main-graph initializer is written."""

    tensor: onnx.TensorProto
    kind: str
    payload_len: int = 0
    """Length of the raw payload (file span or raw_data); 0 for typed-field tensors."""
    memory_size: int = 0
    """Serialized size of a _MEMORY tensor."""
    source: tuple[str, int, int] | None = None
    """(path, offset, length) of a _SOURCE payload."""
    stub: bool = False
    head: bytes = b""
    """The tensor without raw_data / external fields, serialized (not for typed-field tensors)."""
    external: bool = False
    data_offset: int = 0
    before: bytes = b""
    """External output: the emitted TensorProto. Embedded raw payload: the fields before raw_data."""
    after: bytes = b""
    """Embedded raw payload: the fields after raw_data."""
    size: int = 0
    """Size of the emitted TensorProto."""


def copy_except(message: onnx.ModelProto | onnx.GraphProto, skip: str) -> onnx.ModelProto | onnx.GraphProto:
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        if _is_repeated(fd):
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def _tensor_head(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of ``tensor`` without raw_data, external_data and data_location (cheap: no payload)."""
    out = onnx.TensorProto()
    for fd in onnx.TensorProto.DESCRIPTOR.fields:
        name = fd.name
        if name in ("raw_data", "external_data", "data_location"):
            continue
        if _is_repeated(fd):
            values = getattr(tensor, name)
            if len(values):
                getattr(out, name).extend(values)
        elif tensor.HasField(name):
            if fd.message_type is not None:
                getattr(out, name).CopyFrom(getattr(tensor, name))
            else:
                setattr(out, name, getattr(tensor, name))
    return out


def _payload_len_from_sizes(total: int, head: int) -> int:
    """Solve ``total = head + 1 + varint_len(L) + L`` for the raw_data length ``L``."""
    body = total - head - len(_tag(_F_TENSOR_RAW_DATA, _WT_LEN))
    for width in range(1, 11):
        candidate = body - width
        if candidate >= 0 and _varint_len(candidate) == width:
            return candidate
    raise RuntimeError("inconsistent tensor size")  # pragma: no cover - protobuf invariant


def _align(offset: int, length: int) -> int:
    if length >= _ALIGN and offset % _ALIGN:
        return offset + _ALIGN - offset % _ALIGN
    return offset


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source_dir: str | None = None,
    external_data: bool | None = None,
    location: str | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, streaming payloads from their source files.

    ``external_data``: ``None`` keeps the input's layout (external tensors stay external, in
    ``<file name>.data`` next to the output; new tensors of at least :data:`EXTERNAL_THRESHOLD`
    bytes join them when the model uses external data; everything else is embedded), and
    switches to external data if the file would otherwise exceed protobuf's 2 GB limit.
    ``True``: every tensor with raw data of at least the threshold goes to the data file.
    ``False``: everything is embedded; a model that would pass 2 GB raises BnfoldError.
    ``location``: the data file's name, relative to the output's directory.
    ``source_dir``: the directory external locations of ``model`` are relative to (tensors
    from :func:`load_model` record theirs, which takes precedence).
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"save_model expects an onnx.ModelProto, got {type(model).__name__}")
    out_path = os.path.abspath(os.fspath(path))
    display = os.fspath(path)
    _check_output(out_path, display)
    writer = _Writer(model, out_path, display, source_dir, external_data, location)
    writer.run()


def _check_output(out_path: str, display: str) -> None:
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise InputError(f"{display}: cannot write: directory {out_dir} does not exist")
    if os.path.isdir(out_path):
        raise InputError(f"{display}: is a directory; give a file name for the output model")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{display}: cannot write: permission denied in {out_dir}")


class _Sink:
    """Sequential writer on a raw file descriptor: small writes buffered, payloads copied in-kernel.

    Every :data:`_WRITEBACK_EVERY` bytes it asks the kernel to start writing the finished range
    to disk (``sync_file_range``), so the final ``fsync`` has little left to wait for.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._buf = bytearray()
        self._synced = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= _WRITE_BUFFER:
            self.flush()
            _write_all(self.fd, data)
            self.pos += len(data)
            self._writeback()
            return
        self._buf += data
        self.pos += len(data)
        if len(self._buf) >= _WRITE_BUFFER:
            self.flush()

    def pad_to(self, offset: int) -> None:
        if offset > self.pos:
            self.write(b"\0" * (offset - self.pos))

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        self.flush()
        _copy_range(src_fd, self.fd, offset, length)
        self.pos += length
        self._writeback()

    def flush(self) -> None:
        if self._buf:
            _write_all(self.fd, self._buf)
            self._buf = bytearray()
            self._writeback()

    def _writeback(self) -> None:
        if self.pos - self._synced >= _WRITEBACK_EVERY:
            _start_writeback(self.fd, self._synced, self.pos - self._synced)
            self._synced = self.pos


@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from libc, or None (non-Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    sync_file_range_write = 2

    def start(fd: int, offset: int, length: int) -> None:
        func(fd, offset, length, sync_file_range_write)  # advisory: errors are ignored

    return start


def _start_writeback(fd: int, offset: int, length: int) -> None:
    start = _load_sync_file_range()
    if start is not None:
        start(fd, offset, length)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_COPY_CHUNK])
        view = view[written:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``.

    ``os.copy_file_range`` keeps the bytes in the kernel; it falls back to pread/write where
    the file systems do not support it.
    """
    remaining = length
    copy_file_range = getattr(os, "copy_file_range", None)
    while remaining and copy_file_range is not None:
        try:
            n = copy_file_range(src_fd, dst_fd, min(remaining, _COPY_CHUNK), offset)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                break
            raise
        if n == 0:
            raise InputError(f"source file ended {remaining} bytes early while copying at offset {offset}")
        offset += n
        remaining -= n
    while remaining:
        chunk = os.pread(src_fd, min(remaining, 64 << 20), offset)
        if not chunk:
            raise InputError(f"source file ended {remaining} bytes early while copying at offset {offset}")
        _write_all(dst_fd, chunk)
        offset += len(chunk)
        remaining -= len(chunk)


def _create_temp(directory: str, name: str, display: str) -> tuple[int, str]:
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise InputError(f"{display}: cannot write: permission denied in {directory}") from None
        except OSError as err:
            raise InputError(f"{display}: cannot write in {directory} ({err.strerror})") from None
        return fd, tmp
    raise BnfoldError(f"{display}: could not create a temporary file in {directory}")  # pragma: no cover


class _Writer:
    def __init__(
        self,
        model: onnx.ModelProto,
        out_path: str,
        display: str,
        source_dir: str | None,
        external_data: bool | None,
        location: str | None,
    ) -> None:
        self.model = model
        self.out_path = out_path
        self.out_dir = os.path.dirname(out_path)
        self.display = display
        self.source_dir = source_dir
        self.mode = external_data
        self.location = location
        self._fds: dict[str, int] = {}

    # -- sources ---------------------------------------------------------------------------

    def _source_fd(self, path: str) -> int:
        key = os.path.realpath(path)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise InputError(f"{path}: cannot read ({err.strerror})") from None
            self._fds[key] = fd
        return fd

    def _span(self, tensor: onnx.TensorProto) -> tuple[tuple[str, int, int], _ExternalRef]:
        path, offset, length, ref = _payload_span(tensor, self.source_dir, f"tensor '{tensor.name}'")
        self._source_fd(path)  # opened now: an in-place save replaces the source only at the end
        return (path, offset, length), ref

    # -- plan --------------------------------------------------------------------------------

    def _embed_rest(self, message: onnx.ModelProto | onnx.GraphProto) -> bool:
        """Embed external tensors outside the main initializers; True if there were any."""
        found = False
        tensors = (
            _model_tensors(message, main_initializers=False)
            if isinstance(message, onnx.ModelProto)
            else _graph_tensors(message, initializers=False)
        )
        for tensor in tensors:
            if not _is_external(tensor):
                continue
            if tensor.HasField("raw_data"):
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                continue
            (path, offset, length), ref = self._span(tensor)
            found = found or not ref.embedded
            _set_embedded(tensor, _read_bytes(path, offset, length))
        return found

    def _plan_items(self) -> tuple[list[_Item], bool]:
        items: list[_Item] = []
        uses_external = False
        for tensor in self.model.graph.initializer:
            external = _is_external(tensor)
            if external and not tensor.HasField("raw_data"):
                source, ref = self._span(tensor)
                uses_external = uses_external or not ref.embedded
                head = _tensor_head(tensor).SerializeToString()
                items.append(_Item(tensor, _SOURCE, source[2], source=source, stub=ref.embedded, head=head))
            elif external:  # onnx's half-converted state: marked external, data still in memory
                uses_external = True
                head = _tensor_head(tensor).SerializeToString()
                items.append(_Item(tensor, _MEMORY_RAW, len(tensor.raw_data), head=head))
            else:
                size = tensor.ByteSize()
                item = _Item(tensor, _MEMORY, memory_size=size)
                if tensor.HasField("raw_data"):
                    item.head = _tensor_head(tensor).SerializeToString()
                    item.payload_len = _payload_len_from_sizes(size, len(item.head))
                items.append(item)
        return items, uses_external

    def _decide(self, items: list[_Item], mode: bool | None, uses_external: bool) -> int:
        """Mark each item external or embedded and assign data offsets; return the initializers' bytes."""
        total = 0
        data_pos = 0
        for item in items:
            has_raw = item.kind != _MEMORY or item.tensor.HasField("raw_data")
            large = has_raw and item.payload_len >= EXTERNAL_THRESHOLD
            if mode is False:
                item.external = False
            elif mode is True:
                item.external = large
            elif item.kind == _SOURCE:
                item.external = not item.stub
            elif item.kind == _MEMORY_RAW:
                item.external = True
            else:
                item.external = large and uses_external
            if item.tensor.data_type == onnx.TensorProto.STRING:
                item.external = False
            if item.external:
                data_pos = _align(data_pos, item.payload_len)
                item.data_offset = data_pos
                data_pos += item.payload_len
                emitted = onnx.TensorProto()
                emitted.ParseFromString(item.head)
                _add_entry(emitted, "location", self.data_name)
                _add_entry(emitted, "offset", str(item.data_offset))
                _add_entry(emitted, "length", str(item.payload_len))
                emitted.data_location = _EXTERNAL
                item.before, item.after = emitted.SerializeToString(), b""
                item.size = len(item.before)
            elif item.kind == _MEMORY:
                item.size = item.memory_size
            else:
                item.before, item.after = _split_fields(item.head, _F_TENSOR_RAW_DATA)
                item.size = len(item.head) + 1 + _varint_len(item.payload_len) + item.payload_len
            total += 1 + _varint_len(item.size) + item.size
        return total

    def _payload(self, item: _Item, sink: _Sink) -> None:
        if item.source is not None:
            path, offset, length = item.source
            sink.copy_from(self._source_fd(path), offset, length)
            return
        payload = item.tensor.raw_data
        _check_len(len(payload), item.payload_len, item.tensor.name)
        sink.write(payload)

    def _choose_data_name(self, sources: set[str]) -> str:
        base = os.path.basename(self.out_path)
        if self.location is not None:
            if not _is_inside(self.location):
                raise InputError(
                    f"{self.display}: external data location {self.location!r} must be a relative "
                    "path inside the output's directory"
                )
            target = os.path.realpath(os.path.join(self.out_dir, self.location))
            if target in sources or target == os.path.realpath(self.out_path):
                raise InputError(
                    f"{self.display}: external data location {self.location!r} is a file the source "
                    "model reads from; choose another name"
                )
            return self.location
        candidates = [f"{base}.data"] + [f"{base}.{i}.data" for i in range(1, 1000)]
        for name in candidates:
            if os.path.realpath(os.path.join(self.out_dir, name)) not in sources:
                return name
        raise BnfoldError(f"{self.display}: no free name for the external data file")  # pragma: no cover

    # -- write -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _run(self) -> None:
        model = self.model
        if not model.HasField("graph"):
            rest = copy_except(model, "")
            self._embed_rest(rest)
            self._commit([rest.SerializeToString()], [], None)
            return
        rest_model = copy_except(model, "graph")
        rest_graph = copy_except(model.graph, "initializer")
        uses_external = self._embed_rest(rest_model)
        uses_external = self._embed_rest(rest_graph) or uses_external
        items, init_external = self._plan_items()
        uses_external = uses_external or init_external
        self.data_name = self._choose_data_name(set(self._fds))

        model_before, model_after = _split_fields(rest_model.SerializeToString(), _F_MODEL_GRAPH)
        graph_before, graph_after = _split_fields(rest_graph.SerializeToString(), _F_GRAPH_INITIALIZER)

        def model_size(init_bytes: int) -> int:
            graph_size = len(graph_before) + init_bytes + len(graph_after)
            return len(model_before) + len(model_after) + 1 + _varint_len(graph_size) + graph_size

        mode = self.mode
        init_bytes = self._decide(items, mode, uses_external)
        if model_size(init_bytes) > _PROTOBUF_LIMIT:
            if mode is False:
                raise BnfoldError(
                    f"{self.display}: the model would be {model_size(init_bytes) / 1e9:.2f} GB, over "
                    "protobuf's 2 GB limit for one file; save it with external data"
                )
            if mode is None:
                logger.debug("%s: over 2 GB embedded, switching to external data", self.display)
                init_bytes = self._decide(items, True, True)
            if model_size(init_bytes) > _PROTOBUF_LIMIT:
                raise BnfoldError(
                    f"{self.display}: the model is over protobuf's 2 GB limit even with its "
                    "initializers in external data (large tensors in node attributes or subgraphs)"
                )
        graph_size = len(graph_before) + init_bytes + len(graph_after)
        header = [model_before, _tag(_F_MODEL_GRAPH, _WT_LEN) + _varint(graph_size), graph_before]
        self._commit(header, items, graph_after + model_after)

    def _commit(self, header: list[bytes], items: list[_Item], trailer: bytes | None) -> None:
        base = os.path.basename(self.out_path)
        any_external = any(item.external for item in items)
        temps: list[str] = []
        fds: list[int] = []
        try:
            model_fd, model_tmp = _create_temp(self.out_dir, base, self.display)
            temps.append(model_tmp)
            fds.append(model_fd)
            data_fd = data_tmp = None
            if any_external:
                data_path = os.path.join(self.out_dir, self.data_name)
                data_fd, data_tmp = _create_temp(
                    os.path.dirname(data_path), os.path.basename(data_path), self.display
                )
                temps.append(data_tmp)
                fds.append(data_fd)
            try:
                self._write(model_fd, data_fd, header, items, trailer)
                for fd in fds:
                    os.fsync(fd)
            except OSError as err:
                raise BnfoldError(f"{self.display}: writing failed ({err.strerror or err})") from err
            for fd in fds:
                os.close(fd)
            fds.clear()
            if data_tmp is not None:
                os.replace(data_tmp, os.path.join(self.out_dir, self.data_name))
                temps.remove(data_tmp)
            os.replace(model_tmp, self.out_path)
            temps.remove(model_tmp)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for tmp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        _fsync_dir(self.out_dir)

    def _write(
        self,
        model_fd: int,
        data_fd: int | None,
        header: list[bytes],
        items: list[_Item],
        trailer: bytes | None,
    ) -> None:
        sink = _Sink(model_fd)
        data = _Sink(data_fd) if data_fd is not None else None
        for part in header:
            sink.write(part)
        field_tag = _tag(_F_GRAPH_INITIALIZER, _WT_LEN)
        raw_tag = _tag(_F_TENSOR_RAW_DATA, _WT_LEN)
        expected = sum(len(p) for p in header)
        for item in items:
            sink.write(field_tag + _varint(item.size))
            if item.external:
                assert data is not None
                sink.write(item.before)
                data.pad_to(item.data_offset)
                self._payload(item, data)
            elif item.kind == _MEMORY:
                blob = item.tensor.SerializeToString()
                _check_len(len(blob), item.size, item.tensor.name)
                sink.write(blob)
                del blob
            else:
                sink.write(item.before + raw_tag + _varint(item.payload_len))
                self._payload(item, sink)
                sink.write(item.after)
            expected += 1 + _varint_len(item.size) + item.size
        if trailer:
            sink.write(trailer)
            expected += len(trailer)
        sink.flush()
        if data is not None:
            data.flush()
        if sink.pos != expected:  # pragma: no cover - a bug, not bad input
            raise RuntimeError(f"bnfold.io wrote {sink.pos} bytes, planned {expected}")


def _check_len(actual: int, planned: int, name: str) -> None:
    if actual != planned:  # pragma: no cover - the model changed while it was being saved
        raise RuntimeError(f"tensor '{name}' changed size while it was being saved ({planned} -> {actual})")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
