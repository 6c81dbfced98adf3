"""BN as torch's exporters write it: the dynamo exporter (raw and optimized) and the TorchScript one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models.converters.graph import DYNAMO_CONV, TORCHSCRIPT_CONV, GraphBuilder, conv_attrs

TORCH_DYNAMO = ("pytorch", "2.13.0+cpu")
TORCH_LEGACY = ("pytorch", "2.13.0")


class _Dynamo:
    """torch.onnx.export(dynamo=True) naming: ``val_N`` values, ``node_<Op>_N`` nodes, FX names."""

    def __init__(self, g: GraphBuilder, *, getitems: int = 0) -> None:
        self.g = g
        self.n = 0
        self.bns = 0
        self.getitems = getitems
        self.zero: str | None = None

    def val(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        out = f"val_{self.n}"
        self.g.op(op_type, inputs, out, name=f"node_{op_type}_{self.n}", **attrs)
        self.n += 1
        return out

    def conv_bn(self, x: str, prefix: str, bn: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        """Bias-less Conv -> BN, as torchlib's ``aten_convolution`` writes the missing bias:
        ``Expand(CastLike(0, input), Expand(Shape(weight, start=0, end=1), [1]))``.
        The zero Constant is written once and shared by every later conv, as the exporter does."""
        g = self.g
        w = g.weight(f"{prefix}.weight", (cout, cin, k, k))
        dim0 = self.val("Shape", [w], end=1, start=0)
        shape = self.val("Expand", [dim0, self.val("Constant", [], value_ints=[1])])
        if self.zero is None:
            self.zero = self.val("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32)))
        bias = self.val("Expand", [self.val("CastLike", [self.zero, x]), shape])
        conv = g.fresh("conv2d")
        g.op(
            "Conv",
            [x, w, bias],
            conv,
            name=f"node_{conv}",
            **conv_attrs(DYNAMO_CONV, k, pad=k // 2, stride=stride),
        )
        return self.bn(conv, bn, cout)

    def bn(self, x: str, prefix: str, c: int) -> str:
        """BN has three FX outputs (``getitem_N .. N+2``, the first used); the first BN's translation
        uses 8 ``val_N`` numbers, each later one 6 (it reuses two cached constants)."""
        names = [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        k = self.bns
        self.bns += 1
        self.n += 8 if k == 0 else 6
        out = "getitem" if self.getitems == 0 else f"getitem_{self.getitems}"
        self.getitems += 3
        node = (
            "_native_batch_norm_legit_no_training" if k == 0 else f"_native_batch_norm_legit_no_training_{k}"
        )
        return self.g.bn(x, out, names, c, name=f"node_{node}__0", momentum=0.9, epsilon=1e-5)

    def unary(self, op_type: str, x: str, stem: str) -> str:
        out = self.g.fresh(stem)
        return self.g.op(op_type, [x], out, name=f"node_{out}")


def torch_dynamo_resnet(seed: int) -> onnx.ModelProto:
    """ResNet basic blocks from ``torch.onnx.export(m, args, dynamo=True, optimize=False)``
    (torch 2.13, opset 20): every bias-less Conv gets the computed zero bias
    ``Expand(CastLike(Constant 0, <conv input>), Expand(Shape(weight, start=0, end=1), [1]))``.

    The bias depends only on the input's element type and the weight's static shape, so it is
    a constant (zeros of shape (C_out,)). A correct folder folds all 6 BN (stem, two basic
    blocks, the strided block's 1x1 projection shortcut). onnxscript's optimizer does; a folder
    that calls the bias run-time because ``CastLike`` names a graph input folds none.
    """
    g = GraphBuilder(seed)
    d = _Dynamo(g)
    x = d.unary("Relu", d.conv_bn("x", "conv1", "bn1", 3, 8, 3), "relu")
    y = d.unary("Relu", d.conv_bn(x, "layer1.0.conv1", "layer1.0.bn1", 8, 8, 3), "relu")
    y = d.conv_bn(y, "layer1.0.conv2", "layer1.0.bn2", 8, 8, 3)
    x = d.unary("Relu", g.op("Add", [y, x], g.fresh("add"), name="node_add"), "relu")
    y = d.unary("Relu", d.conv_bn(x, "layer2.0.conv1", "layer2.0.bn1", 8, 16, 3, 2), "relu")
    y = d.conv_bn(y, "layer2.0.conv2", "layer2.0.bn2", 16, 16, 3)
    s = d.conv_bn(x, "layer2.0.downsample.0", "layer2.0.downsample.1", 8, 16, 1, 2)
    x = d.unary("Relu", g.op("Add", [y, s], g.fresh("add"), name="node_add_1"), "relu")
    minus_one = d.val("Constant", [], value_ints=[-1])
    axes = d.val("Constant", [], value=numpy_helper.from_array(np.array([2, 3])))
    axes = d.val("Reshape", [axes, minus_one], allowzero=0)
    mean = g.op("ReduceMean", [x, axes], "mean", name="node_mean", noop_with_empty_axes=0, keepdims=0)
    g.weight("fc.weight", (10, 16))
    g.vector("fc.bias", (10,))
    g.op(
        "Gemm",
        [mean, "fc.weight", "fc.bias"],
        "linear",
        name="node_linear",
        beta=1.0,
        transB=1,
        alpha=1.0,
        transA=0,
    )
    return g.model(
        "main_graph",
        {"x": (1, 3, 16, 16)},
        ["linear"],
        opset=20,
        ir_version=10,
        producer=TORCH_DYNAMO,
        shapes={"mean": (1, 16), "linear": (1, 10)},
    )


def torch_dynamo_linear_bn1d(seed: int) -> onnx.ModelProto:
    """Linear -> BatchNorm1d twice on (N, F) from ``torch.onnx.export(dynamo=True, optimize=False)``
    (torch 2.13): ``Gemm(transB=1)`` with a bias, and a bias-less Linear as a ``Gemm`` without C.

    A correct folder folds both BN (the second gives the Gemm a C input).
    """
    g = GraphBuilder(seed)
    d = _Dynamo(g)
    gemm = {"beta": 1.0, "transB": 1, "alpha": 1.0, "transA": 0}
    inputs = ["x", g.weight("fc1.weight", (32, 16)), g.vector("fc1.bias", (32,))]
    h = d.unary("Relu", d.bn(g.op("Gemm", inputs, "linear", name="node_linear", **gemm), "bn1", 32), "relu")
    h = g.op("Gemm", [h, g.weight("fc2.weight", (8, 32))], "linear_1", name="node_linear_1", **gemm)
    out = d.bn(h, "bn2", 8)
    return g.model("main_graph", {"x": (4, 16)}, [out], opset=20, ir_version=10, producer=TORCH_DYNAMO)


def levit_linear_bn(seed: int) -> onnx.ModelProto:
    """LeViT's ``Linear_BN`` (``bn(linear(x).flatten(0, 1)).reshape_as(x)``, also EfficientFormer,
    EfficientViT) from ``torch.onnx.export(dynamo=True)`` with its default optimizer (torch 2.13):
    ``MatMul(x (B,N,C_in), W^T) -> Reshape(allowzero=1, [B*N, C]) -> BN -> Reshape([B, N, C])``.

    The optimizer folds every other BN but leaves these. The channel axis is the MatMul's last
    axis and the Reshape only merges B and N, so a correct folder folds both BN exactly into the
    MatMul weights (plus a bias). onnxruntime's MatMul+BN fusion folds the look-alike rank-3
    MatMul -> BN on axis 1 wrongly; this graph has the Reshape, which is what makes it right.
    """
    g = GraphBuilder(seed)
    b, n, c = 2, 5, 16
    g.weight("val_0", (8, c), fan_in=8)
    g.const("val_4", np.array([b * n, c], np.int64))
    g.const("val_17", np.array([b, n, c], np.int64))
    g.weight("val_18", (c, c), fan_in=c)
    h = g.op("MatMul", ["x", "val_0"], "linear", name="node_linear")
    h = g.op("Reshape", [h, "val_4"], "view", name="node_view", allowzero=1)
    d = _Dynamo(g)
    h = g.op("Reshape", [d.bn(h, "qkv.bn", c), "val_17"], "view_1", name="node_view_1", allowzero=1)
    h = g.op("HardSwish", [h], "hardswish", name="n0")
    h = g.op("MatMul", [h, "val_18"], "linear_1", name="node_linear_1")
    h = g.op("Reshape", [h, "val_4"], "view_2", name="node_view_2", allowzero=1)
    out = g.op("Reshape", [d.bn(h, "proj.bn", c), "val_17"], "view_3", name="node_view_3", allowzero=1)
    return g.model("main_graph", {"x": (b, n, 8)}, [out], opset=20, ir_version=10, producer=TORCH_DYNAMO)


def mixnet_concat_bn(seed: int) -> onnx.ModelProto:
    """timm MixNet's ``MixedConv2d`` -> BN from ``torch.onnx.export(dynamo=True)`` with its default
    optimizer (torch 2.13): ``Split(axis=1)`` -> depthwise Conv 3x3 / 5x5 / 7x7 (group = 4 each,
    bias-less) -> ``Concat(axis=1)`` -> BN -> SiLU (``Sigmoid`` and ``Mul``).

    The optimizer leaves this BN (mixnet_s keeps 4 such). Each conv output feeds only the Concat,
    so a correct folder splits BN's parameters per branch (channels 0-3, 4-7, 8-11) and folds each
    part into its conv exactly.
    """
    return _mixed_conv_bn(seed, shared_branch=False)


def trap_concat_branch_shared(seed: int) -> onnx.ModelProto:
    """Trap (PITFALLS 28): :func:`mixnet_concat_bn` where the 3x3 branch's output is also read by a
    ``GlobalAveragePool`` feeding a second graph output (``aux``, as when an intermediate feature is
    exported too). Splitting the BN into that conv would change ``aux``: a correct folder leaves
    the BN with a reason (or gives the folded use its own copy of the conv)."""
    return _mixed_conv_bn(seed, shared_branch=True)


def _mixed_conv_bn(seed: int, *, shared_branch: bool) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    g.const("val_0", np.array([4, 4, 4], np.int64))
    parts = [f"split_with_sizes_split_{i}" for i in range(3)]
    g.nodes.append(helper.make_node("Split", ["x", "val_0"], parts, name="node_Split_29", axis=1))
    convs = []
    for i, k in enumerate((3, 5, 7)):
        w = g.weight(f"conv_dw.{i}.weight", (4, 1, k, k))
        conv, attrs = g.fresh("conv2d"), conv_attrs(DYNAMO_CONV, k, pad=k // 2, group=4)
        convs.append(g.op("Conv", [parts[i], w], conv, name=f"node_Conv_{43 + i}", **attrs))
    cat = g.op("Concat", convs, "cat", name="node_cat", axis=1)
    h = _Dynamo(g, getitems=3).bn(cat, "bn1", 12)  # torch.split's outputs took getitem .. getitem_2
    sigmoid = g.op("Sigmoid", [h], "val_28", name="node_Sigmoid_28")
    outputs = [g.op("Mul", [h, sigmoid], "silu", name="node_silu")]
    if shared_branch:
        outputs.append(g.op("GlobalAveragePool", [convs[0]], "aux", name="node_GlobalAveragePool_46"))
    return g.model(
        "main_graph", {"x": (1, 12, 8, 8)}, outputs, opset=20, ir_version=10, producer=TORCH_DYNAMO
    )


def _legacy_bn(g: GraphBuilder, x: str, module: str, c: int, out: str) -> str:
    """A BatchNorm module as the TorchScript exporter writes it (node ``/<module>/BatchNormalization``)."""
    names = [f"{module}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return g.bn(x, out, names, c, name=f"/{module}/BatchNormalization", epsilon=1e-5, momentum=0.9)


def _legacy_linear(g: GraphBuilder, x: str, module: str, shape: tuple[int, int], out: str) -> str:
    """``nn.Linear`` as the TorchScript exporter writes it: ``Gemm(alpha=1, beta=1, transB=1)``."""
    inputs = [x, g.weight(f"{module}.weight", shape), g.vector(f"{module}.bias", shape[:1])]
    return g.op("Gemm", inputs, out, name=f"/{module}/Gemm", alpha=1.0, beta=1.0, transB=1)


def arcface_head(seed: int) -> onnx.ModelProto:
    """The head of insightface's iresnet (ArcFace) from the TorchScript exporter in eval mode
    (``torch.onnx.export(dynamo=False, opset_version=11)``, constant folding on; checked on torch
    2.13): the last block ends in ``Add`` (its convs carry their BN already, ``onnx::Conv_*``), then
    ``BN2d (bn2) -> Flatten -> Gemm (fc) -> BN1d (features)``. iresnet's ``Dropout(p=0)`` between
    bn2 and Flatten is gone in an eval export.

    A correct folder folds ``features`` backward into the Gemm and ``bn2`` forward through the
    Flatten into it (``W' = W·diag(s)`` with ``s`` repeated over the H·W positions,
    ``b' = b + W·t``): exact, a Gemm has no padding. Backward is impossible for bn2 (an Add).
    """
    g = GraphBuilder(seed)
    x = "input.1"

    def conv(y: str, name: str, w: str, b: str) -> str:
        inputs = [y, g.weight(w, (8, 8, 3, 3)), g.vector(b, (8,))]
        block = "/layer4/layer4.2"
        return g.op("Conv", inputs, f"{block}/{name}/Conv_output_0", name=f"{block}/{name}/Conv",
                    **conv_attrs(TORCHSCRIPT_CONV, 3, pad=1))  # fmt: skip

    y = conv(x, "conv1", "onnx::Conv_236", "onnx::Conv_237")
    slope = g.const("onnx::PRelu_241", g.rng.uniform(0.1, 0.4, (8, 1, 1)).astype(np.float32))
    y = g.op(
        "PRelu", [y, slope], "/layer4/layer4.2/prelu/PRelu_output_0", name="/layer4/layer4.2/prelu/PRelu"
    )
    y = conv(y, "conv2", "onnx::Conv_239", "onnx::Conv_240")
    y = g.op("Add", [y, x], "/layer4/layer4.2/Add_output_0", name="/layer4/layer4.2/Add")
    y = _legacy_bn(g, y, "bn2", 8, "/bn2/BatchNormalization_output_0")
    y = g.op("Flatten", [y], "/Flatten_output_0", name="/Flatten", axis=1)
    y = _legacy_linear(g, y, "fc", (32, 128), "/fc/Gemm_output_0")
    out = _legacy_bn(g, y, "features", 32, "683")
    return g.model("main_graph", {x: (1, 8, 4, 4)}, [out], opset=11, ir_version=6, producer=TORCH_LEGACY)


def tabular_bn_first(seed: int) -> onnx.ModelProto:
    """A tabular MLP that normalises its input, ``nn.Sequential(BatchNorm1d(16), Linear(16, 32),
    ReLU(), Linear(32, 1))``, from the TorchScript exporter (opset 17, BN kept):
    ``BatchNormalization -> Gemm(transB=1)`` on (N, F).

    A correct folder folds the BN forward into the Gemm exactly (``W' = W·diag(s)``,
    ``b' = b + W·t``); nothing precedes it to fold backward into.
    """
    g = GraphBuilder(seed)
    y = _legacy_bn(g, "input", "0", 16, "/0/BatchNormalization_output_0")
    y = g.op(
        "Relu", [_legacy_linear(g, y, "1", (32, 16), "/1/Gemm_output_0")], "/2/Relu_output_0", name="/2/Relu"
    )
    _legacy_linear(g, y, "3", (1, 32), "output")
    return g.model(
        "main_graph", {"input": (8, 16)}, ["output"], opset=17, ir_version=8, producer=TORCH_LEGACY
    )
