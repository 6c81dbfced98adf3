"""BN as tf2onnx writes it: keras 3's ``model.export(format="onnx")``, tf2onnx with its optimizers
off (NHWC Transposes left in place), and tf.keras 2 models through tf2onnx.

Every form here was checked against a real conversion (tensorflow-cpu 2.21, keras 3.15, tf_keras
2.21, tf2onnx 1.17.0): the same ops in the same order, attributes, constant shapes and names.
What tf2onnx does to BN before we see it matters: TensorFlow's grappler and tf2onnx's optimizer
already merge a BN's scale into a regular Conv's weights (``merged_input``, ``weights_fused_bn``),
so what reaches ONNX is the rest: the scale after a depthwise conv or a Dense layer, the shift as
a bias Add when the optimizers are off, and BN that follows no layer.
"""

from __future__ import annotations

import numpy as np
import onnx

from models.converters.graph import (
    TF2ONNX_CONV,
    TF2ONNX_CONV_UNPADDED,
    GraphBuilder,
    conv_attrs,
)

TF2ONNX = ("tf2onnx", "1.17.0 None")
ML = (("ai.onnx.ml", 2),)
NCHW_TO_NHWC = [0, 2, 3, 1]
NHWC_TO_NCHW = [0, 3, 1, 2]
HWIO_TO_OIHW = [3, 2, 0, 1]
SAME_STRIDE_2 = [0, 0, 1, 1]
"""TensorFlow's ``padding="same"`` with stride 2 on an even size pads only at the end."""


def _scalar(g: GraphBuilder, name: str, value: float) -> str:
    return g.const(name, np.array(value, np.float32))


def _keras_bn(g: GraphBuilder, c: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Keras' BatchNormalization (eps 1e-3) in inference: ``x * mul + sub``."""
    return g.affine(c, shape, eps=1e-3)


def keras3_mobilenet(seed: int) -> onnx.ModelProto:
    """A MobileNet stem, two depthwise-separable blocks and a Dense -> BatchNormalization head, as
    keras 3's ``model.export(format="onnx")`` writes them (TensorFlow backend, tf2onnx with its
    optimizers, opset 15, batch dimension ``unk__66``).

    The regular convs arrive with their BN merged (``Conv__36``: ``merged_input`` weights, bias
    ``batchnorm/sub``). What is left is BN as ``Mul (1,C,1,1) -> Add (1,C,1,1)`` after each
    depthwise Conv (``group=C``; the real MobileNetV2 export has 17 of these) and ``MatMul -> Mul
    (10,) -> Add (10,)`` after the Dense (its bias folded into the Add). A correct folder folds
    all 3 Mul/Add pairs into the layer before them exactly; ``check`` must not call it clean.
    """
    g = GraphBuilder(seed)
    p = "functional_1"
    relu6 = (
        _scalar(g, f"{p}/conv1_relu_1/Relu6_min__10", 0.0),
        _scalar(g, f"{p}/conv_dw_1_relu_1/Relu6_max__20", 6.0),
    )

    def merged_conv(
        x: str, layer: str, bn: str, cin: int, cout: int, k: int, node: str, **attrs: object
    ) -> str:
        w = g.weight(f"{p}/{layer}_1/convolution/merged_input:0", (cout, cin, k, k))
        b = g.vector(f"{p}/{bn}_1/batchnorm/sub:0", (cout,))
        return g.op("Conv", [x, w, b], f"{node}:0", name=node, **attrs)

    def depthwise_bn(x: str, layer: str, c: int, fold: tuple[int, int], **attrs: object) -> str:
        w = g.weight(f"const_fold_opt__{fold[0]}", (c, 1, 3, 3))
        y = g.op("Conv", [x, w], f"{p}/{layer}_1/depthwise:0", name=f"{p}/{layer}_1/depthwise", **attrs)
        mul, add = _keras_bn(g, c, (1, c, 1, 1))
        bn = f"{p}/{layer}_bn_1/batchnorm"
        y = g.op("Mul", [y, g.const(f"{bn}/mul:0", mul)], f"{bn}/mul_1:0", name=f"{bn}/mul_1")
        return g.op(
            "Add", [y, g.const(f"const_fold_opt__{fold[1]}", add)], f"{bn}/add_1:0", name=f"{bn}/add_1"
        )

    def clip(x: str, layer: str) -> str:
        return g.op("Clip", [x, *relu6], f"{p}/{layer}_relu_1/Relu6:0", name=f"{p}/{layer}_relu_1/Relu6")

    x = g.op("Transpose", ["keras_tensor"], f"{p}/conv1_bn_1/batchnorm/mul_1__6:0",
             name=f"{p}/conv1_bn_1/batchnorm/mul_1__6", perm=NHWC_TO_NCHW)  # fmt: skip
    x = merged_conv(x, "conv1", "conv1_bn", 3, 8, 3, "Conv__36",
                    **conv_attrs(TF2ONNX_CONV, 3, pads=SAME_STRIDE_2, stride=2))  # fmt: skip
    x = clip(x, "conv1")
    x = clip(
        depthwise_bn(x, "conv_dw_1", 8, (63, 61), **conv_attrs(TF2ONNX_CONV, 3, pad=1, group=8)), "conv_dw_1"
    )
    x = clip(
        merged_conv(
            x, "conv_pw_1", "conv_pw_1_bn", 8, 16, 1, "Conv__46", **conv_attrs(TF2ONNX_CONV_UNPADDED, 1)
        ),
        "conv_pw_1",
    )
    attrs = conv_attrs(
        ("dilations", "strides", "kernel_shape", "group", "pads"), 3, pads=SAME_STRIDE_2, stride=2, group=16
    )
    x = clip(depthwise_bn(x, "conv_dw_2", 16, (60, 62), **attrs), "conv_dw_2")
    gap = f"{p}/global_average_pooling2d_1/Mean"
    x = g.op("GlobalAveragePool", [x], f"{gap}:0", name=gap)
    axes = g.const("const_axes__64", np.array([2, 3], np.int64))
    x = g.op("Squeeze", [x, axes], f"{gap}_Squeeze__65:0", name=f"{gap}_Squeeze__65")
    w = g.weight(f"{p}/dense_1/Cast/ReadVariableOp:0", (16, 10), fan_in=16)
    x = g.op("MatMul", [x, w], f"{p}/dense_1/MatMul:0", name=f"{p}/dense_1/MatMul")
    mul, add = _keras_bn(g, 10, (10,))
    bn = f"{p}/bn_head_1/batchnorm"
    x = g.op("Mul", [x, g.const(f"{bn}/mul:0", mul)], f"{bn}/mul_1:0", name=f"{bn}/mul_1")
    g.op("Add", [x, g.const(f"{bn}/sub:0", add)], "Identity:0", name=f"{bn}/add_1")
    inputs = {"keras_tensor": ("unk__66", 16, 16, 3)}
    return g.model("tf2onnx", inputs, ["Identity:0"], opset=15, ir_version=8, producer=TF2ONNX, domains=ML)


def keras3_tf2onnx_raw(seed: int) -> onnx.ModelProto:
    """The same keras 3 model through tf2onnx with its optimizers off (``tf2onnx.convert`` of the
    model function, opset 13): grappler has merged each regular conv's BN scale into its weights,
    and the shift is a bias Add on the NHWC tensor: ``Conv -> Transpose(0,2,3,1) -> Add (C,)``.
    After each depthwise conv (weights computed as ``Transpose(Reshape(W_hwcm))``) the BN is
    ``Transpose(0,2,3,1) -> Mul (C,) -> Add (C,)``; the Dense head is ``MatMul -> Mul -> Add``.

    (C,) on NHWC broadcasts along the channel axis. A correct folder tracks the axis through the
    Transposes and absorbs the 2 bias Adds and the 3 Mul/Add chains exactly.
    """
    g = GraphBuilder(seed)
    p = "functional_1"
    n = iter(range(6, 100))

    def transpose(x: str, perm: list[int], stem: str) -> str:
        name = f"{stem}__{next(n)}"
        return g.op("Transpose", [x], f"{name}:0", name=name, perm=perm)

    def clip(x: str, layer: str) -> str:
        lo = _scalar(g, f"{p}/{layer}_relu_1/Relu6_min__{next(n)}", 0.0)
        hi = _scalar(g, f"{p}/{layer}_relu_1/Relu6_max__{next(n)}", 6.0)
        return g.op("Clip", [x, lo, hi], f"{p}/{layer}_relu_1/Relu6:0", name=f"{p}/{layer}_relu_1/Relu6")

    def conv_shift(x: str, layer: str, cin: int, cout: int, k: int, **attrs: object) -> str:
        bn = f"{p}/{layer}_bn_1/batchnorm"
        x = transpose(x, NHWC_TO_NCHW, f"{bn}/mul_1")
        w = g.weight(f"{p}/{layer}_1/convolution/merged_input:0", (cout, cin, k, k))
        x = transpose(
            g.op("Conv", [x, w], f"{bn}/mul_1:0", name=f"{bn}/mul_1", **attrs), NCHW_TO_NHWC, f"{bn}/mul_1"
        )
        return clip(
            g.op("Add", [x, g.vector(f"{bn}/sub:0", (cout,))], f"{bn}/add_1:0", name=f"{bn}/add_1"), layer
        )

    def depthwise(x: str, layer: str, c: int, **attrs: object) -> str:
        dw = f"{p}/{layer}_1/depthwise"
        x = transpose(x, NHWC_TO_NCHW, dw)
        shape = g.const(f"{dw}__{next(n)}", np.array([3, 3, 1, c], np.int64))
        kernel = g.weight(f"{dw}/ReadVariableOp:0", (3, 3, c, 1), fan_in=9)
        reshape = f"Reshape__{next(n)}"
        w = transpose(g.op("Reshape", [kernel, shape], f"{reshape}:0", name=reshape), HWIO_TO_OIHW, dw)
        x = transpose(g.op("Conv", [x, w], f"{dw}:0", name=dw, **attrs), NCHW_TO_NHWC, dw)
        return clip(_mul_add(g, x, f"{p}/{layer}_bn_1/batchnorm", c), layer)

    x = conv_shift("input_1", "conv1", 3, 8, 3, **conv_attrs(TF2ONNX_CONV, 3, pads=SAME_STRIDE_2, stride=2))
    x = depthwise(x, "conv_dw_1", 8, **conv_attrs(TF2ONNX_CONV, 3, pad=1, group=8))
    x = conv_shift(x, "conv_pw_1", 8, 16, 1, **conv_attrs(TF2ONNX_CONV_UNPADDED, 1))
    x = depthwise(x, "conv_dw_2", 16, **conv_attrs(TF2ONNX_CONV, 3, pads=SAME_STRIDE_2, stride=2, group=16))
    gap = f"{p}/global_average_pooling2d_1/Mean"
    x = g.op("ReduceMean", [x], f"{gap}:0", name=gap, axes=[1, 2], keepdims=0)
    w = g.weight(f"{p}/dense_1/Cast/ReadVariableOp:0", (16, 10), fan_in=16)
    x = _mul_add(
        g,
        g.op("MatMul", [x, w], f"{p}/dense_1/MatMul:0", name=f"{p}/dense_1/MatMul"),
        f"{p}/bn_head_1/batchnorm",
        10,
    )
    return _identity_outputs(g, [x], {"input_1": (1, 16, 16, 3)}, 4)


def _mul_add(g: GraphBuilder, x: str, bn: str, c: int) -> str:
    """Keras' BN as tf2onnx writes it without its optimizer: ``Mul (C,) -> Add (C,)``."""
    mul, add = _keras_bn(g, c, (c,))
    x = g.op("Mul", [x, g.const(f"{bn}/mul:0", mul)], f"{bn}/mul_1:0", name=f"{bn}/mul_1")
    return g.op("Add", [x, g.const(f"{bn}/sub:0", add)], f"{bn}/add_1:0", name=f"{bn}/add_1")


def _identity_outputs(
    g: GraphBuilder, xs: list[str], inputs: dict[str, tuple[int, ...]], n: int
) -> onnx.ModelProto:
    """tf2onnx's output tail without its optimizer: ``Identity -> Identity`` per graph output, opset 13."""
    outputs = []
    for i, x in enumerate(xs):
        out = "Identity" if i == 0 else f"Identity_{i}"
        raw = g.op("Identity", [x], f"{out}_raw_output___{n + 2 * i}:0", name=out)
        outputs.append(
            g.op("Identity", [raw], f"{out}:0", name=f"{out}_graph_outputs_Identity__{n + 2 * i + 1}")
        )
    return g.model("tf2onnx", inputs, outputs, opset=13, ir_version=7, producer=TF2ONNX, domains=ML)


def _fused_bn(g: GraphBuilder, x: str, k: int, n: int, c: int, perms: tuple[list[int], list[int]]) -> str:
    """``FusedBatchNormV3`` (eps 1e-3) on a channels-last tensor: Transpose -> BN -> Transpose."""
    op = "FusedBatchNormV3" if k == 0 else f"FusedBatchNormV3_{k}"
    names = (
        [f"{op}/{v}:0" for v in ("scale", "offset", "mean", "variance")]
        if k == 3  # a raw_ops.FusedBatchNormV3 call names its constants after itself
        else [
            f"scale{'' if k == 0 else f'_{k}'}:0",
            f"offset{'' if k == 0 else f'_{k}'}:0",
            f"{op}/mean:0",
            f"{op}/variance:0",
        ]
    )
    x = g.op("Transpose", [x], f"{op}__{n}:0", name=f"{op}__{n}", perm=perms[0])
    x = g.bn(x, f"{op}:0", names, c, name=op, epsilon=1e-3)
    return g.op("Transpose", [x], f"{op}__{n + 1}:0", name=f"{op}__{n + 1}", perm=perms[1])


def tf2onnx_raw_nhwc(seed: int) -> onnx.ModelProto:
    """``tf.nn.conv2d + bias_add``, ``conv2d``, ``conv2d_transpose + bias_add``, each followed by
    ``FusedBatchNormV3`` and ReLU, through tf2onnx with its optimizers off (opset 13): the weights
    are ``Transpose(W_hwio, perm=[3,2,0,1])`` nodes, BiasAdd is the Conv's third input, and every
    BN is ``Conv -> Transpose(0,2,3,1) -> Transpose(0,3,1,2) -> BatchNormalization ->
    Transpose(0,2,3,1)`` (the same after the ConvTranspose).

    A correct folder composes the permutations (the identity), treats the transposed initializers
    as constant weights and folds all 3 BN exactly.
    """
    g = GraphBuilder(seed)
    perms = (NHWC_TO_NCHW, NCHW_TO_NHWC)
    w1 = g.weight("Conv2D/filter:0", (3, 3, 3, 8), fan_in=27)
    b1 = g.vector("BiasAdd/bias:0", (8,))
    w2 = g.weight("Conv2D_1/filter:0", (3, 3, 8, 8), fan_in=72)
    wt = g.weight("conv2d_transpose/filter:0", (2, 2, 4, 8), fan_in=8)
    bt = g.vector("BiasAdd_1/bias:0", (4,))
    w2 = g.op("Transpose", [w2], "Conv2D_1__41:0", name="Conv2D_1__41", perm=HWIO_TO_OIHW)
    w1 = g.op("Transpose", [w1], "BiasAdd__36:0", name="BiasAdd__36", perm=HWIO_TO_OIHW)
    x = g.op("Transpose", ["input_1"], "BiasAdd__35:0", name="BiasAdd__35", perm=NHWC_TO_NCHW)
    wt = g.op("Transpose", [wt], "BiasAdd_1__46:0", name="BiasAdd_1__46", perm=HWIO_TO_OIHW)
    x = g.op("Conv", [x, w1, b1], "BiasAdd:0", name="BiasAdd", **conv_attrs(TF2ONNX_CONV, 3, pad=1))
    x = g.op("Transpose", [x], "BiasAdd__37:0", name="BiasAdd__37", perm=NCHW_TO_NHWC)
    x = g.op("Relu", [_fused_bn(g, x, 0, 38, 8, perms)], "Relu:0", name="Relu")
    x = g.op("Transpose", [x], "Conv2D_1__40:0", name="Conv2D_1__40", perm=NHWC_TO_NCHW)
    x = g.op("Conv", [x, w2], "Conv2D_1:0", name="Conv2D_1", **conv_attrs(TF2ONNX_CONV, 3, pad=1))
    x = g.op("Transpose", [x], "Conv2D_1__42:0", name="Conv2D_1__42", perm=NCHW_TO_NHWC)
    x = g.op("Relu", [_fused_bn(g, x, 1, 43, 8, perms)], "Relu_1:0", name="Relu_1")
    x = g.op("Transpose", [x], "BiasAdd_1__45:0", name="BiasAdd_1__45", perm=NHWC_TO_NCHW)
    attrs = conv_attrs(("dilations", "strides", "kernel_shape", "pads", "auto_pad"), 2, stride=2)
    x = g.op("ConvTranspose", [x, wt, bt], "BiasAdd_1:0", name="BiasAdd_1", **attrs)
    x = g.op("Transpose", [x], "BiasAdd_1__47:0", name="BiasAdd_1__47", perm=NCHW_TO_NHWC)
    x = g.op("Relu", [_fused_bn(g, x, 2, 48, 4, perms)], "Relu_2:0", name="Relu_2")
    return _identity_outputs(g, [x], {"input_1": (1, 8, 8, 3)}, 26)


def tf2onnx_raw_conv3d(seed: int) -> onnx.ModelProto:
    """``tf.nn.conv3d`` -> ``FusedBatchNormV3`` (NDHWC) through tf2onnx with its optimizers off:
    ``Transpose(0,4,1,2,3) -> Conv (3-D, weights Transpose(W, [4,3,0,1,2])) -> Transpose(0,2,3,4,1)
    -> Transpose(0,4,1,2,3) -> BatchNormalization -> Transpose(0,2,3,4,1)``.

    A correct folder composes the 5-D permutations and folds the BN into the 3-D Conv exactly.
    """
    g = GraphBuilder(seed)
    to_ncdhw, to_ndhwc = [0, 4, 1, 2, 3], [0, 2, 3, 4, 1]
    x = g.op("Transpose", ["input_1"], "Conv3D__30:0", name="Conv3D__30", perm=to_ncdhw)
    w = g.weight("Conv3D/filter:0", (3, 3, 3, 2, 4), fan_in=54)
    w = g.op("Transpose", [w], "Conv3D__31:0", name="Conv3D__31", perm=[4, 3, 0, 1, 2])
    x = g.op("Conv", [x, w], "Conv3D:0", name="Conv3D", **conv_attrs(TF2ONNX_CONV, 3, pad=1, rank=3))
    x = g.op("Transpose", [x], "Conv3D__32:0", name="Conv3D__32", perm=to_ndhwc)
    x = g.op("Relu", [_fused_bn(g, x, 3, 33, 4, (to_ncdhw, to_ndhwc))], "Relu_3:0", name="Relu_3")
    return _identity_outputs(g, [x], {"input_1": (1, 4, 6, 6, 2)}, 28)


def resnetv2_preact(seed: int) -> onnx.ModelProto:
    """Two pre-activation blocks of tf.keras 2's ResNet50V2 through tf2onnx (``from_keras``,
    optimizers on, opset 15). tf2onnx folds each BN that follows a conv (``Conv2D_weights_fused_bn``);
    the BN left read ``MaxPool`` (block 1's preact), the Add of two activations whose output also
    feeds the next block's identity-shortcut Add (block 2's preact), and the last Add (``post_bn``).
    A real ResNet50V2 keeps 17 such BN.

    A correct folder folds none of the 3 and says ``unsupported-producer`` for each (MaxPool, Add,
    Add), never ``producer-output-shared``. No forward fold either: a Relu follows each BN.
    """
    g = GraphBuilder(seed)
    p = "resnet50v2"

    def conv(x: str, layer: str, cin: int, cout: int, k: int, *, fused_bn: bool = False) -> str:
        attrs = conv_attrs(TF2ONNX_CONV if k > 1 else TF2ONNX_CONV_UNPADDED, k, pad=k // 2)
        if fused_bn:
            w = g.weight(f"{p}/{layer}/Conv2D_weights_fused_bn", (cout, cin, k, k))
            b = g.vector(f"{p}/{layer}/Conv2D_bias_fused_bn", (cout,))
            out = f"{p}/{layer.removesuffix('_conv')}_bn/FusedBatchNormV3:0"
            return g.op("Conv", [x, w, b], out, name=f"{p}/{layer}/Conv2D", **attrs)
        w = g.weight(f"{p}/{layer}/Conv2D/ReadVariableOp:0", (cout, cin, k, k))
        b = g.vector(f"{p}/{layer}/BiasAdd/ReadVariableOp:0", (cout,))
        return g.op("Conv", [x, w, b], f"{p}/{layer}/BiasAdd:0", name=f"{p}/{layer}/BiasAdd", **attrs)

    def bn_relu(x: str, layer: str, relu: str) -> str:
        names = [f"{p}/{layer}/ReadVariableOp:0", f"{p}/{layer}/ReadVariableOp_1:0"]
        names += [
            f"{p}/{layer}/FusedBatchNormV3/ReadVariableOp:0",
            f"{p}/{layer}/FusedBatchNormV3/ReadVariableOp_1:0",
        ]
        x = g.bn(
            x,
            f"{p}/{layer}/FusedBatchNormV3:0",
            names,
            8,
            name=f"{p}/{layer}/FusedBatchNormV3",
            epsilon=1.001e-5,
        )
        return g.op("Relu", [x], f"{p}/{relu}/Relu:0", name=f"{p}/{relu}/Relu")

    x = g.op(
        "Transpose",
        ["input_1"],
        f"{p}/conv1_conv/BiasAdd__6:0",
        name=f"{p}/conv1_conv/BiasAdd__6",
        perm=NHWC_TO_NCHW,
    )
    x = conv(x, "conv1_conv", 3, 8, 3)
    x = g.op(
        "MaxPool",
        [x],
        f"{p}/pool1_pool/MaxPool:0",
        name=f"{p}/pool1_pool/MaxPool",
        strides=[2, 2],
        kernel_shape=[2, 2],
    )
    for block in (1, 2):
        b = f"conv2_block{block}"
        pre = bn_relu(x, f"{b}_preact_bn", f"{b}_preact_relu")
        y = g.op(
            "Relu",
            [conv(pre, f"{b}_1_conv", 8, 8, 1, fused_bn=True)],
            f"{p}/{b}_1_relu/Relu:0",
            name=f"{p}/{b}_1_relu/Relu",
        )
        y = conv(y, f"{b}_3_conv", 8, 8, 3)
        shortcut = conv(pre, f"{b}_0_conv", 8, 8, 1) if block == 1 else x
        x = g.op("Add", [shortcut, y], f"{p}/{b}_out/add:0", name=f"{p}/{b}_out/add")
    x = bn_relu(x, "post_bn", "post_relu")
    g.op("Transpose", [x], "post_relu", name=f"{p}/post_bn/FusedBatchNormV3__29", perm=NCHW_TO_NHWC)
    return g.model(
        "tf2onnx",
        {"input_1": (1, 8, 8, 3)},
        ["post_relu"],
        opset=15,
        ir_version=8,
        producer=TF2ONNX,
        domains=ML,
    )
