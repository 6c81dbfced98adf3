"""Tensor values: checked against their declared type and shape, then read (embedded or from files).

Every malformation of a TensorProto -- an unknown element type, negative or absurd dims, data
shorter or longer than the dims say, raw and typed data both present, a string tensor stored
externally -- is an :class:`~bnfold.errors.InputError` with one line, never a ``ValueError``,
``IndexError`` or ``MemoryError`` from numpy.
"""

from __future__ import annotations

import functools
import math
import mmap
import operator
import os
from dataclasses import dataclass

import numpy as np

from bnfold.errors import InputError
from bnfold.onnx import protos
from bnfold.onnxlib import onnx

from .external import Files, is_external, payload_span, read_bytes, set_embedded

MAX_ELEMENTS = 2**48
"""No tensor in a model file declares more elements (256 T; the largest models have ~1 T bytes)."""

_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}
"""Element types packed below one byte: raw data holds ``ceil(count * bits / 8)`` bytes."""

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_typed_fields = operator.attrgetter(*_TYPED_FIELDS)


@dataclass(frozen=True)
class _Type:
    """What an element type needs: its numpy dtype, bits per element below a byte, typed field."""

    dtype: np.dtype
    bits: int
    field: int
    """Index into :data:`_TYPED_FIELDS`."""
    per_value: int
    """Typed values per element: 2 for complex numbers, else 1."""


@functools.cache
def _type_info(number: int) -> _Type | None:
    """What element type ``number`` needs; None for UNDEFINED and numbers onnx does not know.

    Plain numeric types need no onnx import (:mod:`bnfold.onnx.protos`); the others ask onnx."""
    if number == onnx.TensorProto.UNDEFINED:
        return None
    try:
        name = onnx.TensorProto.DataType.Name(number)
        dtype = protos.np_dtype(number)
        field = _TYPED_FIELDS.index(protos.typed_field(number))
    except (KeyError, ValueError, TypeError):  # a type onnx cannot convert
        return None
    return _Type(dtype, _BITS.get(number, 0), field, 2 if name.startswith("COMPLEX") else 1)


def tensor_dtype(tensor: onnx.TensorProto, where: str) -> np.dtype:
    """The numpy dtype of ``tensor``'s element type; InputError for UNDEFINED or unknown ones."""
    info = _type_info(tensor.data_type)
    if info is None:
        raise InputError(
            f"{where}: tensor '{tensor.name or '<tensor>'}' has unknown data type {tensor.data_type}"
        )
    return info.dtype


def element_count(tensor: onnx.TensorProto, where: str) -> int:
    """The number of elements ``tensor``'s dims declare; InputError for negative or absurd dims."""
    dims = tensor.dims
    if dims and min(dims) < 0:
        raise InputError(f"{where}: tensor '{tensor.name}' has negative dimensions {list(dims)}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise InputError(
            f"{where}: tensor '{tensor.name}' declares {count} elements (dims {list(dims)}); too large"
        )
    return count


def check_tensor(
    tensor: onnx.TensorProto, where: str, length: int | None = None, what: str = "its data"
) -> None:
    """Refuse a malformed TensorProto: an unknown type, negative or absurd dims, a segment, raw
    and typed data at once, or data (``length`` bytes in a file, else the embedded raw or typed
    values) that does not match the dims.

    Called for every tensor a load sees, so it reads each field once and calls little.
    """
    info = _type_info(tensor.data_type)
    if info is None:
        tensor_dtype(tensor, where)
    count = element_count(tensor, where)
    if tensor.HasField("segment"):
        raise InputError(
            f"{where}: tensor '{tensor.name}' is a segment of a tensor, which bnfold does not read"
        )
    typed = _typed_fields(tensor)
    raw = tensor.HasField("raw_data")
    if raw or tensor.data_location == onnx.TensorProto.EXTERNAL:
        if any(map(len, typed)):
            raise InputError(
                f"{where}: tensor '{tensor.name}' has both raw and typed data (which one holds the values?)"
            )
        if length is None and raw:
            length = len(tensor.raw_data)  # a transient copy of a small tensor's bytes
        if length is not None:
            _check_raw(tensor, info, count, length, where, what)
        return
    needed = count * info.per_value
    if info.bits:
        needed = -1 if 8 % info.bits else -(-count * info.bits // 8)  # one byte of values per int32
    held = len(typed[info.field])
    stray = [f for f, values in zip(_TYPED_FIELDS, typed) if len(values) and f != _TYPED_FIELDS[info.field]]
    if stray or (needed >= 0 and held != needed):
        also = f" (and values in {', '.join(stray)})" if stray else ""
        raise InputError(
            f"{where}: tensor '{tensor.name}' of shape {tuple(tensor.dims)} needs {needed} values "
            f"in {_TYPED_FIELDS[info.field]} but holds {held}{also}"
        )


def _check_raw(tensor: onnx.TensorProto, info: _Type, count: int, length: int, where: str, what: str) -> None:
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(
            f"{where}: tensor '{tensor.name}' is a string tensor with raw bytes, which ONNX forbids"
        )
    needed = (count * info.bits + 7) // 8 if info.bits else count * info.dtype.itemsize
    if needed != length:
        raise InputError(
            f"{where}: tensor '{tensor.name}' of shape {tuple(tensor.dims)} and type {info.dtype} needs "
            f"{needed} bytes but {what} holds {length}"
        )


def read_array(
    tensor: onnx.TensorProto, base_dir: str | None = None, files: Files | None = None
) -> np.ndarray:
    """The value of any TensorProto: embedded (raw_data or typed fields), external, or a stub.

    ``base_dir`` is the directory external locations are relative to (not needed for tensors
    of a lazy load: they name their file). Embedded tensors may come back as read-only views:
    copy before writing into them.
    """
    name = tensor.name or "<tensor>"
    where = f"tensor '{name}'"
    check_tensor(tensor, where)
    if is_external(tensor):
        if not tensor.HasField("raw_data"):
            return _read_external(tensor, base_dir, where, files)
        copy = onnx.TensorProto()  # onnx's half-converted state: the data is still here
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.ClearField("data_location")
        tensor = copy
    try:
        return protos.to_array(tensor)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        shape = tuple(tensor.dims)
        raise InputError(f"{where}: its data does not fit its shape {shape} and type ({err})") from None


def _read_external(
    tensor: onnx.TensorProto, base_dir: str | None, where: str, files: Files | None
) -> np.ndarray:
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(f"{where}: a string tensor, which cannot be stored externally")
    path, offset, length, ref = payload_span(tensor, base_dir, where, files)
    dtype = tensor_dtype(tensor, where)
    shape = tuple(int(d) for d in tensor.dims)
    count = element_count(tensor, where)
    check_tensor(tensor, path, length, "its external data")
    if tensor.data_type in _BITS:
        tmp = onnx.TensorProto()
        tmp.CopyFrom(tensor)
        set_embedded(tmp, read_bytes(path, offset, length))
        return protos.to_array(tmp)
    stored = dtype if np.little_endian else dtype.newbyteorder("<")  # raw data is little-endian
    array = _mapped(
        path, stored, count, offset, f"{path}: ended before the {length} bytes of {where} at offset {offset}"
    )
    if stored is not dtype:  # pragma: no cover - big-endian hosts
        array = array.astype(dtype)
    if ref.scaled is not None:  # a deferred fold: its values are computed from these bytes
        return ref.scaled.apply(array)
    return array.reshape(shape)


def _mapped(path: str, dtype: np.dtype, count: int, offset: int, short: str) -> np.ndarray:
    """``count`` values at ``offset`` of ``path``, mapped read-only rather than read: the pages
    come from the page cache (no copy, no fresh memory), and the mapping lives as long as the
    array. InputError ``short`` when the file ends before them."""
    nbytes = count * dtype.itemsize
    if not nbytes:
        return np.empty(count, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset + nbytes:
                raise InputError(short)
            mm = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError) as err:
        raise InputError(f"{short} ({err})") from None
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset - start)
