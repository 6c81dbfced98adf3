"""Converter-shaped models: BatchNormalization as real ONNX converters write it (issue 12).

Each builder writes, with ``onnx.helper`` and a seeded numpy generator, the graph shape that one
converter emits for BN: the same op types in the same order, the same attribute forms and constant
shapes, tensor names in that converter's style, its opset and IR version. The models are tiny
(a few layers, a few kB), float32, and their BN statistics are never trivial (gamma != 1 with some
negative, beta != 0, mean != 0, var random). No converter is needed to build them.

``BUILDERS`` maps a name to ``seed -> onnx.ModelProto``; :func:`build` calls one. The registry
(``models.registry.CONVERTERS``) holds their metadata. Each builder's docstring says which
converter writes the shape and what a correct folder does with it: folding is exact or the
structure is left with a reason; the traps (``trap-*``) must not be folded.

The torch forms were checked against ``torch.onnx.export(..., dynamo=True)`` of torch 2.13 (with
``optimize=False`` and with the default ``optimize=True``); the others follow the converters'
published conversion rules for BN (tf2onnx, keras 3's ``model.export(format="onnx")`` through
tf2onnx, paddle2onnx, insightface's and MXNet's exports).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from models.converters.other_exports import (
    conv_bias_add,
    mxnet_bn_data,
    paddle2onnx_identity_bn,
    trap_div_by_zero,
    trap_grouped_add_chw,
    trap_mul_last_axis,
    trap_reshape_merges_channel,
)
from models.converters.tf_exports import (
    keras3_mobilenet,
    resnetv2_preact,
    tf2onnx_raw_conv3d,
    tf2onnx_raw_nhwc,
)
from models.converters.torch_exports import (
    arcface_head,
    levit_linear_bn,
    mixnet_concat_bn,
    tabular_bn_first,
    torch_dynamo_linear_bn1d,
    torch_dynamo_resnet,
    trap_concat_branch_shared,
)

BUILDERS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "torch-dynamo-resnet": torch_dynamo_resnet,
    "torch-dynamo-linear-bn1d": torch_dynamo_linear_bn1d,
    "levit-linear-bn": levit_linear_bn,
    "mixnet-concat-bn": mixnet_concat_bn,
    "keras3-mobilenet": keras3_mobilenet,
    "tf2onnx-raw-nhwc": tf2onnx_raw_nhwc,
    "tf2onnx-raw-conv3d": tf2onnx_raw_conv3d,
    "resnetv2-preact": resnetv2_preact,
    "paddle2onnx-identity-bn": paddle2onnx_identity_bn,
    "arcface-head": arcface_head,
    "tabular-bn-first": tabular_bn_first,
    "mxnet-bn-data": mxnet_bn_data,
    "conv-bias-add": conv_bias_add,
    "trap-mul-last-axis": trap_mul_last_axis,
    "trap-grouped-add-chw": trap_grouped_add_chw,
    "trap-div-by-zero": trap_div_by_zero,
    "trap-reshape-merges-channel": trap_reshape_merges_channel,
    "trap-concat-branch-shared": trap_concat_branch_shared,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The converter-shaped model ``name``, deterministic in ``seed``."""
    return BUILDERS[name](seed)
