"""A BatchNorm folded *forward*, into the Linear it feeds.

``BatchNorm1d`` on ``(N, F)`` followed by ``Linear`` is ``W (s * x + t) + b``, so
``W' = W diag(s)`` and ``b' = b + W t`` (:func:`bnfold.fold_math.forward_matrix`): exact, with no
padding question. Between the BN and the Linear there may be ops that do not change values:
``Dropout`` (the fold is of inference behaviour), ``Identity``, and a flatten of every axis but
the batch (``nn.Flatten``, ``x.flatten(1)``, ``x.reshape(N, -1)``...), as in the
BatchNorm2d -> Dropout -> Flatten -> Linear heads of face-recognition models. Flattening
``(N, C, *S)`` puts channel ``c`` on features ``c*P ... (c+1)*P - 1`` with ``P = prod(S)``, so
the Linear sees the map with each channel's scale and shift repeated ``P`` times.

The example inputs must prove that layout: the BN's output is ``(N, C, *S)`` and the Linear's
input ``(N, C*P)`` on every run (on ``(N, C, L)`` without a flatten, BatchNorm1d normalizes
``C`` while the Linear mixes ``L``). Used when nothing before the BN can absorb it (a model
input, a ReLU, a Concat...).
"""

from __future__ import annotations

import math

import numpy as np
from torch import fx, nn

from .. import fold_math
from ..report import Skipped, SkipReason
from .fuse import affine, fuse_forward
from .modules import bn_tensors, producer_base, weight_problem
from .paths import look_through_op, metadata_only

_PASS_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
)


def check_forward(
    node: fx.Node,
    bn: nn.Module,
    eps: float,
    *,
    prefix: str,
    mods: dict[str, nn.Module],
    shapes: dict[str, list[tuple[int, ...]]],
) -> tuple[fx.Node, nn.Module, nn.Module, tuple[str, ...]] | Skipped | None:
    """``(linear node, linear, folded linear, ops looked through)``, a Skipped saying why the fold
    forward is refused, or None when the BN does not feed exactly one stock Linear."""
    cur, through = node, []
    while len(readers := _readers(cur)) == 1:
        step = _pass_through(readers[0], cur, mods)
        if step is None:
            break
        through.append(step)
        cur = readers[0]
    if len(readers) != 1:
        return None
    (user,) = readers
    linear = mods.get(str(user.target)) if user.op == "call_module" else None
    if linear is None or producer_base(linear) is not nn.Linear or user.args != (cur,) or user.kwargs:
        return None
    lname, op = prefix + str(user.target), type(linear).__name__

    def skip(reason: SkipReason, detail: str) -> Skipped:
        return Skipped(
            bn=prefix + str(node.target), reason=reason, detail=detail, producer=lname, producer_op=op
        )

    problem = weight_problem(linear, lname)
    if problem is not None:
        return skip(*problem)
    repeat = _feature_repeat(shapes.get(node.name), shapes.get(cur.name))
    if isinstance(repeat, str):
        return skip(
            SkipReason.CHANNEL_AXIS_MISMATCH, f"{repeat}, so it cannot be folded forward into {lname}"
        )
    channels = bn.running_mean.numel()
    if linear.in_features != channels * repeat:
        return skip(
            SkipReason.SHAPE_MISMATCH,
            f"{lname} has {linear.in_features} input features for {channels} channels x {repeat}",
        )
    aff = affine(bn_tensors(bn), eps)
    if repeat > 1:
        aff = fold_math.Affine(scale=np.repeat(aff.scale, repeat), shift=np.repeat(aff.shift, repeat))
    fused = fuse_forward(linear, aff)
    if isinstance(fused, str):
        return skip(SkipReason.NOT_REPRESENTABLE, fused)
    return user, linear, fused, tuple(through)


def _readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not metadata_only(u, node)]


def _pass_through(user: fx.Node, cur: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    """The name of ``user`` when it passes ``cur``'s values on unchanged (up to a reshape)."""
    if user.op == "call_module" and isinstance(mods.get(str(user.target)), _PASS_MODULES):
        return type(mods[str(user.target)]).__name__ if user.args == (cur,) and not user.kwargs else None
    look = look_through_op(user)
    return look if look is not None and user.args[0] is cur else None


def _feature_repeat(before: list | None, after: list | None) -> int | str:
    """``P`` when every run flattens the BN's ``(N, C, *S)`` to the Linear's ``(N, C*P)``, else why not."""
    if not before or not after or len(before) != len(after):
        return "the rank of the BatchNorm's input is unknown; pass example_inputs"
    repeats = set()
    for s_in, s_out in zip(before, after):
        if len(s_out) != 2 or len(s_in) < 2 or s_out != (s_in[0], math.prod(s_in[1:])):
            shown = (
                f"{list(s_in)} reaches the Linear as {list(s_out)}" if s_in != s_out else f"rank {len(s_in)}"
            )
            return f"the BatchNorm's axis 1 is not the Linear's feature axis ({shown})"
        repeats.add(math.prod(s_in[2:]))
    if len(repeats) != 1:
        return f"the BatchNorm's channels reach the Linear with {sorted(repeats)} features each on different runs"
    return repeats.pop()
