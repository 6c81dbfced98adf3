"""Ops a per-channel map can be looked through, and where they move its channel axis.

Between a layer and a map (a BN, a Mul/Add chain) converters put ops that only move or
rename elements: Identity, Dropout in inference, Transpose (tf2onnx's NHWC wrappers), Reshape,
Flatten, Squeeze, Unsqueeze (LeViT's Linear -> Reshape -> BN). The map folds into the layer
when each op's output feeds only the next op and the map's channel axis lands on the layer's
channel axis:

- Identity, Dropout: the same axis.
- Transpose(perm): output axis ``a`` is input axis ``perm[a]``; permutations compose, so
  ``Transpose(0,2,3,1) -> Transpose(0,3,1,2)`` maps axis 1 to axis 1.
- Reshape, Flatten, Squeeze, Unsqueeze: output axis ``a`` is input axis ``b`` when both static
  shapes agree that ``dim_out[a] == dim_in[b]`` and the dimensions before them hold the same
  number of elements (row-major order then gives every element the same channel index).
  Symbolic dimensions count by name; anything unknown is refused with ``axis-not-preserved``.

A map by scalars has no axis and passes any of these ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnfold.onnxlib import onnx

from ..report import SkipReason
from .attrs import attr
from .graph import Scope, Shape, is_op
from .plan import Reject

LOOK_THROUGH = ("Identity", "Dropout", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class Route:
    """The path from a layer's output (``top``) down to a map's input, in data order."""

    top: str
    path: tuple[onnx.NodeProto, ...]
    axis: int | None
    """The map's channel axis on ``top``."""

    @property
    def through(self) -> tuple[str, ...]:
        return tuple(n.op_type for n in self.path)


def walk_back(scope: Scope, x: str, axis: int | None) -> Route | Reject:
    """Follow ``x`` up through look-through ops to the first other producer."""
    path: list[onnx.NodeProto] = []
    while True:
        node = scope.producer.get(x)
        if node is None or not is_op(node, *LOOK_THROUGH) or not passes(scope, node):
            return Route(top=x, path=tuple(reversed(path)), axis=axis)
        if not scope.single_use(x):
            return Reject(
                SkipReason.PRODUCER_OUTPUT_SHARED,
                f"{node.op_type} output {x!r} between the layer and the map also feeds other nodes "
                "or is a graph output",
                node,
            )
        if axis is not None:
            mapped = _axis_before(scope, node, axis)
            if isinstance(mapped, Reject):
                return mapped
            axis = mapped
        path.append(node)
        x = node.input[0]


def passes(scope: Scope, node: onnx.NodeProto) -> bool:
    """Whether ``node`` only moves elements: Dropout only in inference with its mask unused."""
    if node.op_type != "Dropout":
        return True
    if any(o and scope.uses(o) > 0 for o in node.output[1:]):
        return False
    if scope.index.opset <= 6:
        return attr(node, "is_test", 0, "INT") == 1
    if len(node.input) > 2 and node.input[2]:
        try:
            return not bool(scope.constant(node.input[2], what="Dropout training_mode").reshape(-1)[0])
        except Exception:  # noqa: BLE001 - a run-time training flag: not an inference Dropout
            return False
    return True


def _axis_before(scope: Scope, node: onnx.NodeProto, axis: int) -> int | Reject:
    """The input axis of ``node`` that its output ``axis`` comes from, or why none provably does."""
    if node.op_type in ("Identity", "Dropout"):
        return axis
    if node.op_type == "Transpose":
        perm = attr(node, "perm", None, "INTS")
        rank = len(perm) if perm is not None else scope.rank(node.input[0])
        if rank is None:
            return _not_preserved(node, "its rank is unknown")
        perm = list(perm) if perm is not None else list(reversed(range(rank)))
        return int(perm[axis])
    s_in, s_out = scope.shape(node.input[0]), scope.shape(node.output[0])
    if s_in is None or s_out is None:
        return _not_preserved(node, "its shapes are not known statically")
    b = map_axis(s_out, axis, s_in)
    if b is None:
        return _not_preserved(
            node, f"axis {axis} of {_fmt(s_out)} is not one axis of the input {_fmt(s_in)} (merged or split)"
        )
    return b


def map_axis(s_from: Shape, a: int, s_to: Shape) -> int | None:
    """The axis ``b`` of ``s_to`` holding the same elements as axis ``a`` of ``s_from`` in
    row-major order: equal dimension and equal element count before it; None when unproven."""
    if not 0 <= a < len(s_from) or s_from[a] is None:
        return None
    want = _count(s_from[:a])
    if want is None:
        return None
    for b in range(len(s_to)):
        if s_to[b] == s_from[a] and _count(s_to[:b]) == want:
            return b
    return None


def _count(dims: Shape) -> tuple[int, tuple[str, ...]] | None:
    """The element count of ``dims`` as (product of known sizes, sorted symbolic names)."""
    if any(d is None for d in dims):
        return None
    ints = [d for d in dims if isinstance(d, int)]
    names = sorted(d for d in dims if isinstance(d, str))
    return math.prod(ints), tuple(names)


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _not_preserved(node: onnx.NodeProto, why: str) -> Reject:
    return Reject(
        SkipReason.AXIS_NOT_PRESERVED,
        f"the channel axis cannot be followed through {node.op_type} {node.name!r}: {why}",
        node,
    )
