"""Models and helpers shared by the tests of bnfold.onnx.io."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.io import load as load_mod
from bnfold.onnx.io.external import model_tensors

BF16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
INT4 = helper.tensor_dtype_to_np_dtype(TensorProto.INT4)


def bn_params(rng: np.random.Generator, c: int, prefix: str) -> list[TensorProto]:
    """Non-trivial BN statistics: gamma != 1, beta != 0, mean != 0, random var."""
    return [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(rng.normal(0.3, 1.0, c).astype(np.float32), f"{prefix}_bias"),
        numpy_helper.from_array(rng.normal(-0.2, 1.0, c).astype(np.float32), f"{prefix}_mean"),
        numpy_helper.from_array(rng.uniform(0.3, 2.0, c).astype(np.float32), f"{prefix}_var"),
    ]


def conv_bn_mlp(rng: np.random.Generator, *, ir_version: int = 10, extras: bool = True) -> onnx.ModelProto:
    """Conv -> BN -> Flatten -> MatMul -> Add, plus (``extras``) unused tensors of many dtypes."""
    w = numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "conv_w")
    w.doc_string = "conv weight"
    inits = [
        w,
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "conv_b"),
        *bn_params(rng, 8, "bn"),
        numpy_helper.from_array(rng.normal(size=(512, 16)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "fc_b"),
    ]
    if extras:
        inits += [
            numpy_helper.from_array(rng.normal(size=600).astype(np.float16), "half"),
            numpy_helper.from_array(rng.normal(size=700).astype(BF16), "bf16"),
            numpy_helper.from_array(rng.integers(-(2**40), 2**40, size=200, dtype=np.int64), "i64"),
            numpy_helper.from_array(rng.integers(-8, 8, size=3001).astype(INT4), "i4"),
            numpy_helper.from_array(rng.normal(size=(40, 40)), "f64"),
            helper.make_tensor("typed", TensorProto.FLOAT, [300], rng.normal(size=300).tolist()),
            helper.make_tensor("names", TensorProto.STRING, [2], [b"a" * 900, b"b" * 900]),
        ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn"
        ),
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc_b"], ["out"], name="add"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    if ir_version <= 3:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(
        nodes,
        "conv_bn_mlp",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    graph.doc_string = "graph doc"
    opset = 17 if ir_version > 3 else 6
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    model.producer_name = "bnfold-tests"
    helper.set_model_props(model, {"origin": "test_io"})
    return model


def with_subgraph(rng: np.random.Generator) -> onnx.ModelProto:
    """An If whose branches hold their own initializers and a Constant node with a large tensor."""

    def branch(name: str) -> onnx.GraphProto:
        k = numpy_helper.from_array(rng.normal(size=(1, 4, 1, 1)).astype(np.float32) + 2.0, f"{name}_k")
        big = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), f"{name}_w")
        pad = numpy_helper.from_array(rng.normal(size=400).astype(np.float32), f"{name}_pad")
        return helper.make_graph(
            [
                helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"]),
                helper.make_node("Mul", [f"{name}_c", f"{name}_k"], [f"{name}_y"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4, 8, 8])],
            [k, big, pad],
        )

    const = numpy_helper.from_array(rng.normal(size=(1, 4, 8, 8)).astype(np.float32), "cval")
    nodes = [
        helper.make_node("Constant", [], ["cst"], value=const),
        helper.make_node("Add", ["x", "cst"], ["xc"]),
        helper.make_node("If", ["cond"], ["r"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Add", ["r", "xc"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "with_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(rng.normal(size=2000).astype(np.float32), "main_pad")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def save_external(model: onnx.ModelProto, path: str, *, convert_attribute: bool = False) -> None:
    """onnx.save with external data, on a copy (onnx.save converts the model it is given in place)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        location=os.path.basename(path) + ".data",
        size_threshold=1024,
        convert_attribute=convert_attribute,
    )


def full(path: str) -> bytes:
    """The model at ``path`` with all external data loaded, serialized (a canonical content form).

    onnx.load sets ``data_location = DEFAULT`` explicitly on the tensors it loads (2 bytes each
    on the wire); an in-memory model leaves the field unset, so it is cleared here.
    """
    return canonical(onnx.load(path))


def canonical(model: onnx.ModelProto) -> bytes:
    for tensor in model_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return model.SerializeToString()


def tmp_files(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.fixture(autouse=True)
def small_stub_threshold(monkeypatch):
    """The test models are small: make their kilobyte-sized tensors stubs, as large ones are.

    Imported by each test module of tests/io (a conftest.py here would shadow tests/conftest.py
    for every ``from conftest import ...``)."""
    monkeypatch.setattr(load_mod, "LAZY_THRESHOLD", 1024)


def model_bytes() -> bytes:
    """A small valid model, serialized."""
    return conv_bn_mlp(np.random.default_rng(1), extras=False).SerializeToString()
