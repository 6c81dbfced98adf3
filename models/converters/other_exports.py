"""BN as paddle2onnx and MXNet's exporter write it, a bias-only Add after a layer, and the traps."""

from __future__ import annotations

import numpy as np
import onnx

from models.converters.graph import GraphBuilder, Shape, conv_attrs, tf_conv_attrs

PADDLE2ONNX = ("PaddlePaddle", "")


def paddle2onnx_identity_bn(seed: int) -> onnx.ModelProto:
    """paddle2onnx (opset 11): a layer's bias is a separate ``Add``, and an ``Identity`` (what
    paddle2onnx writes for a no-op such as ``scale(1, 0)`` or ``assign``) sits before BN:
    ``Conv -> Add (1,C,1,1) -> Identity -> BatchNormalization``, the same after a
    ``ConvTranspose``, and ``MatMul -> Add (C,) -> Identity -> BatchNormalization`` on (N, C).

    A correct folder looks through the Identity, absorbs the bias Add and folds all 3 BN exactly.
    """
    g = GraphBuilder(seed)
    bn_params = ("w_0", "b_0", "w_1", "w_2")

    def block(
        x: str, layer: str, op_type: str, w_shape: Shape, bias_shape: Shape, k: int, **attrs: object
    ) -> str:
        c = bias_shape[1] if len(bias_shape) == 4 else bias_shape[0]
        w = g.weight(
            f"{layer}.w_0", w_shape, fan_in=int(np.prod(w_shape)) // c if op_type == "MatMul" else None
        )
        y = g.op(op_type, [x, w], f"{layer}.tmp_0", name=f"p2o.{op_type}.{k}", **attrs)
        y = g.op("Add", [y, g.vector(f"{layer}.b_0", bias_shape)], f"{layer}.tmp_1", name=f"p2o.Add.{2 * k}")
        y = g.op("Identity", [y], f"p2o.Identity.{k}.out", name=f"p2o.Identity.{k}")
        return g.bn(
            y,
            f"batch_norm_{k}.tmp_2",
            [f"batch_norm2d_{k}.{p}" for p in bn_params],
            c,
            name=f"p2o.BatchNormalization.{k}",
            epsilon=1e-5,
            momentum=0.9,
        )

    x = block("x", "conv2d_0", "Conv", (8, 3, 3, 3), (1, 8, 1, 1), 0, **tf_conv_attrs(3, pad=1), group=1)
    x = g.op("Relu", [x], "relu_0.tmp_0", name="p2o.Relu.0")
    attrs = {"dilations": [1, 1], "group": 1, "kernel_shape": [2, 2], "pads": [0, 0, 0, 0], "strides": [2, 2]}
    x = block(x, "conv2d_transpose_0", "ConvTranspose", (8, 4, 2, 2), (1, 4, 1, 1), 1, **attrs)
    x = g.op("Relu", [x], "relu_1.tmp_0", name="p2o.Relu.1")
    x = g.op("ReduceMean", [x], "mean_0.tmp_0", name="p2o.ReduceMean.0", axes=[2, 3], keepdims=0)
    out = block(x, "linear_0", "MatMul", (4, 6), (6,), 2)
    return g.model(
        "Model from PaddlePaddle.", {"x": (1, 3, 8, 8)}, [out], opset=11, ir_version=6, producer=PADDLE2ONNX
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
    the unpadded 1x1 conv exactly.
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
        **tf_conv_attrs(7, pad=3, stride=2),
    )
    y = g.op("Relu", [bn(y, "bn0", 8)], "relu0", name="relu0")
    y = bn(y, "stage1_unit1_bn3", 8)
    g.op(
        "Conv",
        [y, g.weight("stage1_unit1_conv3_weight", (16, 8, 1, 1))],
        "stage1_unit1_conv3",
        name="stage1_unit1_conv3",
        **tf_conv_attrs(1, pad=0),
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
    return g.op("Conv", inputs, "conv_out", name="Conv_0", **conv_attrs(3, pad=1, group=group))


def _generic(g: GraphBuilder, input_shape: Shape, out: str) -> onnx.ModelProto:
    return g.model("main_graph", {"input": input_shape}, [out], opset=17, ir_version=8, producer=GENERIC)


def conv_bias_add(seed: int) -> onnx.ModelProto:
    """A bias-only ``Add`` after a bias-less layer: ``Conv -> Add (1,C,1,1)`` and ``Conv -> Add
    (C,1,1)`` (the shape exporters leave when a bias is a separate op: paddle2onnx's
    ``elementwise_add``, tf2onnx's ``BiasAdd`` when it is not fused, hand-built graphs).

    A correct folder absorbs both Adds into their Conv's bias exactly (creating it).
    """
    g = GraphBuilder(seed)
    y = g.op(
        "Add", [_conv(g, "input", 3, 8, bias=False), g.vector("bias_0", (1, 8, 1, 1))], "add_0", name="Add_0"
    )
    y = g.op("Relu", [y], "relu_0", name="Relu_0")
    w = g.weight("conv_1.weight", (8, 8, 3, 3))
    y = g.op("Conv", [y, w], "conv_1_out", name="Conv_1", **conv_attrs(3, pad=1))
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
