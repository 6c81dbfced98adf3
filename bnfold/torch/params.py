"""A layer written out in a forward with the module's own tensors: ``x @ W + b`` or
``F.linear(x, W, b)``, followed by a BatchNorm.

The map folds into the tensors themselves (``W' = W * scale`` along the output-feature axis,
``b' = (b - mean) * scale + beta``; :mod:`bnfold.fold_math`), which are replaced in the module
that owns them. That is exact when nothing else reads them: each is read by exactly one
``get_attr`` in the traced graph, is registered under one name in the whole model, and the
graph is the whole model's (an untraceable parent could read them too). The BN's axis 1 is the
output-feature axis only on rank-2 activations, which the example inputs must prove.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from .. import fold_math
from ..report import SkipReason
from .fuse import to_numpy, to_torch
from .paths import metadata_only

_MATMULS = (operator.matmul, torch.matmul, torch.mm)
_ADDS = (operator.add, torch.add)


@dataclass(frozen=True)
class ParamLayer:
    """``op`` in the forward: ``weight``/``bias`` are ``get_attr`` targets; ``axis`` is the weight's
    output-feature axis (1 for ``x @ W`` with ``W (K, N)``, 0 for ``F.linear`` with ``W (N, K)``)."""

    out: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    axis: int
    op: str
    inner: tuple[fx.Node, ...] = ()


def param_layer(node: fx.Node) -> ParamLayer | None:
    """The written-out layer whose output is ``node``, or None."""
    if node.op != "call_function":
        return None
    if node.target is nn.functional.linear:
        args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
        w, b = args.get("weight"), args.get("bias")
        if _attr(w) and (b is None or _attr(b)):
            return ParamLayer(out=node, weight=w, bias=b, axis=0, op="linear")
        return None
    if node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
        for mm, b in (node.args, node.args[::-1]):
            if isinstance(mm, fx.Node) and mm.op == "call_function" and mm.target in _MATMULS and _attr(b):
                w = mm.args[1] if len(mm.args) == 2 else None
                if _attr(w):
                    return ParamLayer(out=node, weight=w, bias=b, axis=1, op="matmul", inner=(mm,))
    return None


def _attr(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def fold_params(
    layer: ParamLayer,
    aff: fold_math.Affine,
    *,
    root: nn.Module,
    reads: Counter,
    names: Counter,
    ranks: set[int] | None,
    whole_model: bool,
) -> tuple[tuple[tuple[str, torch.Tensor], ...], str] | tuple[SkipReason, str]:
    """``((target, new tensor) for weight and bias), producer name)``, or ``(reason, sentence)``."""
    if layer.bias is None:
        return SkipReason.UNSUPPORTED_ATTRIBUTE, f"{layer.op} has no bias to take the BatchNorm's shift"
    for inner in (*layer.inner, layer.out):
        users = [u for u in inner.users if not metadata_only(u, inner)]
        if len(users) != 1:
            return SkipReason.PRODUCER_OUTPUT_SHARED, f"the output of {inner.name} also feeds other nodes"
    tensors = []
    for node in (layer.weight, layer.bias):
        target = str(node.target)
        t = _resolve(root, target)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return SkipReason.UNSUPPORTED_DTYPE, f"{target} is not a floating-point tensor"
        if reads[target] != 1 or len(node.users) != 1 or names[id(t)] != 1:
            return SkipReason.NON_CONSTANT_WEIGHT, f"{target} is also read elsewhere"
        tensors.append((target, t))
    if not whole_model:
        return (
            SkipReason.UNTRACEABLE,
            "the module that calls this forward cannot be traced: it may read the tensors too",
        )
    (wname, w), (bname, b) = tensors
    channels = aff.channels
    if w.dim() != 2 or w.shape[layer.axis] != channels or tuple(b.shape) != (channels,):
        return (
            SkipReason.SHAPE_MISMATCH,
            f"{wname} {list(w.shape)} and {bname} {list(b.shape)} do not give {channels} features",
        )
    if ranks != {2}:
        why = f"rank {max(ranks)}" if ranks else "an unknown rank (pass example_inputs)"
        return (
            SkipReason.CHANNEL_AXIS_MISMATCH,
            f"the {layer.op} output has {why}: BatchNorm's axis 1 is its feature axis only at rank 2",
        )
    new_w, why = fold_math.scale_weight_exact(to_numpy(w), aff.scale, axis=layer.axis)
    if new_w is None:
        return SkipReason.NOT_REPRESENTABLE, f"{wname}: {why}"
    new_b, why = fold_math.cast_exact(
        fold_math.fold_bias(np.asarray(to_numpy(b), np.float64), aff), to_numpy(b).dtype, channel_axis=0
    )
    if new_b is None:
        return SkipReason.NOT_REPRESENTABLE, f"{bname}: {why}"
    return ((wname, to_torch(new_w, w)), (bname, to_torch(new_b, b))), wname


def _resolve(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def set_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``target`` (a parameter stays a parameter)."""
    parent, _, leaf = target.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)
