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

How close each is to a real conversion (random weights, same architecture, compared node by node:
op types, node and tensor names, attributes, initializer shapes, opset, IR version, producer):

- identical: ``torch-dynamo-*`` (torch 2.13 ``dynamo=True, optimize=False``), ``levit-linear-bn`` and
  ``mixnet-concat-bn`` (the default ``optimize=True``), ``keras3-mobilenet`` (keras 3.15
  ``model.export``), ``keras3-tf2onnx-raw``, ``tf2onnx-raw-*`` and ``resnetv2-preact`` (tensorflow
  2.21, tf_keras 2.21, tf2onnx 1.17.0), ``paddle2onnx-identity-bn`` (paddle 3.3, paddle2onnx 2.1);
- same form, module names of our choosing: ``arcface-head``, ``tabular-bn-first`` (TorchScript
  exporter, torch 2.13);
- written from the exporter's conversion rules, not checked: ``mxnet-bn-data`` (MXNet does not
  install here); written by hand: ``conv-bias-add`` and the ``trap-*`` models.

Only the values differ from a real export: seeded random weights, and keras' ``batchnorm/mul`` and
``sub`` computed from random BN statistics as keras computes them (eps 1e-3); weights a converter
already merged a BN into (``merged_input``, ``weights_fused_bn``) are plain random weights.
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
    keras3_tf2onnx_raw,
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
    "keras3-tf2onnx-raw": keras3_tf2onnx_raw,
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
