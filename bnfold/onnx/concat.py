"""A BN after a channel Concat, split per branch (MixNet's mixed-kernel depthwise convs).

``BN(Concat_1(x_1, ..., x_n))`` is ``Concat_1(BN_1(x_1), ..., BN_n(x_n))`` with ``BN_i`` the
BN's parameters for the channels ``x_i`` contributes. Each part folds backward into the layer
producing ``x_i`` when every ``x_i`` feeds only the Concat (a branch read elsewhere would
change for its other reader) and every part folds; otherwise nothing is folded. The branch
outputs and the Concat's output change values, so the branches write fresh names and the
Concat writes the BN's output name.
"""

from __future__ import annotations

from dataclasses import replace

from bnfold.onnxlib import onnx

from ..fold_math import Affine
from ..report import SkipReason
from .absorb import find_layer, plan_into
from .attrs import attr
from .graph import Scope
from .paths import walk_back
from .plan import Plan, Reject, Source


def plan_concat(scope: Scope, source: Source) -> Plan | Reject | None:
    """The split plan when ``source`` (on axis 1) reads a channel Concat, a refusal, or None
    when its input does not come from a Concat."""
    route = walk_back(scope, source.input, source.axis)
    if isinstance(route, Reject):
        return None
    concat = scope.producer.get(route.top)
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        return None
    axis = attr(concat, "axis", 1, "INT")
    rank = scope.rank(route.top) if axis < 0 else None  # shapes only when needed: they cost an import
    if rank is not None:
        axis += rank
    if route.axis != 1 or axis != 1:
        return Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            f"Concat {concat.name!r} joins axis {axis}, not the channel axis",
        )
    if not scope.single_use(route.top):
        return Reject(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"Concat output {route.top!r} also feeds other nodes or is a graph output",
            concat,
        )
    for x in concat.input:  # a branch no layer can take refuses the split before any shape is asked
        found = find_layer(scope, replace(source, input=x, output=x, nodes=(), axis=1))
        if isinstance(found, Reject):
            return Reject(found.reason, f"branch {x!r} of Concat {concat.name!r}: {found.detail}", found.node)
    widths = []
    for x in concat.input:
        shape = scope.shape(x)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            return Reject(
                SkipReason.SHAPE_MISMATCH, f"the channel count of Concat input {x!r} is not known", concat
            )
        widths.append(shape[1])
    if sum(widths) != source.affine.channels:
        return Reject(
            SkipReason.SHAPE_MISMATCH,
            f"the Concat joins {sum(widths)} channels, the BN has {source.affine.channels}",
            concat,
        )
    branches = []
    start = 0
    for x, width in zip(concat.input, widths):
        part = Affine(source.affine.scale[start : start + width], source.affine.shift[start : start + width])
        start += width
        sub = replace(source, input=x, output=x, affine=part, nodes=(), axis=1)
        found = find_layer(scope, sub)
        if isinstance(found, Reject):
            return Reject(found.reason, f"branch {x!r} of Concat {concat.name!r}: {found.detail}", found.node)
        plan = plan_into(scope, found[0], found[1], sub)
        if isinstance(plan, Reject):
            return Reject(plan.reason, f"branch {x!r} of Concat {concat.name!r}: {plan.detail}", plan.node)
        branches.append(plan)
    return Plan(
        source=source,
        absorber=concat,
        chain=(concat, *route.path),
        values=(),
        branches=tuple(branches),
        through=("Concat", *route.through),
    )


def is_concat(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Concat" and node.domain in ("", "ai.onnx")
