"""A producer module with a BatchNorm folded in: the arithmetic of :mod:`bnfold.fold_math`.

``W' = W * scale`` along the weight's output-channel axis, ``b' = (b - mean) * scale + beta``
(``scale = gamma / sqrt(var + eps)``, ``b = 0`` without bias). The axis is 0 for
``Conv{1,2,3}d`` ``(C_out, C_in/g, k...)`` and ``Linear`` ``(out, in)``; ``ConvTranspose``
stores ``(C_in, C_out/g, k...)``, so the scale runs along axis 1 *within each group*
(``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)`` is right only for
``groups == 1``). The tensors go to numpy and through :mod:`bnfold.fold_math`, which computes in
float64 and rounds once to the layer's dtype (bfloat16 through ``ml_dtypes``), refusing a result
that overflows, turns NaN, or flushes a non-zero output channel to zeros.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from .. import fold_math
from .modules import CONV_T

_NUMPY_DTYPES = {
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The stored values on the CPU in the same dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
    t = t.detach().cpu()
    if t.dtype is torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``a`` as a tensor on ``like``'s device (``a`` already has ``like``'s dtype)."""
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(like.device)


def affine(stats: tuple[Any, Any, Any, Any], eps: float) -> fold_math.Affine:
    """The BN ``(running_mean, running_var, gamma or None, beta or None)`` as a float64 affine map."""
    mean, var, gamma, beta = (None if t is None else np.asarray(to_numpy(t), np.float64) for t in stats)
    gamma = np.ones_like(mean) if gamma is None else gamma
    beta = np.zeros_like(mean) if beta is None else beta
    return fold_math.bn_affine(gamma, beta, mean, var, eps)


def fuse(prod: nn.Module, base: type, aff: fold_math.Affine) -> nn.Module | str:
    """A copy of ``prod`` with ``aff`` applied to its output channels, or why it cannot be."""
    weight, bias = prod.weight, prod.bias
    if _unsupported(prod):
        return _unsupported(prod)
    groups = prod.groups if base in CONV_T else 1
    axis = 1 if base in CONV_T else 0
    new_w, why = fold_math.scale_weight_exact(to_numpy(weight), aff.scale, axis=axis, groups=groups)
    if new_w is None:
        return f"weight: {why}"
    b64 = fold_math.fold_bias(None if bias is None else np.asarray(to_numpy(bias), np.float64), aff)
    return _with(prod, new_w, b64)


def _unsupported(layer: nn.Module) -> str:
    """'' when the layer's weight and bias have a dtype the arithmetic handles, else why not."""
    for what, t in (("weight", layer.weight), ("bias", layer.bias)):
        if t is not None and t.dtype not in _NUMPY_DTYPES:
            return f"{what}: dtype {str(t.dtype).removeprefix('torch.')} is not supported"
    return ""


def _with(layer: nn.Module, new_w: np.ndarray, b64: np.ndarray) -> nn.Module | str:
    """A copy of ``layer`` with weight ``new_w`` and the float64 bias ``b64`` rounded once."""
    weight, bias = layer.weight, layer.bias
    bias_like = bias if bias is not None else weight
    new_b, why = fold_math.cast_exact(b64, _NUMPY_DTYPES[bias_like.dtype], channel_axis=0)
    if new_b is None:
        return f"bias: {why}"
    # the old weight and bias are replaced below: share them in the copy instead of copying them
    fused = copy.deepcopy(layer, {id(t): t for t in (weight, bias) if t is not None})
    fused.weight = nn.Parameter(to_torch(new_w, weight), requires_grad=weight.requires_grad)
    fused.bias = nn.Parameter(to_torch(new_b, bias_like), requires_grad=bias_like.requires_grad)
    return fused


def fuse_forward(linear: nn.Module, aff: fold_math.Affine) -> nn.Module | str:
    """A copy of ``linear`` that first applies ``aff`` to its input features (a BN before it):
    ``W' = W diag(scale)``, ``b' = b + W shift`` (:func:`bnfold.fold_math.forward_matrix`; the
    weight ``(out, in)`` has its input-feature axis at 1), or why it cannot be."""
    weight, bias = linear.weight, linear.bias
    if _unsupported(linear):
        return _unsupported(linear)
    new_w, why, delta = fold_math.forward_matrix(to_numpy(weight), aff, k_axis=1)
    if new_w is None:
        return f"weight: {why}"
    b64 = delta if bias is None else np.asarray(to_numpy(bias), np.float64) + delta
    return _with(linear, new_w, b64)
