"""Every attribute the pass reads, with every wrong type, on every node of a model that
exercises each reader (Conv, Gemm, Transpose path, Concat split, Shape, Constant, BN): the pass
folds, skips with a reason, or raises InputError -- never another exception.

Before: ``training_mode`` as a STRING was a ValueError, ``epsilon`` with no type a TypeError,
a FLOAT-typed Constant ``value`` a TypeError from numpy_helper (exit 3, "internal error").
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import InputError

C = 4
READ = (
    "epsilon",
    "training_mode",
    "is_test",
    "spatial",
    "group",
    "transA",
    "transB",
    "alpha",
    "beta",
    "perm",
    "axis",
    "pads",
    "auto_pad",
    "start",
    "end",
    "value",
)
"""The attributes the pass reads (bnfold.onnx.attrs.attr callers)."""

WRONG = {
    AttributeProto.UNDEFINED: {},
    AttributeProto.FLOAT: {"f": 2.5},
    AttributeProto.INT: {"i": 7},
    AttributeProto.STRING: {"s": b"\xff\xfe"},
    AttributeProto.INTS: {"ints": [5, -9]},
    AttributeProto.FLOATS: {"floats": [1.0]},
}


def _bn(rng: np.random.Generator, prefix: str, c: int) -> list[onnx.TensorProto]:
    """Non-trivial statistics: gamma != 1, beta != 0, mean != 0, random var."""
    values = (rng.uniform(0.5, 2, c), rng.normal(0.3, 1, c), rng.normal(-0.2, 1, c), rng.uniform(0.3, 2, c))
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}{n}") for n, v in zip("gbmv", values)]


def model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((C, C, 1, 1)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((2 * C * 64, 5)).astype(np.float32), "G"),
        *_bn(rng, "a", C),
        *_bn(rng, "b", C),
        *_bn(rng, "c", 5),
        *_bn(rng, "d", 2 * C),
        *_bn(rng, "e", C),
    ]
    scale = numpy_helper.from_array(rng.uniform(0.5, 2, (1, C, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1], group=1),
        helper.make_node(
            "BatchNormalization", ["y", "ag", "ab", "am", "av"], ["z"], name="bn1", epsilon=1e-3
        ),
        helper.make_node("Transpose", ["z"], ["t"], name="tr", perm=[0, 1, 3, 2]),
        helper.make_node("Constant", [], ["s"], name="const", value=scale),
        helper.make_node("BatchNormalization", ["t", "eg", "eb", "em", "ev"], ["te"], name="bn5"),
        helper.make_node("Mul", ["te", "s"], ["t2"], name="mul"),
        helper.make_node("Conv", ["t2", "W2"], ["y2"], name="conv2"),
        helper.make_node("BatchNormalization", ["y2", "bg", "bb", "bm", "bv"], ["z2"], name="bn2"),
        helper.make_node("Concat", ["z2", "t2"], ["cc"], name="cat", axis=1),
        helper.make_node("BatchNormalization", ["cc", "dg", "db", "dm", "dv"], ["zc"], name="bn4"),
        helper.make_node("Shape", ["zc"], ["shape"], name="shape", start=0, end=1),
        helper.make_node("Flatten", ["zc"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "G"], ["gy"], name="gemm", transB=0, alpha=1.0, beta=1.0),
        helper.make_node("BatchNormalization", ["gy", "cg", "cb", "cm", "cv"], ["gz"], name="bn3"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("gz", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("shape", TensorProto.INT64, None),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BASE = model()
NODES = [n.name for n in BASE.graph.node]


def test_the_base_model_folds() -> None:
    """The mutations below start from a model where every reader runs and folds happen."""
    assert bnfold.analyze_onnx(BASE).folded


REFUSED = {"conv": "group", "bn1": "epsilon", "tr": "perm", "const": "value", "cat": "axis", "gemm": "transB"}
"""An attribute each of these nodes is known to be read for: a wrong type there must be refused."""


@pytest.mark.parametrize("node", NODES)
def test_every_wrongly_typed_attribute_is_an_input_error_or_harmless(node: str) -> None:
    refused = set()
    for name in READ:
        for kind, fields in WRONG.items():
            m = onnx.ModelProto()
            m.CopyFrom(BASE)
            target = next(n for n in m.graph.node if n.name == node)
            keep = [a for a in target.attribute if a.name != name]
            del target.attribute[:]
            target.attribute.extend(keep)
            bad = AttributeProto(name=name, type=kind)
            for key, value in fields.items():
                getattr(bad, key).extend(value) if isinstance(value, list) else setattr(bad, key, value)
            target.attribute.append(bad)
            try:
                bnfold.analyze_onnx(m)
            except InputError as e:
                message = str(e)
                assert "\n" not in message
                refused.add(name)
                if f"attribute {name!r}" in message:  # the typed reader: it names the node and the type
                    assert f"node {node!r}" in message and AttributeProto.AttributeType.Name(kind) in message
    if node in REFUSED:
        assert REFUSED[node] in refused
