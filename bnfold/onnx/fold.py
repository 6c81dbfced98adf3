"""The ONNX pass: fold per-channel affine maps into the layers next to them.

Sources (:mod:`.sources`): inference-mode BatchNormalization, and chains of Mul/Add/Sub/Div
by per-channel constants (a chain of ``+ c`` alone is a bias Add). For each, in graph order:

1. backward into the layer producing its input (:mod:`.absorb`), looking through Identity,
   Dropout, Transpose, Reshape, Flatten, Squeeze, Unsqueeze (:mod:`.paths`); a BN after a
   channel Concat is split per branch (:mod:`.concat`);
2. else forward into the Gemm, MatMul or unpadded Conv it feeds (:mod:`.forward`);
3. else it is left, with a reason (every BN; a chain only when the refusal is about its own
   shape: a (C,) constant on a 4-D tensor, (1,C,H,W), a division by zero...).

Checks are pure and return a plan; :func:`~.rewrite.apply` does all surgery under the name
rule. Every scope (the main graph, If/Loop/Scan bodies with outer-scope constants,
model-local functions) runs to a fixed point, so ``Conv -> BN -> BN`` folds both and a second
run finds nothing; what folding left dead is removed at the end. The pass mutates the model it
is given and never verifies (``bnfold.api`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from bnfold.onnxlib import onnx

from ..fold_math import Affine
from ..fold_optimistic import undecided_folds
from ..report import Folded, FoldReport, Skipped, SkipReason
from .absorb import find_layer, plan_into
from .concat import is_concat, plan_concat
from .forward import plan_forward, walk_forward
from .graph import ModelIndex, Scope, collect_scopes, node_id, walk_graphs
from .io.validate import check_arity
from .plan import Plan, Reject, Source
from .rewrite import apply, flush, remove_dead
from .sources import (
    AFFINE_OPS,
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
    model: onnx.ModelProto,
    *,
    base_dir: str | None = None,
    exclude: frozenset[str] = frozenset(),
    optimistic: bool = False,
) -> FoldReport:
    """Fold every foldable BN of ``model`` in place; ``exclude`` lists BN output names to leave.

    ``base_dir`` is where external data (or lazy stubs) are read from. A node without the
    inputs or outputs its operator requires raises InputError (:func:`check_arity`).

    ``optimistic``: large folds into weights in files are left undecided and checked where they
    are computed (:mod:`bnfold.fold_optimistic`); the model must then be saved, and a
    :class:`~bnfold.fold_math.Undecided` from the pass or the save means: fold a fresh copy
    again without it. Only a caller that does so (``bnfold.api.fold_path``) may pass True.
    """
    check_arity(model)
    index = ModelIndex(model, base_dir, frozenset(exclude))
    folded: list[Folded] = []
    skipped: list[Skipped] = []
    scopes = collect_scopes(index)
    with undecided_folds(optimistic) as tickets:
        for scope in scopes:
            f_list, s_list = fold_scope(scope)
            folded.extend(f_list)
            skipped.extend(s_list)
        remove_dead(scopes)
        if tickets is not None and tickets.items:
            tickets.settle(_written_tickets(scopes))
    return FoldReport(folded=tuple(folded), skipped=tuple(skipped))


def _written_tickets(scopes: list[Scope]) -> set[int]:
    """The ids of the undecided recipes' tickets held by initializers still in the model (a
    save computes and checks them)."""
    from .io import scaled_of  # lazy: only a fold into weights in files has tickets

    out: set[int] = set()
    for scope in scopes:
        if scope.graph is None:
            continue
        for t in scope.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                recipe = scaled_of(t)
                if recipe is not None and recipe.ticket is not None:
                    out.add(id(recipe.ticket))
    return out


def count_bn(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes in the model, subgraphs and functions included."""
    return sum(1 for site in walk_graphs(model) for node in site.body.node if is_batchnorm(node))


_NO_MAP = Affine(np.ones(1), np.zeros(1))
"""The identity map: a probe source that only asks where a layer is."""

SOURCE_OPS = frozenset({"BatchNormalization", *AFFINE_OPS})


class Consumers(Mapping[str, Sequence[onnx.NodeProto]]):
    """The scope's name -> readers map, built on first use in a round (most BN never need it)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope
        self._map: dict[str, list[onnx.NodeProto]] | None = None

    def _built(self) -> dict[str, list[onnx.NodeProto]]:
        if self._map is None:
            self._map = self._scope.consumers()
        return self._map

    def __getitem__(self, name: str) -> Sequence[onnx.NodeProto]:
        return self._built()[name]

    def __iter__(self):
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def fold_scope(scope: Scope) -> tuple[list[Folded], list[Skipped]]:
    """Fold the sources of one scope to a fixed point; return the folds and the final skips."""
    folded: list[Folded] = []
    while True:
        skipped: list[Skipped] = []
        consumers = Consumers(scope)
        for node in list(scope.nodes):
            if node.op_type not in SOURCE_OPS or (scope.doomed and node_id(node) in scope.doomed):
                continue
            if is_batchnorm(node):
                outcome: Folded | Skipped | None = try_fold(scope, node, consumers)
            else:
                steps = chain_steps(scope, node, consumers)
                outcome = None if steps is None else try_fold_chain(scope, steps, consumers)
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


def _apply(scope: Scope, plan: Plan) -> Folded:
    """Apply ``plan`` and report it. The absorber is reported by its op type before the fold: a
    MatMul that became a Gemm is reported as the MatMul the user's model has."""
    absorber = plan.absorber
    op_type = absorber.op_type
    new_names = apply(scope, plan)
    return Folded(
        bn=plan.source.label,
        producer=absorber.name or op_type,
        producer_op=op_type,
        output=plan.source.output,
        graph=scope.label,
        new_initializers=tuple(new_names),
        source=plan.source.kind,
        direction=plan.direction,
        through=plan.through,
    )


def try_fold(
    scope: Scope, bn: onnx.NodeProto, consumers: Mapping[str, Sequence[onnx.NodeProto]] | None = None
) -> Folded | Skipped:
    """Fold ``bn`` into the layer that produces its input, else forward into the layer it feeds,
    or say why not.

    Backward: Conv (any group, with/without bias), ConvTranspose (any group), Gemm (transB,
    alpha, beta, C absent/scalar/(N,)/(1,N)), MatMul and MatMul->Add with a constant B, through
    Identity/Dropout/Transpose/Reshape/Flatten/Squeeze/Unsqueeze (see :mod:`.paths`). Forward:
    Gemm, MatMul, unpadded Conv (see :mod:`.forward`). The reason reported is the backward one,
    unless nothing upstream could take the map and a layer downstream refused it.
    """
    label = bn_label(bn)
    out = bn.output[0]

    def skip(r: Reject) -> Skipped:
        return _skipped(scope, "batchnorm", label, out, r)

    if out in scope.index.exclude:
        return skip(Reject(SkipReason.EXCLUDED, "excluded by the caller"))
    if (problem := bn_problem(scope, bn)) is not None:
        return skip(problem)
    axis_only = Source("batchnorm", label, bn.input[0], out, _NO_MAP, (bn,))
    found = find_layer(scope, axis_only)
    source = bn_source(scope, bn)
    if isinstance(source, Reject):
        return skip(found if isinstance(found, Reject) else Reject(source.reason, source.detail, found[0]))
    backward = found if isinstance(found, Reject) else plan_into(scope, found[0], found[1], source)
    if isinstance(backward, Reject) and is_concat(backward.node):
        backward = plan_concat(scope, source) or backward
    if isinstance(backward, Plan):
        return _apply(scope, backward)
    forward = _forward(scope, source, consumers)
    if isinstance(forward, Plan):
        return _apply(scope, forward)
    upstream_empty = backward.reason in (SkipReason.NO_PRODUCER, SkipReason.UNSUPPORTED_PRODUCER)
    return skip(forward if forward is not None and upstream_empty else backward)


def _forward(
    scope: Scope, source: Source, consumers: Mapping[str, Sequence[onnx.NodeProto]] | None
) -> Plan | Reject | None:
    """The forward plan for ``source``, a refusal by the layer it feeds, or None (feeds none alone)."""
    route = walk_forward(scope, source, consumers if consumers is not None else scope.consumers())
    if route is None or isinstance(route, Reject):
        return route
    return plan_forward(scope, route, source)


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


def try_fold_chain(
    scope: Scope, steps: list[Step], consumers: Mapping[str, Sequence[onnx.NodeProto]] | None = None
) -> Folded | Skipped | None:
    """Fold a chain of Mul/Add/Sub/Div by per-channel constants into the layer before it.

    Returns None when the chain is not a candidate (no absorbing layer before it, a MatMul
    followed by a bias Add alone, which stays as it is); a Skipped only for refusals about the
    chain's own shape (:data:`_CHAIN_REASONS`) after a layer that could otherwise absorb it.
    """
    head = steps[0].node
    out = steps[-1].node.output[0]
    label = head.name or f"{head.op_type}({head.output[0]})"
    kind = chain_kind(steps)
    probe = Source(kind, label, steps[0].activation, out, _NO_MAP, (), axis=None)
    found = find_layer(scope, probe)
    if isinstance(found, Reject):
        return _chain_forward(scope, steps, consumers)
    layer, _ = found
    if kind == "bias add" and layer.op_type in ("MatMul", "Add"):
        return None
    if out in scope.index.exclude:
        return _skipped(scope, kind, label, out, Reject(SkipReason.EXCLUDED, "excluded by the caller"))
    source = chain_source(scope, steps)
    if source is None:
        return None
    if isinstance(source, Reject):
        return _skipped(scope, kind, label, out, Reject(source.reason, source.detail, layer))
    found = find_layer(scope, source)
    if isinstance(found, Reject):
        return _skipped(scope, kind, label, out, found) if found.reason in _CHAIN_REASONS else None
    layer, route = found
    plan = plan_into(scope, layer, route, source)
    if isinstance(plan, Reject):
        return _skipped(scope, kind, label, out, plan) if plan.reason in _CHAIN_REASONS else None
    return _apply(scope, plan)


def _chain_forward(
    scope: Scope, steps: list[Step], consumers: Mapping[str, Sequence[onnx.NodeProto]] | None
) -> Folded | None:
    """A chain with no layer before it, folded forward into the layer it feeds when that is
    exact; silent otherwise (input normalisation before a padded Conv is no fold candidate)."""
    source = chain_source(scope, steps)
    if not isinstance(source, Source):
        return None
    plan = _forward(scope, source, consumers)
    return _apply(scope, plan) if isinstance(plan, Plan) else None
