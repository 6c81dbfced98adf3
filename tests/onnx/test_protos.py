"""bnfold.onnx.protos and bnfold.onnxlib against onnx's own functions (issue 14).

protos builds and reads plain numeric tensors, nodes and attributes without ``onnx.helper``; every
message it makes must serialize to the bytes onnx's helper makes, and every array it reads must
equal numpy_helper's, bit for bit. Anything it does not handle itself falls through to onnx and
equals too. onnxlib's stand-in must give the real package's classes, before and after the real
import, and fall back to the real package when onnx's generated module cannot be run alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bnfold import fold_path, onnxlib
from bnfold.onnx import protos
from onnx_builders import gemm_bn

REPO = Path(__file__).resolve().parents[2]

PLAIN = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]
PLAIN_IDS = [np.dtype(d).name for d in PLAIN]
SHAPES = [(), (0,), (3,), (2, 3, 4)]
SHAPE_IDS = ["scalar", "empty", "vector", "3d"]


def sample(rng: np.random.Generator, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """Values spanning the dtype: extremes and negatives for integers, signs, tiny and huge
    magnitudes for floats (NaN and inf included when there is room)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        flat = rng.integers(0, 2, n).astype(np.bool_)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        flat = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    else:
        flat = (rng.normal(0, 1, n) * 10.0 ** rng.integers(-3, 4, n)).astype(dt)
        specials = np.array([np.nan, np.inf, -0.0, np.finfo(dt).smallest_subnormal], dtype=dt)
        k = min(n, len(specials))
        flat[:k] = specials[:k]
    return flat.reshape(shape)


def same_array(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal dtype, shape and bytes (so NaN payloads, -0.0 and subnormals count)."""
    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    if ours.dtype == object:  # strings: their bytes are pointers
        assert ours.tolist() == theirs.tolist()
    else:
        assert ours.tobytes() == theirs.tobytes()


def same_bytes(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    assert ours.SerializeToString() == theirs.SerializeToString()


# --------------------------------------------------------------------------- from_array


@pytest.mark.parametrize("name", ["", "x", None], ids=["no-name", "named", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", PLAIN, ids=PLAIN_IDS)
def test_from_array_bytes_equal_numpy_helper(
    rng: np.random.Generator, dtype: type, shape: tuple[int, ...], name: str | None
) -> None:
    a = sample(rng, dtype, shape)
    t = protos.from_array(a, name)
    same_bytes(t, numpy_helper.from_array(a, name))
    assert t.data_type == helper.np_dtype_to_tensor_dtype(a.dtype)


@pytest.mark.parametrize("dtype", PLAIN, ids=PLAIN_IDS)
@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: a[::-1, 1:, ::3],
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["strided", "transposed", "reversed", "broadcast"],
)
def test_from_array_non_contiguous(rng: np.random.Generator, dtype: type, view: Any) -> None:
    a = view(sample(rng, dtype, (4, 5, 6)))
    assert not a.flags.c_contiguous
    same_bytes(protos.from_array(a, "x"), numpy_helper.from_array(a, "x"))


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8", ">i2", ">i4", ">i8", ">u2", ">u4", ">u8"])
def test_from_array_big_endian_writes_little_endian(rng: np.random.Generator, dtype: str) -> None:
    """onnx refuses a big-endian array (no element type for '>f4'); protos writes what onnx
    writes for the same values in native order: raw data is little-endian."""
    native = sample(rng, np.dtype(dtype).newbyteorder("="), (2, 3))
    big = native.astype(dtype)
    assert big.dtype.byteorder == ">"
    with pytest.raises(ValueError, match="Unable to convert"):
        numpy_helper.from_array(big, "x")
    same_bytes(protos.from_array(big, "x"), numpy_helper.from_array(native, "x"))


NON_PLAIN = {
    "bfloat16": lambda: np.array([1.5, -2.0, np.inf, np.nan], dtype=ml_dtypes.bfloat16).reshape(2, 2),
    "float8e4m3": lambda: np.array([0.5, -1.0, 448.0], dtype=ml_dtypes.float8_e4m3fn),
    "int4": lambda: np.array([-8, 7, 0], dtype=ml_dtypes.int4),
    "str": lambda: np.array(["a", "ünï", ""]),
    "object": lambda: np.array(["a", b"b"], dtype=object),
    "complex64": lambda: np.array([1 + 2j, -3.5j], dtype=np.complex64),
    "complex128": lambda: np.array([[1 + 2j], [np.nan]], dtype=np.complex128),
}


@pytest.mark.parametrize("make", NON_PLAIN.values(), ids=NON_PLAIN.keys())
def test_from_array_other_types_fall_through(make: Any) -> None:
    a = make()
    same_bytes(protos.from_array(a, "x"), numpy_helper.from_array(a, "x"))


# --------------------------------------------------------------------------- to_array


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", PLAIN, ids=PLAIN_IDS)
def test_to_array_raw_data_equals_numpy_helper(rng: np.random.Generator, dtype: type, shape: tuple) -> None:
    a = sample(rng, dtype, shape)
    t = numpy_helper.from_array(a, "x")
    assert t.HasField("raw_data")
    ours = protos.to_array(t)
    same_array(ours, numpy_helper.to_array(t))
    same_array(ours, a)


def test_to_array_raw_data_is_a_read_only_view() -> None:
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "x")
    a = protos.to_array(t)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


def typed(data_type: int, field: str, values: list, dims: tuple[int, ...]) -> TensorProto:
    t = TensorProto()
    t.name = "t"
    t.data_type = data_type
    t.dims.extend(dims)
    getattr(t, field).extend(values)
    return t


def raw(data_type: int, payload: np.ndarray, dims: tuple[int, ...]) -> TensorProto:
    """A tensor whose raw_data is ``payload``'s bytes, whatever ``dims`` says."""
    t = typed(data_type, "int32_data", [], dims)
    t.raw_data = payload.tobytes()
    return t


F16_BITS = [0x7E00, 0x7C00, 0xFC00, 0x0001, 0x8001, 0x8000, 0x3C00, 0x7BFF, 0xFE01, 0x03FF, 0xC000, 0x0000]
"""float16 bit patterns: NaN, +inf, -inf, subnormals, -0, 1, max, a NaN with payload, ..."""
F32_VALUES = [np.nan, np.inf, -np.inf, 1e-45, -1e-45, -0.0, 3.4028235e38, 1.5, -2.25, 1e-40, 0.1, 0.0]
TYPED_CASES = {
    "float": (TensorProto.FLOAT, "float_data", F32_VALUES, (3, 4)),
    "double": (
        TensorProto.DOUBLE,
        "double_data",
        [np.nan, -np.inf, 5e-324, -0.0, 1.7976931348623157e308, 0.1],
        (6,),
    ),
    "float16-bits": (TensorProto.FLOAT16, "int32_data", F16_BITS, (2, 6)),
    "float16-negative-bits": (TensorProto.FLOAT16, "int32_data", [-1024, -512, -1], (3,)),
    "int8": (TensorProto.INT8, "int32_data", [-128, 127, -1, 0, 5, -77], (2, 3)),
    "int16": (TensorProto.INT16, "int32_data", [-32768, 32767, -1, 0, 1234, -4321], (3, 2)),
    "int16-unsigned-form": (TensorProto.INT16, "int32_data", [65535, 32768, 1], (3,)),
    "uint8": (TensorProto.UINT8, "int32_data", [0, 255, 128, 7], (4,)),
    "uint16": (TensorProto.UINT16, "int32_data", [0, 65535, 32768, 9], (2, 2)),
    "int32": (TensorProto.INT32, "int32_data", [-(2**31), 2**31 - 1, -5, 0], (4,)),
    "int64": (TensorProto.INT64, "int64_data", [-(2**63), 2**63 - 1, -7, 0, 3, 9], (1, 6)),
    "uint32": (TensorProto.UINT32, "uint64_data", [0, 2**32 - 1, 12345], (3,)),
    "uint64": (TensorProto.UINT64, "uint64_data", [0, 2**64 - 1, 2**63, 1], (2, 2)),
    "bool": (TensorProto.BOOL, "int32_data", [1, 0, 0, 1, 1, 1], (2, 3)),
    "scalar": (TensorProto.FLOAT, "float_data", [-3.5], ()),
    "empty": (TensorProto.INT64, "int64_data", [], (0, 3)),
}


@pytest.mark.parametrize("case", TYPED_CASES.values(), ids=TYPED_CASES.keys())
def test_to_array_typed_fields_equal_numpy_helper(case: tuple) -> None:
    t = typed(*case)
    ours = protos.to_array(t)
    same_array(ours, numpy_helper.to_array(t))
    assert ours.dtype == protos.np_dtype(t.data_type)


def test_to_array_float16_bits_mean_what_they_say() -> None:
    """Independent of onnx: the int32 field holds each float16's bits."""
    a = protos.to_array(typed(TensorProto.FLOAT16, "int32_data", [0x3C00, 0x7C00, 0x0001, 0xFC00], (4,)))
    assert a.dtype == np.float16
    np.testing.assert_array_equal(a, np.array([1.0, np.inf, 2.0**-24, -np.inf], dtype=np.float16))
    assert np.isnan(protos.to_array(typed(TensorProto.FLOAT16, "int32_data", [0x7E00], ()))).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: raw(TensorProto.FLOAT, np.arange(7, dtype=np.float32), (2, 3)),
        lambda: raw(TensorProto.INT8, np.arange(5, dtype=np.int8), (2, 3)),
        lambda: typed(TensorProto.INT64, "int64_data", [1, 2, 3], (2, 2)),
        lambda: typed(TensorProto.FLOAT16, "int32_data", [1, 2, 3], (4,)),
        lambda: typed(TensorProto.BOOL, "int32_data", [1], (2,)),
    ],
    ids=["raw-too-long", "raw-too-short", "int64-too-few", "float16-too-few", "bool-too-few"],
)
def test_to_array_wrong_count_raises_value_error_in_both(make: Any) -> None:
    t = make()
    with pytest.raises(ValueError):
        numpy_helper.to_array(t)
    with pytest.raises(ValueError):
        protos.to_array(t)


def test_to_array_raw_data_not_a_multiple_of_the_item_size_raises_in_both() -> None:
    t = raw(TensorProto.INT32, np.zeros(7, np.uint8), (2,))
    with pytest.raises(ValueError):
        numpy_helper.to_array(t)
    with pytest.raises(ValueError):
        protos.to_array(t)


def test_to_array_segment_is_refused_as_onnx_refuses_it() -> None:
    t = numpy_helper.from_array(np.ones(3, np.float32), "x")
    t.segment.begin = 0
    t.segment.end = 3
    with pytest.raises(ValueError, match="segment"):
        protos.to_array(t)


@pytest.mark.parametrize("make", NON_PLAIN.values(), ids=NON_PLAIN.keys())
def test_to_array_other_types_fall_through(make: Any) -> None:
    t = numpy_helper.from_array(make(), "x")
    same_array(protos.to_array(t), numpy_helper.to_array(t))


def test_to_array_bfloat16_typed_field_falls_through() -> None:
    t = typed(TensorProto.BFLOAT16, "int32_data", [0x3FC0, 0x7F80, 0xFFC1], (3,))
    same_array(protos.to_array(t), numpy_helper.to_array(t))


# --------------------------------------------------------------------------- attributes and nodes


ATTRIBUTES = {
    "int": 3,
    "negative-int": -(2**40),
    "bool": True,
    "np.int64": np.int64(-5),
    "np.uint8": np.uint8(200),
    "float": 0.1,
    "float-nan": float("nan"),
    "float-inf": float("-inf"),
    "np.float32": np.float32(0.1),
    "np.float16": np.float16(1.5),
    "np.float64": np.float64(1e-3),
    "str": "NOTSET",
    "unicode-str": "ünï",
    "bytes": b"\x00\xff",
    "tensor": numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "v"),
    "list-of-ints": [1, 2, 3],
    "tuple-of-ints": (0, 2, 1, 3),
    "list-of-np-ints": [np.int64(1), np.int32(-2)],
    "list-of-floats": [0.5, 1.5, -2.25],
    "list-of-np.float32": [np.float32(0.1), np.float32(3)],
    "mixed-int-float": [1, 2.5, 3],
    "np-int-array": np.array([4, 5, 6], dtype=np.int64),
    "np-float-array": np.array([0.25, 0.1], dtype=np.float32),
    "range": range(3),
    "graph": helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [], []),
    "list-of-strings": ["a", "b"],
    "list-of-tensors": [numpy_helper.from_array(np.ones(2, np.int64), "s")],
    "type-proto": helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 2]),
}


@pytest.mark.parametrize("value", ATTRIBUTES.values(), ids=ATTRIBUTES.keys())
def test_make_attribute_bytes_equal_helper(value: Any) -> None:
    same_bytes(protos.make_attribute("k", value), helper.make_attribute("k", value))


@pytest.mark.parametrize(
    "value",
    [np.bool_(True), [], 2**70, [1, "a"], np.array(3), object(), None],
    ids=["np.bool_", "empty-list", "int-overflow", "int-and-str", "0d-array", "object", "none"],
)
def test_make_attribute_refuses_what_helper_refuses(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as theirs:
        helper.make_attribute("k", value)
    with pytest.raises(theirs.type):
        protos.make_attribute("k", value)


def test_make_attribute_list_of_bools_is_ints() -> None:
    """onnx.helper refuses [True, False] (protobuf will not put a bool in an int field); protos
    writes the ints 1 and 0, as it writes a single bool as the int 1."""
    with pytest.raises(TypeError):
        helper.make_attribute("k", [True, False])
    same_bytes(protos.make_attribute("k", [True, False]), helper.make_attribute("k", [1, 0]))


ONE_SHOT = {
    "strings": lambda: (s for s in ["a", "b"]),
    "graphs": lambda: iter([helper.make_graph([], "g", [], [])]),
}


@pytest.mark.parametrize("make", ONE_SHOT.values(), ids=ONE_SHOT.keys())
def test_make_attribute_one_shot_iterable_of_other_types(make: Any) -> None:
    same_bytes(protos.make_attribute("k", make()), helper.make_attribute("k", make()))


@pytest.mark.parametrize(
    "make", [lambda: (i for i in [1, 2]), lambda: map(float, [1.5, 2])], ids=["ints", "floats"]
)
def test_make_attribute_one_shot_iterable_of_numbers(make: Any) -> None:
    same_bytes(protos.make_attribute("k", make()), helper.make_attribute("k", make()))


NODE_ATTRS: dict[str, Any] = {
    "strides": [2, 1],
    "pads": (1, 1, 0, 0),
    "group": np.int64(2),
    "auto_pad": "NOTSET",
    "alpha": None,
    "epsilon": 1e-5,
    "dilations": [1, 1],
}


@pytest.mark.parametrize("domain", [None, "", "com.x"], ids=["none", "empty", "custom"])
@pytest.mark.parametrize("name", [None, "", "conv_0"], ids=["none", "empty", "named"])
def test_make_node_bytes_equal_helper(name: str | None, domain: str | None) -> None:
    """Attributes given out of order come out sorted by name; None values are dropped."""
    args = ("Conv", ["x", "w", ""], ["y"])
    ours = protos.make_node(*args, name=name, domain=domain, **NODE_ATTRS)
    same_bytes(ours, helper.make_node(*args, name=name, domain=domain, **NODE_ATTRS))
    assert [a.name for a in ours.attribute] == sorted(k for k, v in NODE_ATTRS.items() if v is not None)


def test_make_node_without_attributes() -> None:
    same_bytes(protos.make_node("Add", ["a", ""], [""]), helper.make_node("Add", ["a", ""], [""]))


VALUE_INFOS = {
    "int-dims": (TensorProto.FLOAT, [1, 3, 224, 224]),
    "str-dims": (TensorProto.FLOAT16, ["N", 3, "H", "W"]),
    "none-dims": (TensorProto.INT64, [None, 5]),
    "empty-shape": (TensorProto.DOUBLE, []),
    "tuple-shape": (TensorProto.BOOL, (0, 2)),
    "zero-dim": (TensorProto.UINT8, [0]),
}


@pytest.mark.parametrize("case", VALUE_INFOS.values(), ids=VALUE_INFOS.keys())
def test_make_tensor_value_info_bytes_equal_helper(case: tuple) -> None:
    elem, shape = case
    ours = protos.make_tensor_value_info("v", elem, shape)
    same_bytes(ours, helper.make_tensor_value_info("v", elem, shape))
    assert ours.type.tensor_type.HasField("shape")  # a scalar's empty shape is still a shape


def test_make_tensor_value_info_never_drops_a_numpy_dim() -> None:
    try:
        info = protos.make_tensor_value_info("v", TensorProto.FLOAT, [np.int64(3), 4])
    except (TypeError, ValueError):
        return
    assert [d.dim_value for d in info.type.tensor_type.shape.dim] == [3, 4]


# --------------------------------------------------------------------------- dtypes


def convertible() -> list[int]:
    out = []
    for value in TensorProto.DataType.values():
        try:
            helper.tensor_dtype_to_np_dtype(value)
        except (KeyError, ValueError, TypeError):
            continue
        out.append(int(value))
    return out


CONVERTIBLE = convertible()
NAMES = [TensorProto.DataType.Name(v) for v in CONVERTIBLE]


def test_every_plain_type_is_convertible() -> None:
    assert len(CONVERTIBLE) >= 20
    for dtype in PLAIN:
        assert helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in CONVERTIBLE


@pytest.mark.parametrize("data_type", CONVERTIBLE, ids=NAMES)
def test_dtype_mappings_equal_helper(data_type: int) -> None:
    np_dtype = helper.tensor_dtype_to_np_dtype(data_type)
    assert protos.np_dtype(data_type) == np_dtype
    assert protos.typed_field(data_type) == helper.tensor_dtype_to_field(data_type)
    assert protos.data_type_of(np_dtype) == helper.np_dtype_to_tensor_dtype(np_dtype)


@pytest.mark.parametrize("dtype", PLAIN, ids=PLAIN_IDS)
def test_data_type_of_plain_types_in_any_byte_order(dtype: type) -> None:
    """A big- or little-endian dtype has its native type's element type (onnx raises for '>')."""
    native = np.dtype(dtype)
    expected = helper.np_dtype_to_tensor_dtype(native)
    for order in "<>=":
        assert protos.data_type_of(native.newbyteorder(order)) == expected


@pytest.mark.parametrize("dtype", ["U7", "S3", "c8"], ids=["unicode", "bytes", "complex64"])
def test_data_type_of_other_dtypes_fall_through(dtype: str) -> None:
    try:
        theirs: int | type[Exception] = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except ValueError:
        theirs = ValueError
    if theirs is ValueError:
        with pytest.raises(ValueError):
            protos.data_type_of(np.dtype(dtype))
    else:
        assert protos.data_type_of(np.dtype(dtype)) == theirs


@pytest.mark.parametrize("data_type", [0, 999], ids=["undefined", "unknown"])
def test_unconvertible_types_raise_as_helper_raises(data_type: int) -> None:
    with pytest.raises(Exception) as theirs:
        helper.tensor_dtype_to_np_dtype(data_type)
    with pytest.raises(theirs.type):
        protos.np_dtype(data_type)


# --------------------------------------------------------------------------- onnxlib


def test_stand_in_classes_are_the_real_packages() -> None:
    assert onnxlib.real_onnx_imported()
    for name in ("ModelProto", "GraphProto", "NodeProto", "TensorProto", "AttributeProto", "ValueInfoProto"):
        assert getattr(onnxlib.onnx, name) is getattr(onnx, name)
    assert onnxlib.onnx.TensorProto.FLOAT == onnx.TensorProto.FLOAT == 1
    assert onnxlib.onnx.AttributeProto.INTS == AttributeProto.INTS
    assert onnxlib.onnx.IR_VERSION == onnx.IR_VERSION
    assert onnxlib.onnx.helper is onnx.helper
    assert onnxlib.onnx.numpy_helper is onnx.numpy_helper
    assert onnxlib.full_import() is onnx
    with pytest.raises(AttributeError):
        onnxlib.onnx.__wrapped__  # noqa: B018
    with pytest.raises(AttributeError):
        onnxlib.onnx.no_such_thing  # noqa: B018


def run_python(code: str, *args: str | os.PathLike[str]) -> str:
    """``code`` in a fresh interpreter (no onnx imported yet) with ``args``; its stdout. Fails on
    a non-zero exit."""
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


BUILD_BEFORE_IMPORT = r"""
import sys
import numpy as np
from bnfold import onnxlib
from bnfold.onnx import protos
o = onnxlib.onnx
x = protos.make_tensor_value_info("x", o.TensorProto.FLOAT, [1, 2])
y = protos.make_tensor_value_info("y", o.TensorProto.FLOAT, [1, 2])
w = protos.from_array(np.array([[1.5, -2.0], [0.25, 4.0]], np.float32), "w")
node = protos.make_node("MatMul", ["x", "w"], ["y"], name="mm")
m = o.ModelProto()
m.ir_version = 8
op = m.opset_import.add()
op.version = 17
m.graph.name = "g"
m.graph.node.append(node)
m.graph.initializer.append(w)
m.graph.input.append(x)
m.graph.output.append(y)
parsed = o.ModelProto()
parsed.ParseFromString(m.SerializeToString())
stand_in_class = o.ModelProto
before = [k for k in ("onnx", "onnx.helper", "ml_dtypes") if k in sys.modules]
assert not onnxlib.real_onnx_imported()
import onnx
assert onnxlib.real_onnx_imported()
assert stand_in_class is onnx.ModelProto and o.ModelProto is onnx.ModelProto
assert isinstance(parsed, onnx.ModelProto) and isinstance(parsed.graph.node[0], onnx.NodeProto)
onnx.checker.check_model(parsed, full_check=True)
parsed.graph.node.append(onnx.helper.make_node("Identity", ["y"], ["z"]))  # mixes with the package's
parsed.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 2]))
onnx.checker.check_model(parsed)
assert onnx.numpy_helper.to_array(parsed.graph.initializer[0]).tolist() == [[1.5, -2.0], [0.25, 4.0]]
print("before", before)
print("ok")
"""


def test_messages_made_before_the_real_import_are_the_packages() -> None:
    """A model built and parsed through the stand-in, before ``import onnx``, is an
    onnx.ModelProto afterwards and passes the checker."""
    out = run_python(BUILD_BEFORE_IMPORT)
    assert "before []" in out
    assert out.strip().endswith("ok")


def test_stand_in_helper_access_imports_the_real_package() -> None:
    out = run_python(
        "import sys\nfrom bnfold.onnxlib import onnx as o\n"
        "o.TensorProto\nprint('after classes', 'onnx' in sys.modules, 'ml_dtypes' in sys.modules)\n"
        "h = o.helper\nimport onnx\n"
        "print('after helper', 'onnx' in sys.modules, h is onnx.helper, o.ModelProto is onnx.ModelProto)\n"
    )
    assert "after classes False False" in out
    assert "after helper True True True" in out


FALLBACK = r"""
import os, sys
import numpy as np
real_join = os.path.join
BROKEN = __BROKEN__


def join(*parts):
    if parts and parts[-1] == "onnx_ml_pb2.py":
        return BROKEN
    return real_join(*parts)


os.path.join = join
from bnfold import onnxlib
from bnfold.onnx import protos
cls = onnxlib.onnx.ModelProto  # first use: the generated module cannot be loaded alone
os.path.join = real_join
assert onnxlib.real_onnx_imported()  # the fallback was taken: the real package serves
import onnx
assert cls is onnx.ModelProto
assert onnxlib.onnx.TensorProto is onnx.TensorProto
t = protos.from_array(np.arange(4, dtype=np.float32), "t")
assert t.SerializeToString() == onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "t").SerializeToString()
import bnfold
bnfold.fold_path(sys.argv[1], sys.argv[2], verify=False)
print("ok")
"""


@pytest.mark.parametrize("broken", ["missing", "raises", "no-messages"])
def test_stand_in_falls_back_to_the_real_package(
    tmp_path: Path, rng: np.random.Generator, broken: str
) -> None:
    """When onnx's generated module cannot be loaded alone (missing, failing, or not what is
    expected), the real package serves everything and a fold writes the same bytes."""
    path = tmp_path / "onnx_ml_pb2.py"
    if broken == "raises":
        path.write_text("raise RuntimeError('not loadable alone')\n")
    elif broken == "no-messages":
        path.write_text("X = 1\n")
    src, fresh, here = tmp_path / "m.onnx", tmp_path / "fresh.onnx", tmp_path / "here.onnx"
    onnx.save(gemm_bn(rng).model(), str(src))
    out = run_python(FALLBACK.replace("__BROKEN__", repr(str(path))), src, fresh)
    assert out.strip() == "ok"
    fold_path(src, here, verify=False)
    assert fresh.read_bytes() == here.read_bytes()
