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
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    """Extra opset domains (version 1) the model imports, e.g. for its functions."""

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
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in self.domains]
        m = helper.make_model(g, opset_imports=opsets, ir_version=self.ir)
        m.functions.extend(self.functions)
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


def gemm_bn(rng: np.random.Generator, *, trans_b: int = 1, alpha: float = 0.5, beta: float = 2.0) -> G:
    """x (3, 5) -> Gemm(alpha, beta, C (7,)) -> BN -> out."""
    g = G(rng)
    g.input("x", [3, 5])
    w = rng.normal(0, 1, (7, 5) if trans_b else (5, 7)).astype(np.float32)
    c = g.init("C", rng.normal(0, 1, 7).astype(np.float32))
    g.node("Gemm", ["x", g.init("B", w), c], ["y"], transB=trans_b, alpha=alpha, beta=beta)
    g.bn("y", 7, "z")
    g.output("z", shape=[3, 7])
    return g


def matmul_bn(rng: np.random.Generator, *, add: bool) -> G:
    """x (4, 6) -> MatMul -> [Add (7,)] -> BN -> Relu -> out."""
    g = G(rng)
    g.input("x", [4, 6])
    g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (6, 7)).astype(np.float32))], ["mm"])
    y = "mm"
    if add:
        g.node("Add", ["mm", g.init("c", rng.normal(0, 1, 7).astype(np.float32))], ["y"])
        y = "y"
    g.bn(y, 7, "z")
    g.node("Relu", ["z"], ["out"])
    g.output("out", shape=[4, 7])
    return g


def conv_bn_bn(rng: np.random.Generator, *, bias: bool = True) -> G:
    """x -> Conv -> BN -> BN -> Relu -> out (both BN fold, one after the other)."""
    g = conv_bn(rng, bias=bias)
    relu = g.nodes.pop()
    g.bn("z", 6, "z2", prefix="bn2")
    relu.input[0] = "z2"
    g.nodes.append(relu)
    return g


def conv_bn_in_subgraph(rng: np.random.Generator, *, op: str) -> G:
    """Conv -> BN inside an If's branches or a Loop body, reading W and BN parameters from the
    outer graph (the feeds include the If condition)."""
    g = conv_bn(rng)
    conv, bn, _relu = g.nodes
    g.nodes = []

    def body(tag: str, extra_inputs: list[onnx.ValueInfoProto], passthrough: list[str]) -> onnx.GraphProto:
        c = helper.make_node("Conv", list(conv.input), [f"y_{tag}"], name=f"conv_{tag}", pads=[1, 1, 1, 1])
        b = helper.make_node(
            "BatchNormalization", [f"y_{tag}", *bn.input[1:]], [f"z_{tag}"], name=f"bn_{tag}", epsilon=1e-3
        )
        r = helper.make_node("Relu" if tag != "else" else "Sigmoid", [f"z_{tag}"], [f"o_{tag}"])
        nodes = [c, b, r] + [helper.make_node("Identity", [p], [f"{p}_out"]) for p in passthrough]
        outs = [helper.make_tensor_value_info(f"{p}_out", TensorProto.BOOL, []) for p in passthrough]
        outs.append(helper.make_tensor_value_info(f"o_{tag}", TensorProto.FLOAT, None))
        return helper.make_graph(nodes, tag, extra_inputs, outs)

    if op == "If":
        g.input("cond", [], np.bool_)
        g.feeds["cond"] = np.array(True)
        g.nodes.append(
            helper.make_node(
                "If",
                ["cond"],
                ["out"],
                then_branch=body("then", [], []),
                else_branch=body("else", [], []),
                name="if",
            )
        )
    else:
        trip = g.init("trip", np.array(1, np.int64))
        cond = g.init("cond0", np.array(True))
        loop_body = body(
            "loop",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            ],
            ["c_in"],
        )
        g.nodes.append(helper.make_node("Loop", [trip, cond], ["out"], body=loop_body, name="loop"))
        g.outputs[:] = []
        g.output("out", shape=None)
    return g


def conv_bn_in_function(rng: np.random.Generator) -> G:
    """A model-local function ``local.ConvBN`` holding Conv -> BN with Constant weights."""
    g = G(rng)
    g.input("x", [1, 3, 6, 6])
    g.nodes.append(helper.make_node("ConvBN", ["x"], ["out"], domain="local", name="call"))
    g.output("out", shape=[1, 5, 4, 4])
    params = [numpy_helper.from_array(a, f"p{i}") for i, a in enumerate(bn_stats(rng, 5))]
    w = numpy_helper.from_array(rng.normal(0, 1, (5, 3, 3, 3)).astype(np.float32), "Wt")
    body = [helper.make_node("Constant", [], [t.name], value=t) for t in (*params, w)]
    body += [
        helper.make_node("Conv", ["X", "Wt"], ["Y"], name="fconv"),
        helper.make_node("BatchNormalization", ["Y", "p0", "p1", "p2", "p3"], ["Z"], name="fbn"),
    ]
    g.functions.append(
        helper.make_function("local", "ConvBN", ["X"], ["Z"], body, [helper.make_opsetid("", 17)])
    )
    g.domains.append("local")
    return g


def assert_refused(g: G | onnx.ModelProto, reason: object, *, fragment: str = "") -> None:
    """Folding ``g`` folds nothing, reports exactly one refusal ``reason`` (a SkipReason) whose
    sentence holds ``fragment``, and leaves the graph unchanged."""
    from bnfold import fold_onnx

    model = g.model() if isinstance(g, G) else g
    result = fold_onnx(model)
    assert not result.report.folded, result.report.folded
    assert [s.reason for s in result.report.skipped] == [reason], result.report.skipped
    assert fragment in result.report.skipped[0].detail
    assert result.model == model, "a refused fold must leave the graph unchanged"


def expose_intermediates(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose graph outputs include every node output, and their names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {v.name for v in out.graph.output}
    names = [o for n in out.graph.node for o in n.output if o and o not in have]
    out.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in names)
    return out, [v.name for v in out.graph.output]


def assert_untouched(g: G | onnx.ModelProto) -> None:
    """Folding ``g`` folds nothing, reports nothing and changes nothing: no fold candidate."""
    from bnfold import fold_onnx

    model = g.model() if isinstance(g, G) else g
    result = fold_onnx(model)
    assert not result.report.folded and not result.report.skipped, result.report
    assert result.model == model
