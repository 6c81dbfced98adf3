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

import onnx

from ..report import Folded, FoldReport, Skipped, SkipReason
from .absorb import find_layer, plan_into
from .graph import ModelIndex, Scope, collect_scopes, walk_graphs
from .plan import Reject
from .rewrite import apply, flush, remove_dead
from .sources import bn_label, bn_problem, bn_source, is_batchnorm

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
    """Fold the BN nodes of one scope to a fixed point; return the folds and the final skips."""
    folded: list[Folded] = []
    while True:
        skipped: list[Skipped] = []
        for bn in [n for n in scope.nodes if is_batchnorm(n)]:
            outcome = try_fold(scope, bn)
            if isinstance(outcome, Folded):
                folded.append(outcome)
                log.debug("folded %s into %s", outcome.bn, outcome.producer)
            else:
                skipped.append(outcome)
        progress = bool(scope.doomed)
        flush(scope)
        if not progress:
            return folded, skipped


def try_fold(scope: Scope, bn: onnx.NodeProto) -> Folded | Skipped:
    """Fold ``bn`` into the layer that produces its input, or say why not.

    Handles: Conv (any group, with/without bias), ConvTranspose (any group), Gemm (transB,
    alpha, beta, C absent/scalar/(N,)/(1,N)), MatMul and MatMul->Add with a rank-2 output.
    """
    label = bn_label(bn)
    out = bn.output[0]

    def skip(r: Reject) -> Skipped:
        node = r.node
        return Skipped(
            bn=label,
            reason=r.reason,
            detail=r.detail,
            output=out,
            graph=scope.label,
            producer=node.name if node is not None else "",
            producer_op=node.op_type if node is not None else "",
        )

    if out in scope.index.exclude:
        return skip(Reject(SkipReason.EXCLUDED, "excluded by the caller"))
    if (problem := bn_problem(scope, bn)) is not None:
        return skip(problem)
    layer = find_layer(scope, bn.input[0])
    if isinstance(layer, Reject):
        return skip(layer)
    source = bn_source(scope, bn)
    if isinstance(source, Reject):
        return skip(Reject(source.reason, source.detail, layer))
    plan = plan_into(scope, layer, source)
    if isinstance(plan, Reject):
        return skip(plan)
    new_names = apply(scope, plan)
    absorber = plan.absorber
    return Folded(
        bn=label,
        producer=absorber.name or absorber.op_type,
        producer_op=absorber.op_type,
        output=out,
        graph=scope.label,
        new_initializers=tuple(new_names),
    )
