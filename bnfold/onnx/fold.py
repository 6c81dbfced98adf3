"""The ONNX pass: fold inference-mode BatchNormalization into the layer that produces its input.

For every scope (the main graph, If/Loop/Scan bodies with outer-scope constants, model-local
functions), :func:`try_fold` turns each BN into a source (:mod:`.sources`), asks the
producing layer's check for a plan (:mod:`.absorb`) and applies it (:mod:`.rewrite`), or
reports why not. Rounds repeat until nothing folds, so ``Conv -> BN -> BN`` folds both and a
second run finds nothing. What folding left dead (constant chains, initializers) is removed at
the end. The pass mutates the model it is given; it never verifies (see ``bnfold.api``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..fold_math import Affine
from ..report import Folded, FoldReport, Skipped, SkipReason
from .absorb import find_layer, plan_into
from .graph import ModelIndex, Scope, collect_scopes, node_id, walk_graphs
from .plan import Plan, Reject, Source
from .rewrite import apply, flush, remove_dead
from .sources import (
    Step,
    bn_label,
    bn_problem,
    bn_source,
    chain_kind,
    chain_source,
    chain_steps,
    is_batchnorm,
)

log = logging.getLogger(__name__)


def fold_model(
    model: onnx.ModelProto, *, base_dir: str | None = None, exclude: frozenset[str] = frozenset()
) -> FoldReport:
    """Fold every foldable BN of ``model`` in place; ``exclude`` lists BN output names to leave.

    ``base_dir`` is where external data (or lazy stubs) are read from.
    """
    index = ModelIndex(model, base_dir, frozenset(exclude))
    folded: list[Folded] = []
    skipped: list[Skipped] = []
    scopes = collect_scopes(index)
    for scope in scopes:
        f_list, s_list = fold_scope(scope)
        folded.extend(f_list)
        skipped.extend(s_list)
    remove_dead(scopes)
    return FoldReport(folded=tuple(folded), skipped=tuple(skipped))


def count_bn(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes in the model, subgraphs and functions included."""
    return sum(1 for site in walk_graphs(model) for node in site.body.node if is_batchnorm(node))


def fold_scope(scope: Scope) -> tuple[list[Folded], list[Skipped]]:
    """Fold the sources of one scope to a fixed point; return the folds and the final skips."""
    folded: list[Folded] = []
    while True:
        skipped: list[Skipped] = []
        consumers = scope.consumers()
        for node in list(scope.nodes):
            if node_id(node) in scope.doomed:
                continue
            if is_batchnorm(node):
                outcome: Folded | Skipped | None = try_fold(scope, node)
            else:
                steps = chain_steps(scope, node, consumers)
                outcome = None if steps is None else try_fold_chain(scope, steps)
            if isinstance(outcome, Folded):
                folded.append(outcome)
                log.debug("folded %s into %s", outcome.bn, outcome.producer)
            elif outcome is not None:
                skipped.append(outcome)
        progress = bool(scope.doomed)
        flush(scope)
        if not progress:
            return folded, skipped


def _skipped(scope: Scope, source_kind: str, label: str, out: str, r: Reject) -> Skipped:
    node = r.node
    return Skipped(
        bn=label,
        reason=r.reason,
        detail=r.detail,
        output=out,
        graph=scope.label,
        producer=node.name if node is not None else "",
        producer_op=node.op_type if node is not None else "",
        source=source_kind,
    )


def _folded(scope: Scope, plan: Plan, new_names: list[str]) -> Folded:
    absorber = plan.absorber
    return Folded(
        bn=plan.source.label,
        producer=absorber.name or absorber.op_type,
        producer_op=absorber.op_type,
        output=plan.source.output,
        graph=scope.label,
        new_initializers=tuple(new_names),
        source=plan.source.kind,
        direction=plan.direction,
        through=plan.through,
    )


def try_fold(scope: Scope, bn: onnx.NodeProto) -> Folded | Skipped:
    """Fold ``bn`` into the layer that produces its input, or say why not.

    Handles: Conv (any group, with/without bias), ConvTranspose (any group), Gemm (transB,
    alpha, beta, C absent/scalar/(N,)/(1,N)), MatMul and MatMul->Add with a constant B, through
    Identity/Dropout/Transpose/Reshape/Flatten/Squeeze/Unsqueeze (see :mod:`.paths`).
    """
    label = bn_label(bn)
    out = bn.output[0]

    def skip(r: Reject) -> Skipped:
        return _skipped(scope, "batchnorm", label, out, r)

    if out in scope.index.exclude:
        return skip(Reject(SkipReason.EXCLUDED, "excluded by the caller"))
    if (problem := bn_problem(scope, bn)) is not None:
        return skip(problem)
    axis_only = Source("batchnorm", label, bn.input[0], out, Affine(np.ones(1), np.zeros(1)), (bn,))
    found = find_layer(scope, axis_only)
    if isinstance(found, Reject):
        return skip(found)
    layer, route = found
    source = bn_source(scope, bn)
    if isinstance(source, Reject):
        return skip(Reject(source.reason, source.detail, layer))
    plan = plan_into(scope, layer, route, source)
    if isinstance(plan, Reject):
        return skip(plan)
    return _folded(scope, plan, apply(scope, plan))


# Refusals of a Mul/Add chain that say something about the chain itself; other refusals (no
# layer before it, a layer with run-time weights...) mean it is simply not a fold candidate.
_CHAIN_REASONS = {
    SkipReason.NOT_PER_CHANNEL,
    SkipReason.CONSTANT_ON_LAST_AXIS,
    SkipReason.DIVISION_BY_ZERO,
    SkipReason.CHANNEL_AXIS_MISMATCH,
    SkipReason.SHAPE_MISMATCH,
    SkipReason.BIAS_NOT_PER_CHANNEL,
    SkipReason.NOT_REPRESENTABLE,
    SkipReason.UNSUPPORTED_DTYPE,
}


def try_fold_chain(scope: Scope, steps: list[Step]) -> Folded | Skipped | None:
    """Fold a chain of Mul/Add/Sub/Div by per-channel constants into the layer before it.

    Returns None when the chain is not a candidate (no absorbing layer before it, a MatMul
    followed by a bias Add alone, which stays as it is); a Skipped only for refusals about the
    chain's own shape (:data:`_CHAIN_REASONS`) after a layer that could otherwise absorb it.
    """
    head = steps[0].node
    out = steps[-1].node.output[0]
    label = head.name or f"{head.op_type}({head.output[0]})"
    kind = chain_kind(steps)
    probe = Source(kind, label, steps[0].activation, out, Affine(np.ones(1), np.zeros(1)), (), axis=None)
    found = find_layer(scope, probe)
    if isinstance(found, Reject):
        return None
    layer, _ = found
    if kind == "bias add" and layer.op_type in ("MatMul", "Add"):
        return None
    if out in scope.index.exclude:
        return _skipped(scope, kind, label, out, Reject(SkipReason.EXCLUDED, "excluded by the caller"))
    source = chain_source(scope, steps)
    if isinstance(source, Reject):
        return _skipped(scope, kind, label, out, Reject(source.reason, source.detail, layer))
    found = find_layer(scope, source)
    if isinstance(found, Reject):
        return _skipped(scope, kind, label, out, found) if found.reason in _CHAIN_REASONS else None
    layer, route = found
    plan = plan_into(scope, layer, route, source)
    if isinstance(plan, Reject):
        return _skipped(scope, kind, label, out, plan) if plan.reason in _CHAIN_REASONS else None
    return _folded(scope, plan, apply(scope, plan))
