"""A BatchNorm folded *forward*, into the Linear it feeds.

``BatchNorm1d`` on ``(N, F)`` followed by ``Linear`` is ``W (s * x + t) + b``, so
``W' = W diag(s)`` and ``b' = b + W t`` (:func:`bnfold.fold_math.forward_matrix`): exact, with no
padding question. The BN's axis 1 is the Linear's feature axis only on rank-2 input, which the
example inputs must prove (on ``(N, C, L)`` BatchNorm1d normalizes ``C`` while the Linear mixes
``L``). Used when nothing before the BN can absorb it (a model input, a ReLU, a Concat...).
"""

from __future__ import annotations

from torch import fx, nn

from ..report import Skipped, SkipReason
from .fuse import affine, fuse_forward
from .modules import bn_tensors, producer_base, weight_problem


def check_forward(
    node: fx.Node,
    bn: nn.Module,
    eps: float,
    *,
    prefix: str,
    mods: dict[str, nn.Module],
    ranks: set[int] | None,
) -> tuple[fx.Node, nn.Module, nn.Module] | Skipped | None:
    """``(linear node, linear, folded linear)``, a Skipped saying why the fold forward is refused,
    or None when the BN does not feed exactly one stock Linear."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    user = users[0]
    linear = mods.get(str(user.target))
    if linear is None or producer_base(linear) is not nn.Linear or user.args != (node,) or user.kwargs:
        return None
    lname, op = prefix + str(user.target), type(linear).__name__

    def skip(reason: SkipReason, detail: str) -> Skipped:
        return Skipped(
            bn=prefix + str(node.target), reason=reason, detail=detail, producer=lname, producer_op=op
        )

    problem = weight_problem(linear, lname)
    if problem is not None:
        return skip(*problem)
    if linear.in_features != bn.running_mean.numel():
        return skip(
            SkipReason.SHAPE_MISMATCH,
            f"{lname} has {linear.in_features} input features, the BatchNorm {bn.running_mean.numel()}",
        )
    if ranks != {2}:
        why = (
            f"the BatchNorm's input has rank {max(ranks)}: its axis 1 is not {lname}'s feature axis"
            if ranks
            else f"rank of the BatchNorm's input is unknown; pass example_inputs to fold it forward into {lname}"
        )
        return skip(SkipReason.CHANNEL_AXIS_MISMATCH, why)
    fused = fuse_forward(linear, affine(bn_tensors(bn), eps))
    if isinstance(fused, str):
        return skip(SkipReason.NOT_REPRESENTABLE, fused)
    return user, linear, fused
