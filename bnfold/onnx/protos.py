"""Tensors, nodes and attributes built and read without ``onnx.helper``.

``onnx.helper`` and ``onnx.numpy_helper`` import onnx's whole package (see
:mod:`bnfold.onnxlib`). The pass needs a handful of their functions, and for the plain numeric
element types (what models store their weights, biases and shapes in) they are a few lines on
the message classes. Those are written here, producing the same messages byte for byte (a test
compares them); any other element type (bfloat16, float8, 4-bit, strings, complex) is handed to
onnx's own functions, which import the package then.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from bnfold.onnxlib import onnx

__all__ = [
    "data_type_of",
    "from_array",
    "make_attribute",
    "make_node",
    "make_tensor_value_info",
    "np_dtype",
    "to_array",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
"""The domains of ONNX's own operators."""

_PLAIN_NAMES = (
    ("FLOAT", np.float32, "float_data"),
    ("DOUBLE", np.float64, "double_data"),
    ("FLOAT16", np.float16, "int32_data"),
    ("INT8", np.int8, "int32_data"),
    ("UINT8", np.uint8, "int32_data"),
    ("INT16", np.int16, "int32_data"),
    ("UINT16", np.uint16, "int32_data"),
    ("INT32", np.int32, "int32_data"),
    ("INT64", np.int64, "int64_data"),
    ("UINT32", np.uint32, "uint64_data"),
    ("UINT64", np.uint64, "uint64_data"),
    ("BOOL", np.bool_, "int32_data"),
)
_PLAIN: dict[int, tuple[np.dtype, str]] = {
    int(getattr(onnx.TensorProto, name)): (np.dtype(dtype), field) for name, dtype, field in _PLAIN_NAMES
}
"""Element type -> (numpy dtype, the typed field that holds its values)."""
_BY_DTYPE = {dtype: number for number, (dtype, _) in _PLAIN.items()}
_STORAGE = {"float_data": np.float32, "double_data": np.float64, "int32_data": np.int32}
_STORAGE.update({"int64_data": np.int64, "uint64_data": np.uint64})
_SIXTEEN_BITS = frozenset(int(getattr(onnx.TensorProto, n)) for n in ("FLOAT16", "INT16", "UINT16"))


def np_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (``onnx.helper.tensor_dtype_to_np_dtype``)."""
    plain = _PLAIN.get(data_type)
    return plain[0] if plain is not None else np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))


def typed_field(data_type: int) -> str:
    """The TensorProto field that holds typed values of ``data_type``."""
    plain = _PLAIN.get(data_type)
    return plain[1] if plain is not None else str(onnx.helper.tensor_dtype_to_field(data_type))


def data_type_of(dtype: np.dtype) -> int:
    """The ONNX element type of a numpy dtype (``onnx.helper.np_dtype_to_tensor_dtype``)."""
    number = _BY_DTYPE.get(np.dtype(dtype).newbyteorder("="))
    return number if number is not None else int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An embedded tensor's values, as ``onnx.numpy_helper.to_array`` reads them.

    Raw data comes back as a read-only view of the message's bytes.
    """
    plain = _PLAIN.get(tensor.data_type)
    if plain is None or tensor.HasField("segment") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    dtype, field = plain
    dims = tuple(tensor.dims)
    if tensor.HasField("raw_data"):
        array = np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<"))
        if sys.byteorder == "big":  # pragma: no cover - big-endian hosts
            array = array.astype(dtype)
        return array.reshape(dims)
    values = getattr(tensor, field)
    if tensor.data_type in _SIXTEEN_BITS:  # the bits of each value, one per int32
        bits = np.array(values, dtype=np.int32).view(np.uint32).astype(np.uint16)
        return bits.reshape(dims).view(dtype)
    if dtype == np.bool_:
        return np.array(values, dtype=np.int32).view(np.uint32).astype(np.uint8).view(dtype).reshape(dims)
    return np.asarray(values, dtype=_STORAGE[field]).astype(dtype).reshape(dims)


def from_array(array: np.ndarray, name: str | None = None) -> onnx.TensorProto:
    """A tensor holding ``array`` as little-endian raw data (``onnx.numpy_helper.from_array``)."""
    number = _BY_DTYPE.get(array.dtype.newbyteorder("="))
    if number is None:
        return onnx.numpy_helper.from_array(array, name)
    tensor = onnx.TensorProto()
    tensor.dims.extend(array.shape)
    if name:
        tensor.name = name
    if array.dtype.byteorder == ">" or (sys.byteorder == "big" and array.dtype.byteorder == "="):
        array = array.astype(array.dtype.newbyteorder("<"))  # pragma: no cover - big-endian data
    tensor.raw_data = array.tobytes()
    tensor.data_type = number
    return tensor


def make_attribute(name: str, value: Any) -> onnx.AttributeProto:
    """An attribute from a Python value, typed as ``onnx.helper.make_attribute`` types it, for
    ints, floats, strings, tensors and lists of ints or floats."""
    A = onnx.AttributeProto
    attr = A()
    attr.name = name
    if isinstance(value, numbers.Integral):
        attr.i, attr.type = int(value), A.INT
    elif isinstance(value, numbers.Real):
        attr.f, attr.type = float(value), A.FLOAT
    elif isinstance(value, str | bytes):
        attr.s, attr.type = value.encode() if isinstance(value, str) else value, A.STRING
    elif isinstance(value, onnx.TensorProto):
        attr.t.CopyFrom(value)
        attr.type = A.TENSOR
    elif isinstance(value, Iterable) and (items := list(value)) and _all(items, numbers.Integral):
        attr.ints.extend(int(v) for v in items)
        attr.type = A.INTS
    elif isinstance(value, Iterable) and items and _all(items, numbers.Real):
        attr.floats.extend(float(v) for v in items)
        attr.type = A.FLOATS
    else:  # a one-shot iterable was consumed above: hand onnx the items
        return onnx.helper.make_attribute(name, items if isinstance(value, Iterator) else value)
    return attr


def _all(items: list[Any], kind: type) -> bool:
    return all(isinstance(v, kind) for v in items)


def make_node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    name: str | None = None,
    domain: str | None = None,
    **attributes: Any,
) -> onnx.NodeProto:
    """A node, its attributes sorted by name (``onnx.helper.make_node``)."""
    node = onnx.NodeProto()
    node.op_type = op_type
    node.input.extend(inputs)
    node.output.extend(outputs)
    if name:
        node.name = name
    if domain is not None:
        node.domain = domain
    node.attribute.extend(make_attribute(k, v) for k, v in sorted(attributes.items()) if v is not None)
    return node


def make_tensor_value_info(
    name: str, elem_type: int, shape: Sequence[int | str | None]
) -> onnx.ValueInfoProto:
    """A tensor's declaration (``onnx.helper.make_tensor_value_info``)."""
    info = onnx.ValueInfoProto()
    info.name = name
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = elem_type
    dims = tensor_type.shape.dim
    tensor_type.shape.SetInParent()
    for d in shape:
        dim = dims.add()
        if isinstance(d, numbers.Integral):
            dim.dim_value = int(d)
        elif isinstance(d, str):
            dim.dim_param = d
    return info
