"""BN as paddle2onnx and MXNet's exporter write it, a bias-only Add after a layer, and the traps."""

from __future__ import annotations

import numpy as np
import onnx

from models.converters.graph import (
    DYNAMO_CONV,
    PADDLE_CONV,
    TORCHSCRIPT_CONV,
    GraphBuilder,
    Shape,
    conv_attrs,
)

PADDLE2ONNX = ("", "")


def paddle2onnx_identity_bn(seed: int) -> onnx.ModelProto:
    """``Conv2D -> BatchNorm2D``, ``Conv2DTranspose -> BatchNorm2D``, ``mean -> Dropout -> Linear ->
    BatchNorm1D`` through ``paddle.onnx.export`` (paddle 3.3 in PIR mode, paddle2onnx 2.1, opset
    11; its Polygraphy constant folding on): a layer's bias is a separate ``Add`` of a (1,C,1,1)
    constant (``reshape`` folded) or of the Linear's (C,) bias, and paddle2onnx writes an
    ``Identity`` after most ops (for the op's own output name, for ``auto.cast``, for Dropout):
    ``Conv -> Add -> Identity -> BatchNormalization``, ``ConvTranspose -> Identity -> Add ->
    Identity -> BatchNormalization``, ``MatMul -> Add (C,) -> Identity -> BatchNormalization``.

    A correct folder looks through the Identities, absorbs the bias Adds and folds all 3 BN exactly.
    """
    g = GraphBuilder(seed)

    def op(op_type: str, inputs: list[str], out: str, node: str, **attrs: object) -> str:
        return g.op(op_type, inputs, out, name=node, **attrs)

    def bn(x: str, prefix: str, k: int, c: int, out: str) -> str:
        names = [f"{prefix}.{v}" for v in ("w_0", "b_0", "w_1", "w_2")]
        return g.bn(x, out, names, c, name=f"BatchNormalization.{k}", epsilon=1e-5, momentum=0.9)

    y = op("Conv", ["x", g.weight("conv2d_0.w_0", (8, 3, 3, 3))], "p2o.pd_op.conv2d.0.0", "Conv.0",
           **conv_attrs(PADDLE_CONV, 3, pad=1))  # fmt: skip
    y = op("Add", [y, g.vector("p2o.pd_op.reshape.0.0", (1, 8, 1, 1))], "Add.1", "Add.0")
    y = op("Identity", [y], "p2o.pd_op.add.0.0", "Identity.1")
    y = op(
        "Relu", [bn(y, "batch_norm2d_0", 0, 8, "p2o.pd_op.batch_norm_.0.0")], "p2o.pd_op.relu.0.0", "Relu.0"
    )
    y = op("Identity", [y], "auto.cast.1", "Identity.2")
    w = g.weight("auto.cast.2", (8, 4, 2, 2), fan_in=8)
    y = op(
        "ConvTranspose", [y, w], "ConvTranspose.1", "ConvTranspose.0", **conv_attrs(PADDLE_CONV, 2, stride=2)
    )
    y = op("Identity", [y], "p2o.pd_op.conv2d_transpose.0.0", "Identity.4")
    y = op("Add", [y, g.vector("p2o.pd_op.reshape.1.0", (1, 4, 1, 1))], "Add.3", "Add.2")
    y = op("Identity", [y], "p2o.pd_op.add.1.0", "Identity.6")
    y = op(
        "Relu", [bn(y, "batch_norm2d_1", 1, 4, "p2o.pd_op.batch_norm_.1.0")], "p2o.pd_op.relu.1.0", "Relu.1"
    )
    y = op("ReduceMean", [y], "ReduceMean.1", "ReduceMean.0", axes=[2, 3], keepdims=0)
    y = op("Identity", [y], "p2o.pd_op.mean.0.0", "Identity.7")
    y = op("Identity", [y], "p2o.pd_op.dropout.0.0", "Identity.8")
    y = op("MatMul", [y, g.weight("linear_0.w_0", (4, 6), fan_in=4)], "p2o.pd_op.matmul.0.0", "MatMul.0")
    y = op("Add", [y, g.vector("linear_0.b_0", (6,))], "Add.5", "Add.4")
    y = op("Identity", [y], "p2o.pd_op.add.2.0", "Identity.9")
    out = bn(y, "batch_norm1d_0", 2, 6, "fetch_name_0")
    return g.model(
        "PaddlePaddle Graph in PIR mode",
        {"x": (1, 3, 8, 8)},
        [out],
        opset=11,
        ir_version=6,
        producer=PADDLE2ONNX,
    )


# --------------------------------------------------------------------------- BN before a layer


def mxnet_bn_data(seed: int) -> onnx.ModelProto:
    """MXNet model-zoo ResNet (and insightface's MXNet models) through ``mx.onnx.export_model``
    (opset 12): the input is normalised by ``bn_data`` straight into ``conv0`` (7x7, pads 3),
    then ``bn0`` after conv0, and a BN -> Relu -> unpadded 1x1 conv later in the stage.
    Here a BN (``stage1_unit1_bn3``) feeds a 1x1 conv directly.

    A trap and two folds: ``bn_data``'s shift must NOT be folded forward into the zero-padded
    conv0 (the padded border would get ``W·t`` it never saw; leave it with a reason; the scale
    alone is exact). ``bn0`` folds backward into conv0; ``stage1_unit1_bn3`` folds forward into
    the unpadded 1x1 conv exactly. Names follow MXNet's symbols; not checked against an export.
    """
    g = GraphBuilder(seed)

    def bn(x: str, name: str, c: int) -> str:
        names = [f"{name}_{p}" for p in ("gamma", "beta", "moving_mean", "moving_var")]
        return g.bn(x, name, names, c, name=name, epsilon=2e-5, momentum=0.9)

    y = bn("data", "bn_data", 3)
    y = g.op(
        "Conv",
        [y, g.weight("conv0_weight", (8, 3, 7, 7))],
        "conv0",
        name="conv0",
        **conv_attrs(TORCHSCRIPT_CONV, 7, pad=3, stride=2),
    )
    y = g.op("Relu", [bn(y, "bn0", 8)], "relu0", name="relu0")
    y = bn(y, "stage1_unit1_bn3", 8)
    g.op(
        "Conv",
        [y, g.weight("stage1_unit1_conv3_weight", (16, 8, 1, 1))],
        "stage1_unit1_conv3",
        name="stage1_unit1_conv3",
        **conv_attrs(TORCHSCRIPT_CONV, 1),
    )
    return g.model(
        "mxnet_converted_model",
        {"data": (1, 3, 16, 16)},
        ["stage1_unit1_conv3"],
        opset=12,
        ir_version=7,
        producer=("mxnet", ""),
    )


# --------------------------------------------------------------------------- layer -> bias Add, and traps

GENERIC = ("bnfold-models.converters", "")


def _conv(g: GraphBuilder, x: str, cin: int, cout: int, *, group: int = 1, bias: bool = True) -> str:
    inputs = [x, g.weight("conv.weight", (cout, cin // group, 3, 3))] + (
        [g.vector("conv.bias", (cout,))] if bias else []
    )
    return g.op("Conv", inputs, "conv_out", name="Conv_0", **conv_attrs(DYNAMO_CONV, 3, pad=1, group=group))


def _generic(g: GraphBuilder, input_shape: Shape, out: str) -> onnx.ModelProto:
    return g.model("main_graph", {"input": input_shape}, [out], opset=17, ir_version=8, producer=GENERIC)


def conv_bias_add(seed: int) -> onnx.ModelProto:
    """A bias-only ``Add`` after a bias-less layer, written by hand: ``Conv -> Add (1,C,1,1)`` (how
    paddle2onnx writes every conv bias, see ``paddle2onnx-identity-bn``, here with nothing after
    it) and ``Conv -> Add (C,1,1)`` (the other channel-only broadcast form).

    A correct folder absorbs both Adds into their Conv's bias exactly (creating it).
    """
    g = GraphBuilder(seed)
    y = g.op(
        "Add", [_conv(g, "input", 3, 8, bias=False), g.vector("bias_0", (1, 8, 1, 1))], "add_0", name="Add_0"
    )
    y = g.op("Relu", [y], "relu_0", name="Relu_0")
    w = g.weight("conv_1.weight", (8, 8, 3, 3))
    y = g.op("Conv", [y, w], "conv_1_out", name="Conv_1", **conv_attrs(DYNAMO_CONV, 3, pad=1))
    g.op("Add", [y, g.vector("bias_1", (8, 1, 1))], "output", name="Add_1")
    return _generic(g, (1, 3, 8, 8), "output")


def trap_mul_last_axis(seed: int) -> onnx.ModelProto:
    """Trap (PITFALLS 5): ``Conv -> Mul`` by a (C,) constant on the 4-D output, with W == C so it
    broadcasts. (C,) scales the LAST axis (width), not the channels: folding it as per-channel
    (as onnxslim's ConvMul does) is wrong. A correct folder leaves it."""
    g = GraphBuilder(seed)
    y = g.op("Mul", [_conv(g, "input", 3, 8), g.vector("scale", (8,))], "mul_out", name="Mul_0")
    g.op("Relu", [y], "output", name="Relu_0")
    return _generic(g, (1, 3, 8, 8), "output")


def trap_grouped_add_chw(seed: int) -> onnx.ModelProto:
    """Trap (PITFALLS 6): ``Conv(group=4) -> Add`` of a full (1,C,H,W) constant (a learned
    positional bias). Not per-channel: it cannot become the conv's bias. A correct folder leaves it."""
    g = GraphBuilder(seed)
    g.op(
        "Add", [_conv(g, "input", 8, 8, group=4), g.vector("pos_bias", (1, 8, 6, 6))], "output", name="Add_0"
    )
    return _generic(g, (1, 8, 6, 6), "output")


def trap_div_by_zero(seed: int) -> onnx.ModelProto:
    """Trap: ``Conv -> Div (1,C,1,1) -> Add (1,C,1,1)`` where one divisor is 0 (a dead channel's
    scale). Dividing by zero gives +-inf (or NaN) per element; ``W / 0`` in the weights gives a
    different result. A correct folder refuses the Div (and so the chain) with a reason."""
    g = GraphBuilder(seed)
    divisor = g.rng.uniform(0.5, 2.0, (1, 8, 1, 1)).astype(np.float32)
    divisor[0, 3, 0, 0] = 0.0
    y = g.op("Div", [_conv(g, "input", 3, 8), g.const("divisor", divisor)], "div_out", name="Div_0")
    g.op("Add", [y, g.vector("shift", (1, 8, 1, 1))], "output", name="Add_0")
    return _generic(g, (1, 3, 8, 8), "output")


def trap_reshape_merges_channel(seed: int) -> onnx.ModelProto:
    """Trap: ``Conv (1,8,4,4) -> Reshape (1, 32, 4) -> BatchNormalization(32)``. The Reshape merges
    the conv's channel axis with H, so BN's 32 channels are (c, h) pairs: no per-output-channel
    scale of the conv reproduces it. A correct folder leaves the BN with a reason."""
    g = GraphBuilder(seed)
    y = g.op(
        "Reshape",
        [_conv(g, "input", 3, 8), g.const("shape", np.array([1, 32, 4], np.int64))],
        "reshaped",
        name="Reshape_0",
    )
    g.bn(
        y,
        "output",
        ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
        32,
        name="BatchNormalization_0",
        epsilon=1e-5,
    )
    return _generic(g, (1, 3, 4, 4), "output")
