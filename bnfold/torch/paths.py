"""What may stand between a layer and its BatchNorm in a traced graph, and which other uses of a
tensor a fold does not disturb.

- A *look-through* op (``x.flatten(...)``, ``x.reshape(...)``, ``x.view(...)``, ``torch.flatten``,
  ``torch.reshape``) between the layer and the BN is exact when it provably moves the layer's
  channel axis onto the BN's axis 1. Row-major reshapes keep ``(before, channel, after)`` apart
  when the output is ``(prod(before), C, ...)`` with ``prod(...) == prod(after)``: element
  ``(i, c, j)`` lands at ``(i, c, j')``. That is LeViT's linear-norm block, ``bn(linear(x).flatten(0, 1))``
  on ``(B, N, C)``. It is proven from the shapes the example inputs produce; without them the
  op is refused (``AXIS_NOT_PRESERVED``).
- A *metadata* use reads only a tensor's shape, rank, dtype or device (``x.shape``, ``x.size()``,
  ``y.reshape_as(x)``): folding changes values, never metadata, so such uses may stay.
"""

from __future__ import annotations

import math

import torch
from torch import fx

_LOOK_METHODS = frozenset({"flatten", "reshape", "view"})
_LOOK_FUNCTIONS = {torch.flatten: "flatten", torch.reshape: "reshape"}
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})
_META_METHODS = frozenset({"size", "dim", "numel"})
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})


def look_through_op(node: fx.Node) -> str | None:
    """The op's name when ``node`` is a reshape-like op on a tensor node, else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_method" and node.target in _LOOK_METHODS:
        return str(node.target)
    if node.op == "call_function" and node.target in _LOOK_FUNCTIONS:
        return _LOOK_FUNCTIONS[node.target]
    return None


def metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s metadata."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _META_ATTRS
    if user.op == "call_method" and user.target in _META_METHODS:
        return user.args[0] is node
    if user.op == "call_method" and user.target in _LIKE_METHODS:
        return user.args[0] is not node and node in user.args[1:]
    return False


def channel_kept(before: tuple[int, ...], after: tuple[int, ...], axis: int) -> bool:
    """Whether a row-major reshape ``before -> after`` puts axis ``axis`` of ``before`` at axis 1."""
    if len(after) < 2 or not 0 <= axis < len(before):
        return False
    return (
        after[1] == before[axis]
        and after[0] == math.prod(before[:axis])
        and math.prod(after[2:]) == math.prod(before[axis + 1 :])
    )
