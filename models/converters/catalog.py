"""What the registry (``models.registry.CONVERTERS``) says about each converter model.

One ``Entry`` per builder in ``BUILDERS``: graph inputs and their static shapes (a symbolic batch is
fed as 1), graph outputs, BatchNormalization nodes, and what a correct folder does.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    name: str
    description: str
    inputs: dict[str, tuple[int, ...]]
    outputs: tuple[str, ...]
    bn_count: int
    notes: str


CATALOG: tuple[Entry, ...] = (
    Entry(
        "torch-dynamo-resnet",
        "torch dynamo export, optimize=False: bias-less Conv with Expand(CastLike(0, x), Shape(W)) bias -> BN",
        {"x": (1, 3, 16, 16)},
        ("linear",),
        6,
        "All 6 BN fold: the computed zero bias is a constant.",
    ),
    Entry(
        "torch-dynamo-linear-bn1d",
        "torch dynamo export, optimize=False: Gemm -> BN1d, Gemm without C (bias-less Linear) -> BN1d",
        {"x": (4, 16)},
        ("getitem_3",),
        2,
        "Both BN fold.",
    ),
    Entry(
        "levit-linear-bn",
        "LeViT Linear_BN, torch dynamo export: MatMul (B,N,C) -> Reshape (B*N,C) -> BN -> Reshape back",
        {"x": (2, 5, 8)},
        ("view_3",),
        2,
        "Both BN fold: the Reshape keeps the MatMul's last axis as BN's channel axis.",
    ),
    Entry(
        "mixnet-concat-bn",
        "MixNet MixedConv2d, torch dynamo export: Split -> depthwise 3x3/5x5/7x7 -> Concat(axis=1) -> BN",
        {"x": (1, 12, 8, 8)},
        ("silu",),
        1,
        "The BN folds split per branch (each conv feeds only the Concat).",
    ),
    Entry(
        "keras3-mobilenet",
        "keras 3 export (tf2onnx, optimizers on): depthwise Conv -> Mul/Add (1,C,1,1); Dense -> Mul/Add (C,)",
        {"keras_tensor": (1, 16, 16, 3)},
        ("Identity:0",),
        0,
        "No BN node: regular convs arrive folded; 3 Mul/Add pairs (2 depthwise, 1 Dense) are foldable.",
    ),
    Entry(
        "keras3-tf2onnx-raw",
        "keras 3 model through tf2onnx, optimizers off: Conv -> Transpose -> Add (C,); depthwise -> Transpose -> Mul/Add (C,)",
        {"input_1": (1, 16, 16, 3)},
        ("Identity:0",),
        0,
        "No BN node: 2 bias Adds and 3 Mul/Add chains, all foldable through the Transposes.",
    ),
    Entry(
        "tf2onnx-raw-nhwc",
        "tf2onnx, optimizers off: Conv/ConvTranspose -> Transpose -> Transpose -> BN -> Transpose; weights Transposed",
        {"input_1": (1, 8, 8, 3)},
        ("Identity:0",),
        3,
        "All 3 BN fold through the Transposes (weights are Transpose nodes of initializers).",
    ),
    Entry(
        "tf2onnx-raw-conv3d",
        "tf2onnx, optimizers off, Conv3D (NDHWC): Conv -> Transpose -> Transpose -> BN -> Transpose",
        {"input_1": (1, 4, 6, 6, 2)},
        ("Identity:0",),
        1,
        "The BN folds through the 5-D Transposes.",
    ),
    Entry(
        "resnetv2-preact",
        "tf.keras 2 ResNet50V2 via tf2onnx: pre-activation BN after MaxPool and after Add of two activations",
        {"input_1": (1, 8, 8, 3)},
        ("post_relu",),
        3,
        "No BN folds (tf2onnx folded those after convs); the 3 stay as unsupported-producer, never producer-output-shared.",
    ),
    Entry(
        "paddle2onnx-identity-bn",
        "paddle2onnx: Conv/ConvTranspose/MatMul -> [Identity] -> Add(bias) -> Identity -> BN",
        {"x": (1, 3, 8, 8)},
        ("fetch_name_0",),
        3,
        "All 3 BN fold through the Identities, with the bias Adds.",
    ),
    Entry(
        "arcface-head",
        "insightface iresnet head, TorchScript export: Add -> BN2d -> Flatten -> Gemm -> BN1d",
        {"input.1": (1, 8, 4, 4)},
        ("683",),
        2,
        "features folds backward into the Gemm, bn2 forward through Flatten into it.",
    ),
    Entry(
        "tabular-bn-first",
        "tabular MLP, TorchScript export: input BN1d -> Gemm",
        {"input": (8, 16)},
        ("output",),
        1,
        "The BN folds forward into the Gemm.",
    ),
    Entry(
        "mxnet-bn-data",
        "MXNet ResNet export: bn_data -> zero-padded 7x7 conv0 -> bn0; BN -> unpadded 1x1 conv",
        {"data": (1, 3, 16, 16)},
        ("stage1_unit1_conv3",),
        3,
        "bn0 folds backward, stage1_unit1_bn3 forward; bn_data's shift must not fold into the padded conv0.",
    ),
    Entry(
        "conv-bias-add",
        "bias-only Add after a bias-less Conv: Add (1,C,1,1) and Add (C,1,1)",
        {"input": (1, 3, 8, 8)},
        ("output",),
        0,
        "Both Adds fold into their Conv's bias.",
    ),
    Entry(
        "trap-mul-last-axis",
        "trap: Conv -> Mul by a (C,) constant on a 4-D tensor (scales the last axis, not channels)",
        {"input": (1, 3, 8, 8)},
        ("output",),
        0,
        "Must not fold.",
    ),
    Entry(
        "trap-grouped-add-chw",
        "trap: Conv(group=4) -> Add of a (1,C,H,W) constant (not per-channel)",
        {"input": (1, 8, 6, 6)},
        ("output",),
        0,
        "Must not fold.",
    ),
    Entry(
        "trap-div-by-zero",
        "trap: Conv -> Div (1,C,1,1) with a zero divisor -> Add",
        {"input": (1, 3, 8, 8)},
        ("output",),
        0,
        "Must not fold: x / 0 is not W / 0.",
    ),
    Entry(
        "trap-reshape-merges-channel",
        "trap: Conv -> Reshape merging C with H -> BN over the merged axis",
        {"input": (1, 3, 4, 4)},
        ("output",),
        1,
        "Must not fold: BN's channels are (c, h) pairs.",
    ),
    Entry(
        "trap-concat-branch-shared",
        "trap: MixNet Concat -> BN where one branch conv also feeds a second output",
        {"x": (1, 12, 8, 8)},
        ("silu", "aux"),
        1,
        "Must not split-fold into the shared branch (aux would change).",
    ),
)
