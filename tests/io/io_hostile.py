"""A generator of hostile ONNX files for the loader: malformed tensors and names, and random
mutations (truncations, byte flips, insertions) of a valid model's bytes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from io_models import conv_bn_mlp
from onnx import TensorProto

Mutation = Callable[[onnx.ModelProto], None]


def _weight(model: onnx.ModelProto) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == "conv_w")


def _set(**fields: object) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        w = _weight(model)
        for name, value in fields.items():
            if name == "dims":
                del w.dims[:]
                w.dims.extend(value)  # type: ignore[arg-type]
            else:
                setattr(w, name, value)

    return mutate


def _raw(delta: int) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        w = _weight(model)
        w.raw_data = w.raw_data[:delta] if delta < 0 else w.raw_data + b"\0" * delta

    return mutate


def _typed(count_delta: int, *, keep_raw: bool = False) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        w = _weight(model)
        values = np.frombuffer(w.raw_data, np.float32)
        if not keep_raw:
            w.ClearField("raw_data")
        w.float_data.extend(
            values[: len(values) + count_delta].tolist() if count_delta <= 0 else values.tolist()
        )
        w.float_data.extend([0.0] * max(count_delta, 0))

    return mutate


def _external_string(model: onnx.ModelProto) -> None:
    t = model.graph.initializer.add()
    t.name, t.data_type, t.data_location = "s", TensorProto.STRING, TensorProto.EXTERNAL
    t.dims.append(1)
    for key, value in (("location", "m.onnx"), ("offset", "0"), ("length", "1")):
        e = t.external_data.add()
        e.key, e.value = key, value


def _segment(model: onnx.ModelProto) -> None:
    _weight(model).segment.begin = 0
    _weight(model).segment.end = 1


MALFORMED: dict[str, tuple[Mutation, str]] = {
    "raw-shorter-than-dims": (_raw(-4), "needs 1152 bytes but its data holds 1148"),
    "raw-longer-than-dims": (_raw(4), "needs 1152 bytes but its data holds 1156"),
    "raw-and-typed": (_typed(0, keep_raw=True), "both raw and typed data"),
    "typed-shorter-than-dims": (_typed(-3), "needs 288 values in float_data but holds 285"),
    "typed-longer-than-dims": (_typed(5), "needs 288 values in float_data but holds 293"),
    "dims-product-overflows": (_set(dims=[2**40, 2**40, 2**40]), "too large"),
    "dims-huge": (_set(dims=[2**62]), "too large"),
    "dims-negative": (_set(dims=[-8, 4, 3, 3]), "negative dimensions"),
    "element-type-0": (_set(data_type=0), "unknown data type 0"),
    "element-type-999": (_set(data_type=999), "unknown data type 999"),
    "string-tensor-external": (_external_string, "string tensor"),
    "tensor-segment": (_segment, "segment"),
}


def malformed_bytes(case: str) -> bytes:
    model = conv_bn_mlp(np.random.default_rng(5), extras=False)
    MALFORMED[case][0](model)
    return model.SerializeToString()


def non_utf8_name_bytes(where: str) -> bytes:
    """A model whose node name, tensor name or op type holds bytes that are not UTF-8."""
    model = conv_bn_mlp(np.random.default_rng(5), extras=False)
    marker = {"node": "conv", "initializer": "fc_b", "op_type": "Flatten"}[where]
    if where == "node":
        model.graph.node[0].name = "@@node@@"
    elif where == "initializer":
        model.graph.initializer[-1].name = "@@init@@"
        model.graph.node[-1].input[1] = "@@init@@"
    else:
        model.graph.node[2].op_type = "@@op@@"
    del marker
    data = model.SerializeToString()
    for token in (b"@@node@@", b"@@init@@", b"@@op@@"):
        data = data.replace(token, b"\xff\xfe" + token[2:-2] + b"\xc3(")
    return data


def mutate_bytes(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply ``(kind, position, value)`` mutations: ``cut`` (truncate), ``flip`` (xor a byte),
    ``insert`` (a byte), ``drop`` (a byte); positions wrap around the current length."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == "cut":
            del buf[max(pos, 1) :]
        elif kind == "flip":
            buf[pos] ^= value or 1
        elif kind == "insert":
            buf.insert(pos, value)
        else:
            del buf[pos]
    return bytes(buf)
