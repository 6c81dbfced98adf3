"""The protobuf wire format, as far as bnfold reads and writes ONNX files without protobuf.

A message is a sequence of fields ``key, value`` where ``key = number << 3 | wire type``
(https://protobuf.dev/programming-guides/encoding/). Field numbers are taken from onnx's own
descriptors, never hard-coded.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Iterator
from typing import Any

from bnfold.errors import InputError
from bnfold.onnxlib import onnx

F_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
F_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
F_TENSOR_DIMS = onnx.TensorProto.DESCRIPTOR.fields_by_name["dims"].number
F_TENSOR_DATA_TYPE = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_type"].number
F_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
F_TENSOR_EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number
F_TENSOR_DATA_LOCATION = onnx.TensorProto.DESCRIPTOR.fields_by_name["data_location"].number
F_ENTRY_KEY = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name["key"].number
F_ENTRY_VALUE = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name["value"].number

WT_VARINT, WT_I64, WT_LEN, WT_I32 = 0, 1, 2, 5

Buffer = bytes | bytearray | memoryview | mmap.mmap


class WireError(Exception):
    """The bytes are not a well-formed protobuf message. ``truncated``: a field runs past the end."""

    def __init__(self, pos: int, *, truncated: bool, needed: int = 0, number: int = 0) -> None:
        super().__init__(pos)
        self.pos = pos
        self.number = number
        self.truncated = truncated
        self.needed = needed
        """For a truncated length-delimited field: the file size it needs."""


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(start, truncated=True)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError(start, truncated=False)


def iter_fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(number, wire_type, field_start, value_start, value_end)`` for each field.

    For a length-delimited field the value span excludes the length prefix.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(field_start, truncated=False)
        if wire_type == WT_VARINT:
            _, value_end = read_varint(buf, pos, end)
            value_start = pos
        elif wire_type == WT_LEN:
            length, value_start = read_varint(buf, pos, end)
            value_end = value_start + length
        elif wire_type == WT_I64:
            value_start, value_end = pos, pos + 8
        elif wire_type == WT_I32:
            value_start, value_end = pos, pos + 4
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise WireError(field_start, truncated=False)
        if value_end > end:
            raise WireError(field_start, truncated=True, needed=value_end, number=number)
        pos = value_end
        yield number, wire_type, field_start, value_start, value_end


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def len_field(number: int, payload: bytes) -> bytes:
    return tag(number, WT_LEN) + varint(len(payload)) + payload


def entry_bytes(key: str, value: str) -> bytes:
    """One ``TensorProto.external_data`` entry, serialized as a field of the tensor."""
    entry = len_field(F_ENTRY_KEY, key.encode()) + len_field(F_ENTRY_VALUE, value.encode())
    return len_field(F_TENSOR_EXTERNAL_DATA, entry)


def split_fields(buf: bytes, number: int) -> tuple[bytes, bytes]:
    """Split a serialized message into its fields numbered below ``number`` and the rest.

    protobuf serializes known fields in field-number order, so inserting field ``number``
    between the two halves gives the bytes ``SerializeToString`` would.
    """
    for field_number, _, field_start, _, _ in iter_fields(buf, 0, len(buf)):
        if field_number > number:
            return buf[:field_start], buf[field_start:]
    return buf, b""


def is_repeated(fd: object) -> bool:
    """``FieldDescriptor.is_repeated`` (protobuf >= 5.28), else the older ``label``."""
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


@functools.cache
def field_table(descriptor: Any) -> dict[int, tuple[str, frozenset[int], Any]]:
    """field number -> (name, acceptable wire types, message descriptor or None)."""
    out: dict[int, tuple[str, frozenset[int], Any]] = {}
    for fd in descriptor.fields:
        if fd.type in (fd.TYPE_MESSAGE, fd.TYPE_STRING, fd.TYPE_BYTES):
            wire_types = {WT_LEN}
        elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FIXED64, fd.TYPE_SFIXED64):
            wire_types = {WT_I64}
        elif fd.type in (fd.TYPE_FLOAT, fd.TYPE_FIXED32, fd.TYPE_SFIXED32):
            wire_types = {WT_I32}
        else:
            wire_types = {WT_VARINT}
        if is_repeated(fd):
            wire_types.add(WT_LEN)  # packed
        out[fd.number] = (fd.name, frozenset(wire_types), fd.message_type)
    return out


def packed_varints(buf: Buffer, start: int, end: int) -> list[int]:
    """The values of a packed repeated varint field (e.g. ``TensorProto.dims``)."""
    values = []
    pos = start
    while pos < end:
        value, pos = read_varint(buf, pos, end)
        values.append(value)
    return values


def copy_except(message: Any, skip: str) -> Any:
    """A shallow copy of a message without field ``skip`` (cheap: the big field is not copied)."""
    out = type(message)()
    for fd, value in message.ListFields():
        if fd.name == skip:
            continue
        copy_field(out, fd, value)
    return out


def copy_field(out: Any, fd: Any, value: Any) -> None:
    """Set field ``fd`` of ``out`` to ``value``; InputError for a string that is not UTF-8."""
    try:
        if is_repeated(fd):
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    except (UnicodeDecodeError, TypeError, ValueError):  # proto2 strings are not checked on parse
        raise InputError(f"{type(out).__name__}.{fd.name}: a string in it is not valid UTF-8") from None


_RELEASE_EVERY = 16 << 20
_PAGE = mmap.PAGESIZE


def release_pages(mm: mmap.mmap, released: int, upto: int) -> int:
    """Unmap the pages the scan has passed (they stay in the page cache): the scan's memory then
    stays a few MB, not the share of the file that page faults and read-ahead mapped in."""
    end = upto - upto % _PAGE
    if end - released < _RELEASE_EVERY or not hasattr(mmap, "MADV_DONTNEED"):
        return released
    begin = released - released % _PAGE
    mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)
    return end
