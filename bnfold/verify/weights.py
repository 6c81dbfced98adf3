"""Static check of fold points: are the candidate's weights the reference's BN, folded exactly?

The runtime comparison in :mod:`bnfold.verify.run` cannot see an error smaller than float32
noise: dropping ``epsilon`` = 1e-5 changes a fold by ~5e-6 relative, and reassociation noise
of a correct fold reaches ~8e-6. The weights themselves carry no such noise, so at each fold
point this module recomputes the fold from the reference's constants and compares it to the
candidate's stored values, independent of any input.

A fold point is a tensor name ``y`` that the reference computes as
``BatchNormalization(P(x, W, b))`` and the candidate as ``P'(x, W', b')``, where P and P' are
the same Conv, ConvTranspose or Gemm (or P is a MatMul, or a MatMul followed by an Add of a
constant bias, and P' the same or a plain Gemm), reading the same ``x``, with the same
attributes (Gemm's ``beta`` aside), and all weights and BN parameters constant. The same
Identity, Dropout or Transpose ops may stand between P and the BN in both models: the BN's
channel axis is followed back through them and must be P's output-channel axis. A fold alias
counts too: the candidate's ``P'`` writes the
name of ``P``'s output ``c`` and the BN's output is gone (onnxsim and onnxoptimizer fold that
way); the check is reported under the BN's output name. With ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s`` computed in float64 (:mod:`bnfold.fold_math`, the same arithmetic
as the pass), every element must satisfy::

    |W' - W*s|        <= rtol * |W*s|                            (+ the dtype's tiny)
    |b' - (b*s + t)|  <= rtol * (|b*s| + |beta| + |mean*s|)      (+ the dtype's tiny)

with ``rtol = WEIGHT_ULPS * eps(dtype of W')``: 4.8e-7 for float32, 3.9e-3 for float16.
bnfold rounds each value once (half an ulp, 6e-8 for float32); a fold computed in the
weight's own dtype (torch's ``fuse_conv_bn_weights``, other tools) rounds a few times and
stays within 2 ulps. The bias bound is relative to the magnitudes summed, since ``b*s + t``
may cancel to nearly zero. A user's ``atol``/``rtol`` (verify's arguments) loosen the check,
never tighten it below ``rtol`` above. Weights are compared in blocks of ``BLOCK_ELEMENTS``
along their first axis: no float64 copy of a whole weight is made, and the temporaries stay in
cache (large-500: 3 ns an element, against ~15 with whole-weight temporaries).

A candidate that folds a BN the reference runs in training mode (``training_mode=1``,
``is_test=0`` at opset <= 6, statistics outputs declared at opset < 14) or with
``spatial=0`` fails outright: no constant weights reproduce batch or per-element statistics.

Fold points the check cannot model (Reshape/Flatten/Squeeze on the path, different inputs or
attributes, weights computed at run time, bfloat16 weights, per-row biases, affine chains that
were never a BN) are left to the runtime
comparison; :func:`check_weights` skips them and logs why at debug level.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import fold_math
from ..onnx.attrs import attr
from ..onnx.constants import NotConstant
from ..onnx.graph import Scope, main_scope
from ..onnx.sources import inference_problem
from ..report import TensorDiff

__all__ = ["BLOCK_ELEMENTS", "WEIGHT_ULPS", "WeightCheck", "check_weights"]

log = logging.getLogger(__name__)

WEIGHT_ULPS = 4
"""Tolerance of the weights check in units of the weight dtype's machine epsilon."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_PATHS = ("Identity", "Dropout", "Transpose")
"""Shape-only ops a fold looks through that keep the channel axis computable without shapes."""
_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class WeightCheck:
    """One fold point's check: the diff (kind ``weights``) and, when it failed, why."""

    diff: TensorDiff
    problem: str = ""


class _Skip(Exception):
    """This fold point cannot be checked statically; the runtime comparison still applies."""


def check_weights(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    reference_dir: str | None = None,
    candidate_dir: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[WeightCheck]:
    """Check every fold point of ``candidate`` against ``reference``, in candidate graph order.

    ``*_dir``: where the models' external data (or lazy stubs) are read from.
    """
    ref_scope = main_scope(reference, reference_dir)
    cand_scope = main_scope(candidate, candidate_dir)
    opset = ref_scope.index.opset
    readers = Counter(i for n in reference.graph.node for i in n.input if i)
    checks = []
    for bn in reference.graph.node:
        if not _is_bn(bn) or not bn.input or not bn.input[0]:
            continue
        y, x = bn.output[0], bn.input[0]
        if y in cand_scope.producer:
            start = y
        elif x in cand_scope.producer and readers[x] == 1:  # a fold alias: the layer kept its name
            start = x
        else:
            continue
        if _is_bn(cand_scope.producer[start]):
            continue  # not folded
        try:
            checks.append(_check_one(ref_scope, cand_scope, opset, bn, start, atol, rtol))
        except _Skip as e:
            log.debug("fold point %r not checked statically: %s", y, e)
        finally:  # weights can be large: keep none of them between fold points
            ref_scope.const_cache.clear()
            cand_scope.const_cache.clear()
    return checks


def _is_bn(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant(scope: Scope, name: str) -> np.ndarray:
    try:
        return np.asarray(scope.constant(name, what="weight"))
    except NotConstant as e:
        raise _Skip(e.detail) from None
    except Exception as e:  # noqa: BLE001 - unreadable data: the runtime comparison reports it
        raise _Skip(f"{name!r} cannot be read: {e}") from None


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


@dataclass(frozen=True)
class _Layer:
    """The layer that computes a fold point (looked back to through shape-only ops)."""

    node: onnx.NodeProto
    """Conv, ConvTranspose, Gemm or MatMul."""
    bias: str
    """The name of its bias (Gemm's C, the constant of the Add after a MatMul), or ""."""
    axis: int
    """The axis of the BN's channels in the layer's output, followed back through the paths."""
    rank: int | None
    """The rank of that output, when a path tells it."""
    paths: tuple[onnx.NodeProto, ...]


def _layer(scope: Scope, name: str) -> _Layer:
    """The layer writing ``name``: through Identity/Dropout/Transpose (the channel axis followed
    back), then Conv/ConvTranspose/Gemm/MatMul, or an Add of a constant after a MatMul."""
    axis, rank, paths = 1, None, []
    node = scope.producer.get(name)
    while node is not None and node.domain in _DEFAULT_DOMAINS and node.op_type in _PATHS:
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None, "INTS")
            if perm is None:
                raise _Skip("a Transpose without perm on the path")
            axis, rank = int(perm[axis]), len(perm)
        paths.append(node)
        node = scope.producer.get(node.input[0])
    if node is None or node.domain not in _DEFAULT_DOMAINS:
        raise _Skip(f"no layer writes {name!r}")
    bias = ""
    if node.op_type == "Add":
        layer = next(
            (scope.producer.get(i) for i in node.input if _is_op(scope.producer.get(i), "MatMul")), None
        )
        if layer is None:
            raise _Skip("an Add that follows no MatMul")
        bias = next(i for i in node.input if i != layer.output[0])
        node = layer
    elif node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        bias = _input(node, 2)
    elif node.op_type != "MatMul":
        raise _Skip(f"the fold point follows {node.op_type}")
    return _Layer(node, bias, axis, rank, tuple(paths))


def _is_op(node: onnx.NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in _DEFAULT_DOMAINS


def _layout(ref: _Layer, cand: _Layer, w_ndim: int) -> tuple[int, int]:
    """The weight's (output-channel axis, groups), once both layers are known to compute alike."""
    if [(p.op_type, _attrs(p)) for p in ref.paths] != [(p.op_type, _attrs(p)) for p in cand.paths]:
        raise _Skip("the layers are followed by different shape ops")
    if _input(ref.node, 0) != _input(cand.node, 0):
        raise _Skip("the layers read different inputs")
    r, c = ref.node, cand.node
    ra, ca = _attrs(r), _attrs(c)
    plain = all(ca.get(k, d) == d for k, d in (("alpha", 1.0), ("transA", 0), ("transB", 0)))
    if r.op_type == "MatMul":
        if c.op_type == "MatMul" or (c.op_type == "Gemm" and plain):
            rank = ref.rank if ref.rank is not None else 2  # BN reads a MatMul output directly: rank 2
            if ref.axis != rank - 1:
                raise _Skip("the BN's channel axis is not the MatMul's output columns")
            return w_ndim - 1, 1
        raise _Skip(f"a MatMul in the reference, {c.op_type} in the candidate")
    if r.op_type != c.op_type:
        raise _Skip(f"{r.op_type} in the reference, {c.op_type} in the candidate")
    if ref.axis != 1:
        raise _Skip(f"the BN's channel axis is axis {ref.axis} of the {r.op_type}'s output")
    if r.op_type == "Gemm":
        for key, default in (("alpha", 1.0), ("transA", 0), ("transB", 0)):
            if ra.get(key, default) != ca.get(key, default):
                raise _Skip(f"Gemm attribute {key} differs")
        return (0 if ra.get("transB", 0) else 1), 1
    if ra != ca:
        raise _Skip(f"{r.op_type} attributes differ")
    return (1, int(ra.get("group", 1))) if r.op_type == "ConvTranspose" else (0, 1)


def _bias(scope: Scope, layer: _Layer, channels: int) -> np.ndarray | None:
    """The per-channel bias a layer adds (Gemm: ``beta * C``), float64; None when it has none."""
    if not layer.bias:
        return None
    value = _constant(scope, layer.bias)
    node = layer.node
    if node.op_type in ("Conv", "ConvTranspose"):
        if value.shape != (channels,):
            raise _Skip(f"bias has shape {value.shape}")
        return value.astype(np.float64)
    if value.ndim > 2 and all(d == 1 for d in value.shape[:-1]):
        value = value.reshape(1, -1)
    vec = fold_math.channel_vector(value, channels)
    if vec is None:
        raise _Skip(f"bias of shape {value.shape} is not per output column")
    return vec * float(np.float32(attr(node, "beta", 1.0, "FLOAT"))) if node.op_type == "Gemm" else vec


BLOCK_ELEMENTS = 1 << 16
"""Elements of a weight compared at once: the float64 temporaries of one block stay in cache,
and no whole-weight float64 copy is ever made (a 400 MB float32 weight would need 3.2 GB)."""


@dataclass
class _WeightError:
    """The folded weight's error against the exact fold, accumulated over row blocks."""

    channel_rel: np.ndarray
    """Largest ``|W' - W*s| / |W*s|`` per output channel."""
    max_abs: float = 0.0
    sum_abs: float = 0.0
    mismatched: int = 0


def _blocks(shape: tuple[int, ...], groups: int) -> list[tuple[int, int, int]]:
    """``(first row, end row, first group)`` of each block of axis-0 rows; with ``groups > 1``
    (ConvTranspose) a block holds whole groups, so its channels are a contiguous range."""
    rows = shape[0]
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    unit = rows // groups if groups > 1 else 1
    step = max(1, BLOCK_ELEMENTS // (per_row * unit)) * unit
    return [(r, min(r + step, rows), r // unit if groups > 1 else 0) for r in range(0, rows, step)]


def _weight_error(
    w: np.ndarray,
    w_new: np.ndarray,
    scale: np.ndarray,
    tol: np.ndarray,
    floor: float,
    axis: int,
    groups: int,
) -> _WeightError:
    """Compare ``w_new`` with ``w * scale`` (float64, :func:`fold_math.scale_weight`) block by block.

    Element by element, ``|W' - W*s| <= tol[channel] * |W*s| + floor`` (NaN fails). Where every
    channel's largest ratio ``|W' - W*s| / max(|W*s|, tiny)`` is within its ``tol`` (<= 1), no
    element can fail and the per-element test is skipped: it runs only on a block that may fail.
    """
    tiny = float(np.finfo(w_new.dtype).tiny)
    out = _WeightError(np.zeros(scale.shape[0]))
    for r0, r1, g0 in _blocks(w.shape, groups):
        n_groups = (r1 - r0) // (w.shape[0] // groups) if groups > 1 else 1
        if groups > 1:
            channels = slice(g0 * w.shape[1], (g0 + n_groups) * w.shape[1])
        else:
            channels = slice(r0, r1) if axis == 0 else slice(None)
        block, block_scale = w[r0:r1], scale[channels]
        exp = fold_math.scale_weight(block, block_scale, axis=axis, groups=n_groups)
        den = np.abs(exp)
        err = np.subtract(w_new[r0:r1], exp, out=exp, dtype=np.float64)
        np.abs(err, out=err)
        out.max_abs = float(np.maximum(out.max_abs, err.max(initial=0.0)))  # NaN propagates
        out.sum_abs += float(err.sum())
        rel = np.divide(err, np.maximum(den, tiny, out=den), out=den)
        per = _per_channel(rel, axis, n_groups)
        out.channel_rel[channels] = np.maximum(out.channel_rel[channels], per)
        # within tol (<= 1, with a margin for the division's rounding), no element can fail
        if not np.all(per <= np.minimum(tol[channels], 1.0) * (1 - 1e-9)):
            exact = fold_math.scale_weight(block, block_scale, axis=axis, groups=n_groups)
            allowed = _along(tol[channels], err.shape, axis, n_groups) * np.abs(exact) + floor
            out.mismatched += int(np.count_nonzero(~(err <= allowed)))
    return out


def _along(per_channel: np.ndarray, shape: tuple[int, ...], axis: int, groups: int) -> np.ndarray:
    """A per-output-channel vector broadcast against a weight of ``shape``."""
    if groups > 1:
        g = per_channel.reshape(groups, 1, shape[1], *([1] * (len(shape) - 2)))
        return np.broadcast_to(g, (groups, shape[0] // groups, *shape[1:])).reshape(shape)
    dims = [1] * len(shape)
    dims[axis] = per_channel.shape[0]
    return per_channel.reshape(dims)


def _per_channel(a: np.ndarray, axis: int, groups: int) -> np.ndarray:
    """Max of ``a`` (shaped like the weight) per output channel."""
    if groups > 1:
        g = a.reshape((groups, a.shape[0] // groups, a.shape[1], -1))
        return g.max(axis=(1, 3)).reshape(-1)
    return a.max(axis=tuple(i for i in range(a.ndim) if i != axis)) if a.ndim > 1 else a


def _check_one(
    ref: Scope,
    cand: Scope,
    opset: int,
    bn: onnx.NodeProto,
    start: str,
    atol: float | None,
    rtol: float | None,
) -> WeightCheck:
    """``start``: the candidate's tensor holding the BN's output (its name, or a fold alias)."""
    y = bn.output[0]  # the fold point, named as in the reference
    cand_layer = _layer(cand, start)
    w_new = _constant(cand, _input(cand_layer.node, 1))
    if w_new.dtype not in _DTYPES:
        raise _Skip(f"weight dtype {w_new.dtype}")
    shape, dtype = tuple(w_new.shape), w_new.dtype.name
    training = inference_problem(bn, opset, used=False)
    if training is not None:
        size = w_new.size + (w_new.shape[0] if w_new.ndim else 0)
        diff = TensorDiff(
            y, "weights", shape, dtype, math.inf, math.inf, math.inf, size, size, 0.0, 0.0, False
        )
        return WeightCheck(diff, f"'{y}' is folded, but the reference BN cannot be: {training.detail}")

    ref_layer = _layer(ref, bn.input[0])
    axis, groups = _layout(ref_layer, cand_layer, w_new.ndim)
    gamma, beta, mean, var = (_constant(ref, n).astype(np.float64).reshape(-1) for n in bn.input[1:5])
    eps = float(attr(bn, "epsilon", fold_math.DEFAULT_EPSILON, "FLOAT"))
    aff = fold_math.bn_affine(gamma, beta, mean, var, eps)
    w = _constant(ref, _input(ref_layer.node, 1))
    if w.ndim < 2 or w.shape[axis] * max(1, groups) != aff.channels:
        raise _Skip(f"weight {w.shape} does not match {aff.channels} BN channels")
    if groups > 1 and w.shape[0] % groups:
        raise _Skip(f"weight {w.shape} does not split into {groups} groups")
    b = _bias(ref, ref_layer, aff.channels)
    b_exp = fold_math.fold_bias(b, aff)
    b_terms = (
        np.abs(aff.scale) * (np.abs(b) if b is not None else 0.0) + np.abs(beta) + np.abs(mean * aff.scale)
    )
    b_new = _bias(cand, cand_layer, aff.channels)
    if b_new is None:
        b_new = np.zeros(aff.channels)

    finfo = np.finfo(w_new.dtype)
    tol = WEIGHT_ULPS * float(finfo.eps)
    tol = max(tol, float(rtol)) if rtol is not None else tol
    floor = float(finfo.tiny) + (float(atol) if atol is not None else 0.0)
    size = w_new.size + aff.channels
    if w_new.shape != w.shape:
        diff = TensorDiff(
            y, "weights", shape, dtype, math.inf, math.inf, math.inf, size, size, 0.0, tol, False
        )
        return WeightCheck(diff, f"'{y}': folded weight has shape {shape}, the reference's fold {w.shape}")

    # The epsilon attribute is a float32: accept any eps that rounds to it (a fold computed with
    # the decimal 1e-5 instead of float32(1e-5) is 1e-14 off, 60 float64 ulps).
    eps_slack = float(np.spacing(np.float32(eps))) / 2 / (2 * (var + float(np.float32(eps))))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        try:
            werr = _weight_error(w, w_new, aff.scale, tol + eps_slack, floor, axis, groups)
        except ValueError as e:
            raise _Skip(str(e)) from None
        b_err = np.abs(b_new - b_exp)
        b_bad = ~(b_err <= (tol + eps_slack) * b_terms + floor)  # NaN counts as bad
        b_rel = b_err / np.maximum(b_terms, finfo.tiny)
    channel_rel = np.maximum(werr.channel_rel, b_rel)
    mismatched = werr.mismatched + int(np.count_nonzero(b_bad))
    max_rel = float(np.max(channel_rel)) if channel_rel.size else 0.0
    worst = int(np.argmax(channel_rel)) if channel_rel.size else None
    diff = TensorDiff(
        name=y,
        kind="weights",
        shape=shape,
        dtype=dtype,
        max_abs=float(max(werr.max_abs, b_err.max(initial=0.0))),
        max_rel=max_rel,
        mean_abs=float((werr.sum_abs + b_err.sum()) / size) if size else 0.0,
        mismatched=mismatched,
        total=size,
        atol=float(atol or 0.0),
        rtol=tol,
        passed=mismatched == 0,
        worst_channel=worst,
    )
    if not mismatched:
        return WeightCheck(diff)
    return WeightCheck(
        diff,
        f"folded weights at '{y}' differ from the reference's BN folded in float64 "
        f"({mismatched} of {size} values, max rel {max_rel:.3g} in channel {worst}, rtol {tol:.2g})",
    )
