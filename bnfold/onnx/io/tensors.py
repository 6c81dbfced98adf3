"""Tensor values: checked against their declared type and shape, then read (embedded or from files).

Every malformation of a TensorProto -- an unknown element type, negative or absurd dims, data
shorter or longer than the dims say, raw and typed data both present, a string tensor stored
externally -- is an :class:`~bnfold.errors.InputError` with one line, never a ``ValueError``,
``IndexError`` or ``MemoryError`` from numpy.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import InputError

from .external import (
    is_external,
    model_tensors,
    payload_span,
    read_bytes,
    set_embedded,
    source_dir_of,
    unmark_model,
)

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


def tensor_dtype(tensor: onnx.TensorProto, where: str) -> np.dtype:
    """The numpy dtype of ``tensor``'s element type; InputError for UNDEFINED or unknown ones."""
    name = tensor.name or "<tensor>"
    try:
        if tensor.data_type == onnx.TensorProto.UNDEFINED:
            raise KeyError(0)
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        raise InputError(f"{where}: tensor '{name}' has unknown data type {tensor.data_type}") from None


def element_count(tensor: onnx.TensorProto, where: str) -> int:
    """The number of elements ``tensor``'s dims declare; InputError for negative or absurd dims."""
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise InputError(f"{where}: tensor '{tensor.name}' has negative dimensions {dims}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise InputError(
            f"{where}: tensor '{tensor.name}' declares {count} elements (dims {dims}); too large"
        )
    return count


def payload_bytes(tensor: onnx.TensorProto, dtype: np.dtype, count: int) -> int:
    """How many raw bytes ``count`` elements of ``tensor``'s type take."""
    bits = _BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * dtype.itemsize


def check_length(tensor: onnx.TensorProto, length: int, where: str, what: str = "its data") -> None:
    """Refuse a raw payload of ``length`` bytes that does not match the declared type and shape."""
    dtype = tensor_dtype(tensor, where)
    count = element_count(tensor, where)
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(
            f"{where}: tensor '{tensor.name}' is a string tensor with raw bytes, which ONNX forbids"
        )
    needed = payload_bytes(tensor, dtype, count)
    if needed != length:
        shape = tuple(tensor.dims)
        raise InputError(
            f"{where}: tensor '{tensor.name}' of shape {shape} and type {dtype} needs "
            f"{needed} bytes but {what} holds {length}"
        )


def _typed_values(tensor: onnx.TensorProto, count: int) -> tuple[str, int]:
    """The typed field that holds ``tensor``'s values and how many it must hold (-1: unknown)."""
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return field, 2 * count
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return field, count
    if 8 % bits:
        return field, -1  # 6-bit types: onnx's packing into int32_data is not fixed
    return field, -(-count * bits // 8)  # packed, one byte of values per int32


def check_header(tensor: onnx.TensorProto, where: str) -> None:
    """The checks that read no payload: a known type, sane dims, not raw and typed at once, and
    as many typed values as the dims need."""
    tensor_dtype(tensor, where)
    count = element_count(tensor, where)
    if tensor.HasField("segment"):
        raise InputError(
            f"{where}: tensor '{tensor.name}' is a segment of a tensor, which bnfold does not read"
        )
    typed = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if tensor.HasField("raw_data") or is_external(tensor):
        if typed:
            raise InputError(
                f"{where}: tensor '{tensor.name}' has both raw and typed data (which one holds the values?)"
            )
        return
    field, needed = _typed_values(tensor, count)
    stray = [f for f in typed if f != field]
    held = len(getattr(tensor, field))
    if stray or (needed >= 0 and held != needed):
        also = f" (and values in {', '.join(stray)})" if stray else ""
        raise InputError(
            f"{where}: tensor '{tensor.name}' of shape {tuple(tensor.dims)} needs {needed} values "
            f"in {field} but holds {held}{also}"
        )


def read_array(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    """The value of any TensorProto: embedded (raw_data or typed fields), external, or a stub.

    ``base_dir`` is the directory external locations are relative to (not needed for tensors
    of a lazy load: they name their file). Embedded tensors may come back as read-only views:
    copy before writing into them.
    """
    name = tensor.name or "<tensor>"
    where = f"tensor '{name}'"
    check_header(tensor, where)
    if is_external(tensor) and not tensor.HasField("raw_data"):
        return _read_external(tensor, base_dir, where)
    if tensor.HasField("raw_data"):
        check_length(tensor, len(tensor.raw_data), where)
        if is_external(tensor):  # onnx's half-converted state: the data is still here
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            del copy.external_data[:]
            copy.ClearField("data_location")
            tensor = copy
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        shape = tuple(tensor.dims)
        raise InputError(f"{where}: its data does not fit its shape {shape} and type ({err})") from None


def _read_external(tensor: onnx.TensorProto, base_dir: str | None, where: str) -> np.ndarray:
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(f"{where}: a string tensor, which cannot be stored externally")
    path, offset, length, _ = payload_span(tensor, base_dir, where)
    dtype = tensor_dtype(tensor, where)
    shape = tuple(int(d) for d in tensor.dims)
    count = element_count(tensor, where)
    check_length(tensor, length, path, "its external data")
    if tensor.data_type in _BITS:
        tmp = onnx.TensorProto()
        tmp.CopyFrom(tensor)
        set_embedded(tmp, read_bytes(path, offset, length))
        return numpy_helper.to_array(tmp)
    stored = dtype if np.little_endian else dtype.newbyteorder("<")  # raw data is little-endian
    array = np.fromfile(path, dtype=stored, count=count, offset=offset)
    if array.size != count:
        raise InputError(f"{path}: ended before the {length} bytes of {where} at offset {offset}")
    if stored is not dtype:  # pragma: no cover - big-endian hosts
        array = array.astype(dtype)
    return array.reshape(shape)


def materialize(model: onnx.ModelProto, *, base_dir: str | None = None) -> None:
    """Load every stub and external tensor of ``model`` into memory, in place.

    Afterwards the model is an ordinary in-memory ModelProto that onnxruntime and ``onnx.save``
    accept (subject to the 2 GB protobuf limit).
    """
    if base_dir is None:
        base_dir = source_dir_of(model)
    unmark_model(model)
    for tensor in model_tensors(model):
        if is_external(tensor) and not tensor.HasField("raw_data"):
            path, offset, length, _ = payload_span(tensor, base_dir, f"tensor '{tensor.name}'")
            set_embedded(tensor, read_bytes(path, offset, length))
        elif is_external(tensor):
            del tensor.external_data[:]
            tensor.ClearField("data_location")
