"""BN as tf2onnx writes it: keras 3's export (optimizers on), raw NHWC graphs (optimizers off), tf.keras 2."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from models.converters.graph import GraphBuilder, Shape, tf_conv_attrs

TF2ONNX = ("tf2onnx", "1.16.1 15c810")
NCHW_TO_NHWC = [0, 2, 3, 1]
NHWC_TO_NCHW = [0, 3, 1, 2]


class _Tf:
    """tf2onnx naming: TF op names for nodes, ``<op>:0`` for tensors, ``<op>__N`` for inserted nodes."""

    def __init__(self, g: GraphBuilder, scope: str) -> None:
        self.g = g
        self.scope = scope
        self.n = 6

    def op(self, op_type: str, inputs: Sequence[str], tf_name: str, **attrs: object) -> str:
        name = f"{self.scope}/{tf_name}"
        return self.g.op(op_type, inputs, f"{name}:0", name=name, **attrs)

    def transpose(self, x: str, perm: list[int], tf_name: str) -> str:
        """A Transpose tf2onnx inserts around an NCHW-only op (no optimizer to cancel it)."""
        name = f"{self.scope}/{tf_name}__{self.n}"
        self.n += 1
        return self.g.op("Transpose", [x], f"{name}:0", name=name, perm=perm)

    def const_fold(self, array: np.ndarray) -> str:
        """A constant tf2onnx's optimizer computed (``const_fold_opt__N``)."""
        name = f"const_fold_opt__{self.n}"
        self.n += 1
        return self.g.const(name, array.astype(np.float32))

    def fused_bn(self, x: str, layer: str, c: int, *, perms: tuple[list[int], list[int]], eps: float) -> str:
        """FusedBatchNormV3 on NHWC (NDHWC): Transpose -> BatchNormalization -> Transpose."""
        op = f"{layer}/FusedBatchNormV3"
        names = [f"{self.scope}/{layer}/{v}:0" for v in ("ReadVariableOp", "ReadVariableOp_1")]
        names += [f"{self.scope}/{op}/{v}:0" for v in ("ReadVariableOp", "ReadVariableOp_1")]
        t = self.transpose(x, perms[0], op)
        name = f"{self.scope}/{op}"
        y = self.g.bn(t, f"{name}__{self.n}:0", names, c, name=name, epsilon=eps)
        self.n += 1
        return self.transpose(y, perms[1], op)

    def keras2_bn(self, x: str, layer: str, c: int, eps: float = 1.001e-5) -> str:
        """tf.keras 2's BN after tf2onnx's optimizer: one BatchNormalization node, NCHW."""
        names = [f"{self.scope}/{layer}/{v}:0" for v in ("gamma", "beta", "moving_mean", "moving_variance")]
        name = f"{self.scope}/{layer}/FusedBatchNormV3"
        return self.g.bn(x, f"{name}:0", names, c, name=name, epsilon=eps)

    def keras_bn(self, x: str, layer: str, c: int, shape: Shape) -> str:
        """Keras 3's BatchNormalization in inference: ``x * mul + sub`` (``batchnorm/mul_1``, ``add_1``)."""
        a, b = self.g.affine(c, shape)
        y = self.op("Mul", [x, self.const_fold(a)], f"{layer}/batchnorm/mul_1")
        return self.op("Add", [y, self.const_fold(b)], f"{layer}/batchnorm/add_1")


def keras3_mobilenet(seed: int) -> onnx.ModelProto:
    """A MobileNet-style stem, one depthwise-separable block and a Dense -> BN head, as Keras 3's
    ``model.export(format="onnx")`` writes them (TensorFlow backend through tf2onnx, optimizers on,
    opset 15): the NHWC input is transposed once, and every BatchNormalization layer is
    ``Conv -> Mul (1,C,1,1) -> Add (1,C,1,1)`` (one after the depthwise Conv, ``group=C``);
    Dense is ``MatMul + Add (C,)`` and its BN ``Mul (C,) -> Add (C,)`` on a rank-2 tensor, where
    (C,) does broadcast along the channel (last) axis.

    A correct folder folds all 4 Mul/Add pairs into the preceding Conv/MatMul (bias created or
    updated) exactly and reports each; ``check`` must not call this model clean.
    """
    g = GraphBuilder(seed)
    t = _Tf(g, "functional_1")
    x = t.transpose("keras_tensor", NHWC_TO_NCHW, "conv1/convolution")
    clip = (
        g.const("const_fold_opt__0", np.array(0.0, np.float32)),
        g.const("const_fold_opt__1", np.array(6.0, np.float32)),
    )
    for layer, cin, cout, k, group in (
        ("conv1", 3, 8, 3, 1),
        ("conv_dw_1", 8, 8, 3, 8),
        ("conv_pw_1", 8, 16, 1, 1),
    ):
        w = g.weight(f"{t.scope}/{layer}/convolution/ReadVariableOp:0", (cout, cin // group, k, k))
        attrs = tf_conv_attrs(k, pad=k // 2, stride=2 if layer == "conv1" else 1, group=group)
        x = t.op("Conv", [x, w], f"{layer}/convolution", **attrs)
        x = t.keras_bn(
            x, layer.replace("conv", "bn") if layer != "conv1" else "conv1_bn", cout, (1, cout, 1, 1)
        )
        x = t.op("Clip", [x, *clip], f"{layer}_relu/Relu6")
    x = t.op("ReduceMean", [x], "global_average_pooling2d_1/Mean", axes=[2, 3], keepdims=0)
    w = g.weight(f"{t.scope}/dense_1/Cast/ReadVariableOp:0", (16, 10), fan_in=16)
    x = t.op("MatMul", [x, w], "dense_1/MatMul")
    x = t.op("Add", [x, g.vector(f"{t.scope}/dense_1/Add/ReadVariableOp:0", (10,))], "dense_1/Add")
    x = t.keras_bn(x, "batch_normalization_1", 10, (10,))
    g.nodes.append(helper.make_node("Identity", [x], ["output_0"], name="Identity"))
    return g.model(
        "tf2onnx", {"keras_tensor": (1, 16, 16, 3)}, ["output_0"], opset=15, ir_version=8, producer=TF2ONNX
    )


def tf2onnx_raw_nhwc(seed: int) -> onnx.ModelProto:
    """tf2onnx without its optimizer (``--opset 13``, optimizers off; NHWC converters generally):
    every NCHW-only op is wrapped in Transposes that nothing cancels, so BN reads
    ``Conv -> Transpose(0,2,3,1) -> Add (C,) [BiasAdd] -> Transpose(0,3,1,2) -> BatchNormalization``
    (a Conv with bias), ``Conv -> Transpose -> Transpose -> BN`` (bias-less), and the same after a
    ConvTranspose (Conv2DTranspose with bias). The (C,) BiasAdd is on an NHWC tensor: per channel.

    A correct folder composes the permutations (identity), absorbs the bias Adds and folds all 3
    BN exactly into the Conv/ConvTranspose; onnxslim, onnxsim and onnxruntime fold them too.
    """
    g = GraphBuilder(seed)
    t = _Tf(g, "model")
    perms = (NHWC_TO_NCHW, NCHW_TO_NHWC)
    x = "input_1:0"
    for i, (layer, cin, cout, bias) in enumerate((("conv2d", 3, 8, True), ("conv2d_1", 8, 8, False))):
        w = g.weight(f"model/{layer}/Conv2D/ReadVariableOp:0", (cout, cin, 3, 3))
        x = t.transpose(x, NHWC_TO_NCHW, f"{layer}/Conv2D")
        x = t.transpose(
            t.op("Conv", [x, w], f"{layer}/Conv2D", **tf_conv_attrs(3, pad=1)),
            NCHW_TO_NHWC,
            f"{layer}/Conv2D",
        )
        if bias:
            x = t.op(
                "Add", [x, g.vector(f"model/{layer}/BiasAdd/ReadVariableOp:0", (cout,))], f"{layer}/BiasAdd"
            )
        bn = "batch_normalization" if i == 0 else f"batch_normalization_{i}"
        x = t.op("Relu", [t.fused_bn(x, bn, cout, perms=perms, eps=1e-3)], f"re_lu_{i}/Relu")
    w = g.weight("model/conv2d_transpose/conv2d_transpose/ReadVariableOp:0", (8, 4, 2, 2), fan_in=8)
    x = t.transpose(x, NHWC_TO_NCHW, "conv2d_transpose/conv2d_transpose")
    attrs = {"dilations": [1, 1], "kernel_shape": [2, 2], "pads": [0, 0, 0, 0], "strides": [2, 2]}
    x = t.op("ConvTranspose", [x, w], "conv2d_transpose/conv2d_transpose", **attrs)
    x = t.transpose(x, NCHW_TO_NHWC, "conv2d_transpose/conv2d_transpose")
    x = t.op(
        "Add",
        [x, g.vector("model/conv2d_transpose/BiasAdd/ReadVariableOp:0", (4,))],
        "conv2d_transpose/BiasAdd",
    )
    x = t.op("Relu", [t.fused_bn(x, "batch_normalization_2", 4, perms=perms, eps=1e-3)], "re_lu_2/Relu")
    g.nodes.append(helper.make_node("Identity", [x], ["Identity:0"], name="Identity"))
    return g.model(
        "tf2onnx", {"input_1:0": (1, 8, 8, 3)}, ["Identity:0"], opset=13, ir_version=7, producer=TF2ONNX
    )


def tf2onnx_raw_conv3d(seed: int) -> onnx.ModelProto:
    """tf2onnx without its optimizer on a Conv3D (NDHWC): ``Transpose(0,4,1,2,3) -> Conv (3-D) ->
    Transpose(0,2,3,4,1) -> Transpose(0,4,1,2,3) -> BatchNormalization -> Transpose(0,2,3,4,1)``.

    A correct folder composes the 5-D permutations and folds the BN into the 3-D Conv exactly.
    """
    g = GraphBuilder(seed)
    t = _Tf(g, "model")
    to_ncdhw, to_ndhwc = [0, 4, 1, 2, 3], [0, 2, 3, 4, 1]
    w = g.weight("model/conv3d/Conv3D/ReadVariableOp:0", (4, 2, 3, 3, 3))
    x = t.transpose("input_1:0", to_ncdhw, "conv3d/Conv3D")
    x = t.transpose(
        t.op("Conv", [x, w], "conv3d/Conv3D", **tf_conv_attrs(3, pad=1, rank=3)), to_ndhwc, "conv3d/Conv3D"
    )
    x = t.op(
        "Relu", [t.fused_bn(x, "batch_normalization", 4, perms=(to_ncdhw, to_ndhwc), eps=1e-3)], "re_lu/Relu"
    )
    g.nodes.append(helper.make_node("Identity", [x], ["Identity:0"], name="Identity"))
    return g.model(
        "tf2onnx", {"input_1:0": (1, 4, 6, 6, 2)}, ["Identity:0"], opset=13, ir_version=7, producer=TF2ONNX
    )


def resnetv2_preact(seed: int) -> onnx.ModelProto:
    """Pre-activation blocks of tf.keras 2's ResNet50V2 through tf2onnx (optimizers on, opset 15;
    FusedBatchNormV3 stays BatchNormalization, eps 1.001e-5): ``MaxPool -> BN (preact)``,
    ``Add(shortcut, conv) -> BN (next preact)`` where the Add's output also feeds the next
    block's identity-shortcut Add, and ``Add -> BN (post_bn)``.

    A correct folder folds the 2 BN after a bias-less 1x1 Conv and leaves the 3 others with
    ``unsupported-producer`` (MaxPool, Add, Add): an Add of two activations cannot absorb an
    affine map, whatever else reads it (not ``producer-output-shared``). No forward fold: a Relu
    stands between each preact BN and the next conv.
    """
    g = GraphBuilder(seed)
    t = _Tf(g, "resnet50v2")
    x = t.transpose("input_1", NHWC_TO_NCHW, "conv1_conv/Conv2D")
    w = g.weight("resnet50v2/conv1_conv/Conv2D/ReadVariableOp:0", (8, 3, 3, 3))
    x = t.op(
        "Conv",
        [x, w, g.vector("resnet50v2/conv1_conv/BiasAdd/ReadVariableOp:0", (8,))],
        "conv1_conv/BiasAdd",
        **tf_conv_attrs(3, pad=1),
    )
    x = t.op("MaxPool", [x], "pool1_pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    for block in (1, 2):
        p = f"conv2_block{block}"
        pre = t.op("Relu", [t.keras2_bn(x, f"{p}_preact_bn", 8)], f"{p}_preact_relu/Relu")
        shortcut = x
        if block == 1:
            w = g.weight(f"resnet50v2/{p}_0_conv/Conv2D/ReadVariableOp:0", (8, 8, 1, 1))
            shortcut = t.op(
                "Conv",
                [pre, w, g.vector(f"resnet50v2/{p}_0_conv/BiasAdd/ReadVariableOp:0", (8,))],
                f"{p}_0_conv/BiasAdd",
                **tf_conv_attrs(1, pad=0),
            )
        w = g.weight(f"resnet50v2/{p}_1_conv/Conv2D/ReadVariableOp:0", (8, 8, 1, 1))
        y = t.op("Conv", [pre, w], f"{p}_1_conv/Conv2D", **tf_conv_attrs(1, pad=0))
        y = t.op("Relu", [t.keras2_bn(y, f"{p}_1_bn", 8)], f"{p}_1_relu/Relu")
        w = g.weight(f"resnet50v2/{p}_3_conv/Conv2D/ReadVariableOp:0", (8, 8, 3, 3))
        y = t.op(
            "Conv",
            [y, w, g.vector(f"resnet50v2/{p}_3_conv/BiasAdd/ReadVariableOp:0", (8,))],
            f"{p}_3_conv/BiasAdd",
            **tf_conv_attrs(3, pad=1),
        )
        x = t.op("Add", [shortcut, y], f"{p}_out/add")
    x = t.op("Relu", [t.keras2_bn(x, "post_bn", 8)], "post_relu/Relu")
    g.nodes.append(
        helper.make_node(
            "Transpose", [x], ["post_relu"], name="resnet50v2/post_relu/Relu__20", perm=NCHW_TO_NHWC
        )
    )
    return g.model(
        "tf2onnx", {"input_1": (1, 8, 8, 3)}, ["post_relu"], opset=15, ir_version=8, producer=TF2ONNX
    )
