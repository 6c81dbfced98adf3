"""Tiny ONNX graphs for the fold-pass tests, written with onnx.helper."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import bn_stats

IR = 10  # onnxruntime 1.31 reads IR <= 13; helper.make_model defaults to the newest


@dataclass
class G:
    """A graph under construction."""

    rng: np.random.Generator
    opset: int = 17
    ir: int = IR
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)

    def input(self, name: str, shape: Sequence[int], dtype: type = np.float32) -> str:
        self.inputs.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
        )
        self.feeds[name] = self.rng.normal(0, 1, shape).astype(dtype)
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: object) -> onnx.NodeProto:
        n = helper.make_node(op, list(inputs), list(outputs), name=f"{op.lower()}_{len(self.nodes)}", **attrs)
        self.nodes.append(n)
        return n

    def bn(
        self, x: str, c: int, out: str, *, prefix: str = "bn", dtype: type = np.float32, **attrs: object
    ) -> onnx.NodeProto:
        names = [
            self.init(f"{prefix}_{k}", v)
            for k, v in zip(("scale", "bias", "mean", "var"), bn_stats(self.rng, c, dtype))
        ]
        n = helper.make_node("BatchNormalization", [x, *names], [out], name=prefix, **attrs)
        self.nodes.append(n)
        return n

    def output(
        self, name: str, dtype: int = TensorProto.FLOAT, shape: Sequence[int | None] | None = None
    ) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def model(self) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=self.ir)
        m.producer_name = "bnfold-tests"
        m.doc_string = "a test model"
        helper.set_model_props(m, {"owner": "tests"})
        return m


def conv_bn(
    rng: np.random.Generator,
    *,
    op: str = "Conv",
    rank: int = 2,
    group: int = 1,
    bias: bool = True,
    cin: int = 4,
    cout: int = 6,
    eps: float | None = 1e-3,
    dtype: type = np.float32,
) -> G:
    """x -> Conv/ConvTranspose -> BN -> Relu -> out."""
    g = G(rng)
    x = g.input("x", [2, cin, *([7] * rank)], dtype)
    k = (3,) * rank
    if op == "Conv":
        w = rng.normal(0, 1, (cout, cin // group, *k))
    else:
        w = rng.normal(0, 1, (cin, cout // group, *k))
    ins = [x, g.init("W", w.astype(dtype))]
    if bias:
        ins.append(g.init("B", rng.normal(0, 1, cout).astype(dtype)))
    extra = {"strides": [2] * rank} if op == "ConvTranspose" else {"pads": [1] * (2 * rank)}
    g.node(op, ins, ["y"], group=group, **extra)
    attrs = {} if eps is None else {"epsilon": eps}
    g.bn("y", cout, "z", dtype=dtype, **attrs)
    g.node("Relu", ["z"], ["out"])
    g.output("out", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [None] * (rank + 2))
    return g
