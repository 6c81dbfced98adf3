"""Forward folds: a per-channel map before a layer, folded into the layer it feeds.

``y = L(s * x + t)`` for a layer ``L`` linear in its input, with the map on the layer's
input-channel axis (see :mod:`bnfold.fold_math` for the arithmetic)::

    Gemm (transA=0)  B' = diag(s) B (K axis),  C' = beta*C + alpha * t·B,  beta := 1
    MatMul           B' = diag(s) B;  t·B goes into a Gemm's C (rank-2) or a new Add
    Conv             W' = W * s per input channel (any group),  b' = b + W·t

The Conv shift is exact only without padding (a zero-padded border never saw ``t``): a map
with a non-zero shift before a padded Conv is refused (``forward-padding``); its scale alone
would be exact. Between the map and the layer, Identity, Dropout (inference), and Reshape/
Flatten/Squeeze/Unsqueeze are looked through; a Flatten that merges the channel axis with the
axes after it (BN2d -> Flatten -> Linear heads) repeats each channel's ``s, t`` over the
positions it merged. The layer's output keeps its values and its name; the looked-through ops
compute other values now, so they get fresh output names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bnfold.onnxlib import onnx

from .. import fold_math
from ..report import SkipReason
from . import protos
from .attrs import attr
from .constants import NotConstant
from .graph import Scope, is_op, node_id
from .paths import map_axis, passes
from .plan import NewValue, Plan, Reject, Source

FORWARD_PATH = ("Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze")
FORWARD_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class ForwardRoute:
    """From a source's output down to the layer it feeds."""

    layer: onnx.NodeProto
    path: tuple[onnx.NodeProto, ...]
    axis: int | None
    """The map's channel axis on the layer's input."""
    repeat: int = 1
    """Each channel covers this many consecutive positions of that axis (after a Flatten)."""


def walk_forward(
    scope: Scope, source: Source, consumers: Mapping[str, Sequence[onnx.NodeProto]]
) -> ForwardRoute | Reject | None:
    """The layer ``source`` feeds through look-through ops; None when it feeds none alone."""
    t, axis, repeat = source.output, source.axis, 1
    path: list[onnx.NodeProto] = []
    while True:
        readers = [n for n in consumers.get(t, ()) if node_id(n) not in scope.doomed]
        if not scope.single_use(t) or len(readers) != 1:
            return None
        node = readers[0]
        if is_op(node, *FORWARD_LAYERS):
            if not node.input or node.input[0] != t or list(node.input).count(t) != 1:
                return None
            return ForwardRoute(node, tuple(path), axis, repeat)
        if not is_op(node, *FORWARD_PATH) or node.input[0] != t or not passes(scope, node):
            return None
        if axis is not None:
            mapped = _axis_after(scope, node, axis)
            if isinstance(mapped, Reject):
                return mapped
            axis, repeat = mapped[0], repeat * mapped[1]
        path.append(node)
        t = node.output[0]


def _axis_after(scope: Scope, node: onnx.NodeProto, axis: int) -> tuple[int, int] | Reject:
    """Where input ``axis`` of a look-through op lands on its output, and how many positions
    each of its elements spans there (> 1 when merged with the axes after it)."""
    if node.op_type in ("Identity", "Dropout"):
        return axis, 1
    s_in, s_out = scope.shape(node.input[0]), scope.shape(node.output[0])
    if s_in is not None and s_out is not None:
        b = map_axis(s_in, axis, s_out)
        if b is not None:
            return b, 1
        tail = s_in[axis + 1 :]
        if all(isinstance(d, int) for d in tail):
            spread = math.prod(tail)  # type: ignore[arg-type]
            merged = map_axis((*s_in[:axis], _times(s_in[axis], spread)), axis, s_out)
            if merged is not None and merged == len(s_out) - 1 == axis:
                return merged, spread
    return Reject(
        SkipReason.AXIS_NOT_PRESERVED,
        f"the channel axis cannot be followed through {node.op_type} {node.name!r} to the layer",
        node,
    )


def _times(d: int | str | None, k: int) -> int | str | None:
    return d * k if isinstance(d, int) else (d if k == 1 else None)


def plan_forward(scope: Scope, route: ForwardRoute, source: Source) -> Plan | Reject:
    """The plan folding ``source`` forward into ``route.layer``, or why not."""
    layer = route.layer
    aff = source.affine
    if route.repeat > 1:
        aff = fold_math.Affine(np.repeat(aff.scale, route.repeat), np.repeat(aff.shift, route.repeat))
    src = replace(source, affine=aff, axis=route.axis)
    check = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}[layer.op_type]
    try:
        plan = check(scope, layer, src)
    except NotConstant as e:
        return Reject(e.reason, e.detail, layer)
    if isinstance(plan, Reject):
        return plan if plan.node is not None else Reject(plan.reason, plan.detail, layer)
    return replace(
        plan,
        source=source,
        direction="forward",
        renamed=route.path,
        through=tuple(n.op_type for n in route.path),
        final=plan.final or layer.output[0],
    )


def _weight(scope: Scope, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | Reject:
    w = scope.constant(node.input[index], what=what)
    if w.dtype.kind != "f" and str(w.dtype) != "bfloat16":
        return Reject(
            SkipReason.UNSUPPORTED_DTYPE,
            f"{what} has dtype {w.dtype}, only floating-point weights are folded",
        )
    return w


def _axis_problem(source: Source, want: int, op: str) -> Reject | None:
    if source.axis is None or source.axis == want:
        return None
    return Reject(
        SkipReason.CHANNEL_AXIS_MISMATCH,
        f"the map is on axis {source.axis} of the {op} input, whose input channels are on axis {want}",
    )


def _sized(source: Source, channels: int, op: str) -> fold_math.Affine | Reject:
    aff = source.widened(channels).affine
    if aff.channels != channels:
        return Reject(
            SkipReason.SHAPE_MISMATCH, f"the map has {aff.channels} channels, {op} reads {channels}"
        )
    return aff


def _cast(values: np.ndarray, like: np.ndarray, what: str) -> np.ndarray | Reject:
    out, why = fold_math.cast_exact(values, like.dtype, original=like)
    return out if out is not None else Reject(SkipReason.NOT_REPRESENTABLE, f"folding into {what}: {why}")


def _values(
    *writes: tuple[onnx.NodeProto, int, np.ndarray | Reject | None, str],
) -> tuple[NewValue, ...] | Reject:
    for w in writes:
        if isinstance(w[2], Reject):
            return w[2]
    return tuple(NewValue(n, i, v, k) for n, i, v, k in writes if isinstance(v, np.ndarray))


def _broadcast(scope: Scope, node: onnx.NodeProto) -> tuple[tuple[onnx.NodeProto, str, object], ...]:
    """Gemm before opset 7 broadcasts C only with ``broadcast=1``."""
    return ((node, "broadcast", 1),) if scope.index.opset < 7 else ()


def _padded(node: onnx.NodeProto) -> bool:
    auto = attr(node, "auto_pad", "NOTSET", "STRING")
    return auto in ("SAME_UPPER", "SAME_LOWER") or any(attr(node, "pads", [], "INTS"))


def _conv(scope: Scope, conv: onnx.NodeProto, source: Source) -> Plan | Reject:
    if (bad := _axis_problem(source, 1, "Conv")) is not None:
        return bad
    w = _weight(scope, conv, 1, "weight")
    if isinstance(w, Reject):
        return w
    if w.ndim < 3:
        return Reject(SkipReason.SHAPE_MISMATCH, f"weight has rank {w.ndim}, expected >= 3")
    groups = attr(conv, "group", 1, "INT")
    aff = _sized(source, w.shape[1] * groups, "Conv")
    if isinstance(aff, Reject):
        return aff
    if w.shape[0] % groups:
        return Reject(SkipReason.SHAPE_MISMATCH, f"weight {w.shape} does not split into {groups} groups")
    if _padded(conv) and np.any(aff.shift != 0):
        return Reject(
            SkipReason.FORWARD_PADDING,
            f"Conv {conv.name!r} zero-pads its input: the padded border never saw the map's shift, "
            "so only a map without shift folds forward into it",
        )
    w_new, why, delta = fold_math.forward_conv(w, aff, groups)
    if w_new is None:
        return Reject(SkipReason.NOT_REPRESENTABLE, f"folding into the weight: {why}")
    has_b = len(conv.input) > 2 and bool(conv.input[2])
    b = scope.constant(conv.input[2], what="bias") if has_b else None
    if b is not None and b.shape != (w.shape[0],):
        return Reject(SkipReason.SHAPE_MISMATCH, f"bias has shape {b.shape}, expected ({w.shape[0]},)")
    b_new = None
    if b is not None or np.any(delta):
        base = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        b_new = _cast(base + delta, b if b is not None else w, "the bias")
    values = _values(
        (conv, 1, None if w_new is w else w_new, "weight"),
        (conv, 2, b_new, "bias"),
    )
    if isinstance(values, Reject):
        return values
    return Plan(source=source, absorber=conv, chain=(conv,), values=values)


def _matrix(
    scope: Scope, node: onnx.NodeProto, source: Source, *, k_axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Reject:
    """``(B, B' (B itself when unscaled), t·B)`` for a Gemm/MatMul whose B has its K axis at ``k_axis``."""
    b = _weight(scope, node, 1, "weight (B)")
    if isinstance(b, Reject):
        return b
    if b.ndim != 2:
        return Reject(SkipReason.CHANNEL_AXIS_MISMATCH, f"B has rank {b.ndim}: no single input-feature axis")
    aff = _sized(source, b.shape[k_axis], node.op_type)
    if isinstance(aff, Reject):
        return aff
    b_new, why, delta = fold_math.forward_matrix(b, aff, k_axis=k_axis)
    if b_new is None:
        return Reject(SkipReason.NOT_REPRESENTABLE, f"folding into B: {why}")
    return b, b_new, delta


def _gemm(scope: Scope, gemm: onnx.NodeProto, source: Source) -> Plan | Reject:
    if attr(gemm, "transA", 0, "INT"):
        return Reject(SkipReason.UNSUPPORTED_ATTRIBUTE, "transA=1: the map is not on A's feature axis")
    if (bad := _axis_problem(source, 1, "Gemm")) is not None:
        return bad
    k_axis = 1 if attr(gemm, "transB", 0, "INT") else 0
    found = _matrix(scope, gemm, source, k_axis=k_axis)
    if isinstance(found, Reject):
        return found
    b, b_new, delta = found
    n = b.shape[1 - k_axis]
    c_vec = np.zeros(n)
    if len(gemm.input) > 2 and gemm.input[2]:
        c = fold_math.channel_vector(scope.constant(gemm.input[2], what="bias (C)"), n)
        if c is None:
            return Reject(SkipReason.BIAS_NOT_PER_CHANNEL, "C is not constant per output column")
        c_vec = c * float(np.float32(attr(gemm, "beta", 1.0, "FLOAT")))
    alpha = float(np.float32(attr(gemm, "alpha", 1.0, "FLOAT")))
    c_new = _cast(c_vec + alpha * delta, b, "C")
    values = _values((gemm, 1, None if b_new is b else b_new, "weight"), (gemm, 2, c_new, "bias"))
    if isinstance(values, Reject):
        return values
    attrs = ((gemm, "beta", 1.0), *_broadcast(scope, gemm))
    return Plan(source=source, absorber=gemm, chain=(gemm,), values=values, attrs=attrs)


def _matmul(scope: Scope, mm: onnx.NodeProto, source: Source) -> Plan | Reject:
    rank = scope.rank(mm.input[0])
    if rank is None or rank < 2:
        return Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH, f"rank of MatMul input {mm.input[0]!r} is not known to be >= 2"
        )
    if (bad := _axis_problem(source, rank - 1, "MatMul")) is not None:
        return bad
    found = _matrix(scope, mm, source, k_axis=0)
    if isinstance(found, Reject):
        return found
    b, b_new, delta = found
    c_new = _cast(delta, b, "the new bias")
    scaled = None if b_new is b else b_new
    if rank == 2:
        values = _values((mm, 1, scaled, "weight"), (mm, 2, c_new, "bias"))
        if isinstance(values, Reject):
            return values
        attrs = _broadcast(scope, mm)
        return Plan(source=source, absorber=mm, chain=(mm,), values=values, op_type=(mm, "Gemm"), attrs=attrs)
    if isinstance(c_new, np.ndarray) and not np.any(c_new):
        values = _values((mm, 1, scaled, "weight"))
        if isinstance(values, Reject):
            return values
        return Plan(source=source, absorber=mm, chain=(mm,), values=values)
    add = protos.make_node("Add", [mm.output[0], ""], [""])  # apply names it
    values = _values((mm, 1, scaled, "weight"), (add, 1, c_new, "bias"))
    if isinstance(values, Reject):
        return values
    return Plan(
        source=source, absorber=mm, chain=(mm, add), values=values, new_nodes=((add, mm),), final=mm.output[0]
    )
