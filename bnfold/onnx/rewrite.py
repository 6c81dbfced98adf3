"""All graph surgery: ``apply(plan)`` and the removal of what folding left dead.

**The name rule.** After :func:`apply`, every tensor name that existed before either holds the
same values or no longer exists. The plan's ``chain`` lists every node whose output values
change; the last one writes the source's output name (whose values are what the source
computed), every other changed output gets a fresh name, and the source's own nodes die. A
plan that touches a node outside its chain is refused (ValueError: a bug in a check).

New constants are created as initializers (Constant nodes in function bodies) with names
that collide with nothing in the namespace. An initializer that only the changed node reads
is rewritten under a fresh name in place: no node reads its old values any more. When its bytes
are in a file (a lazy stub, external data), a scaled weight is not computed here: the tensor
keeps its reference and a recipe, and the save computes the values in blocks.

Dead nodes and initializers are removed by one stable sort and a truncation per list, never
by deleting elements one at a time (quadratic on 50k-node graphs).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import numpy as np

from bnfold.onnxlib import onnx

from ..fold_math import ScaledWeight
from . import protos
from .graph import Scope, metadata_inputs, node_id
from .plan import Plan


def apply(scope: Scope, plan: Plan) -> list[str]:
    """Execute ``plan`` in ``scope``; returns the names of the initializers it created."""
    created: list[str] = []
    for branch in plan.branches:
        created += _apply_branch(scope, branch, plan.chain[0])
    created += _apply_one(scope, plan)
    return created


def _apply_branch(scope: Scope, branch: Plan, joiner: onnx.NodeProto) -> list[str]:
    """One part of a split fold: its chain's output changes values, so it gets a fresh name,
    which ``joiner`` (the Concat) reads in place of the old one."""
    old = branch.source.output
    fresh = scope.ns.fresh_name(f"{old}_bnfold")
    created = _apply_one(scope, replace(branch, final=fresh))
    for j, name in enumerate(joiner.input):
        if name == old:
            joiner.input[j] = fresh
            scope.ns.uses[old] -= 1
            scope.ns.uses[fresh] += 1
    scope.stale_names.add(old)
    return created


def _apply_one(scope: Scope, plan: Plan) -> list[str]:
    if plan.new_nodes:
        _name_new_nodes(scope, plan)
    touched = [v.node for v in plan.values] + [a[0] for a in plan.attrs] + [n for n, _ in plan.new_nodes]
    if plan.op_type is not None:
        touched.append(plan.op_type[0])
    if not all(any(n is c for c in plan.chain) for n in touched):  # identity first: cheap
        chain_ids = {node_id(n) for n in plan.chain}
        if any(node_id(n) not in chain_ids for n in touched):
            raise ValueError("a fold plan changes a node outside its chain: the name rule would break")
    if plan.op_type is not None:
        node, op = plan.op_type
        node.op_type = op
        del node.attribute[:]
    anchors = {node_id(new): anchor for new, anchor in plan.new_nodes}
    created: list[str] = []
    for v in plan.values:
        before = anchors.get(node_id(v.node), v.node) if anchors else v.node
        created += set_input(scope, v.node, v.index, v.value, v.kind, before=before)
    for node, name, value in plan.attrs:
        set_attr(node, name, value)
    chain = list(plan.chain)
    if plan.new_nodes:
        live = _insert_new_nodes(scope, plan)
        chain = [live.get(node_id(n), n) for n in chain]
    for node in (*plan.source.nodes, *plan.dead):
        kill(scope, node)
    if plan.direction == "forward":
        _bypass(scope, plan)
    _rename_chain(scope, chain, plan.final or plan.source.output)
    return created


def _bypass(scope: Scope, plan: Plan) -> None:
    """Forward: the source's reader reads its input instead; the looked-through ops between it and
    the layer now carry other values, so their outputs get fresh names."""
    ns = scope.ns
    src = plan.source
    readers = [*plan.renamed, plan.chain[0]]
    old, new = src.output, src.input
    retarget_metadata(scope, old, new)
    for i, node in enumerate(readers):
        for j, name in enumerate(node.input):
            if name == old:
                node.input[j] = new
                ns.uses[old] -= 1
                ns.uses[new] += 1
        if i == len(readers) - 1:
            break
        old = node.output[0]
        new = ns.fresh_name(f"{old}_bnfold")
        node.output[0] = new
        if old in ns.types:
            ns.types.setdefault(new, ns.types[old])
        retarget_metadata(scope, old, new)
        scope.producer.pop(old, None)
        scope.producer[new] = node
        scope.stale_names.add(old)


def _name_new_nodes(scope: Scope, plan: Plan) -> None:
    """Give each new node fresh names and put it between its anchor and the next chain node."""
    ns = scope.ns
    ids = [node_id(n) for n in plan.chain]
    for new, anchor in plan.new_nodes:
        out = anchor.output[0]
        new.name = ns.fresh_name(f"{anchor.name or anchor.op_type}_bnfold_{new.op_type.lower()}")
        new.output[0] = ns.fresh_name(f"{out}_bnfold")
        ns.uses[out] += 1
        at = ids.index(node_id(anchor)) + 1
        ids[at] = node_id(new)
        if at + 1 < len(plan.chain):
            nxt = plan.chain[at + 1]
            for j, name in enumerate(nxt.input):
                if name == out:
                    nxt.input[j] = new.output[0]
                    ns.uses[out] -= 1
                    ns.uses[new.output[0]] += 1


def _insert_new_nodes(scope: Scope, plan: Plan) -> dict[tuple[str, str], onnx.NodeProto]:
    """Insert the plan's new nodes after their anchors; the stored copies, by node id."""
    live = {}
    for new, anchor in plan.new_nodes:
        key = node_id(anchor)
        idx = next(i for i, n in enumerate(scope.nodes) if node_id(n) == key)
        scope.nodes.insert(idx + 1, new)  # insert() stores a copy
        stored = scope.nodes[idx + 1]
        scope.producer[new.output[0]] = stored
        live[node_id(new)] = stored
    return live


def _rename_chain(scope: Scope, chain: list[onnx.NodeProto], final: str) -> None:
    """The last chain node writes the source's output; the others' outputs get fresh names.

    Runs after the source's nodes died, so the source's output has no producer left.
    """
    ns = scope.ns
    last = len(chain) - 1
    for i, node in enumerate(chain):
        old = node.output[0]
        new = final if i == last else ns.fresh_name(f"{old}_bnfold")
        node.output[0] = new
        if old in ns.types:  # other values, same type and shape
            ns.types.setdefault(new, ns.types[old])
        retarget_metadata(scope, old, new)
        if i < last:
            nxt = chain[i + 1]
            for j, name in enumerate(nxt.input):
                if name == old:
                    nxt.input[j] = new
                    ns.uses[old] -= 1
                    ns.uses[new] += 1
        scope.producer.pop(old, None)
        scope.producer[new] = node
        scope.stale_names.add(old)
    scope.stale_names.discard(final)


def retarget_metadata(scope: Scope, old: str, new: str) -> None:
    """Point the readers of ``old``'s type/shape alone at ``new``, which has the same type and
    shape (the renamed output of a fold's chain)."""
    readers = scope.meta_readers.pop(old, None)
    if not readers or old == new:
        if readers:
            scope.meta_readers[old] = readers
        return
    for node in readers:
        for j, name in enumerate(node.input):
            if name == old and name in metadata_inputs(node):
                node.input[j] = new
                scope.ns.uses[old] -= 1
                scope.ns.uses[new] += 1
    scope.meta_readers.setdefault(new, []).extend(readers)


def kill(scope: Scope, node: onnx.NodeProto) -> None:
    """Mark ``node`` dead: its inputs lose a use, its outputs leave the producer map.

    Its first output is replaced by a marker no tensor can be named, so that the node it is
    deleted by (``flush``) is never confused with the live node that now writes that name.
    """
    for i in node.input:
        if i:
            scope.ns.uses[i] -= 1
    for name in metadata_inputs(node):
        readers = scope.meta_readers.get(name, [])
        readers[:] = [r for r in readers if r is not node]
    for o in node.output:
        scope.producer.pop(o, None)
    scope.stale_names.update(o for o in node.output if o)
    marker = f"\x00dead:{len(scope.doomed)}:{node.output[0] if node.output else ''}"
    if node.output:
        node.output[0] = marker
    else:
        node.output.append(marker)
    scope.doomed.add(node_id(node))


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    keep = [a for a in node.attribute if a.name != name]
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)
    node.attribute.append(protos.make_attribute(name, value))


def set_input(
    scope: Scope,
    node: onnx.NodeProto,
    index: int,
    value: np.ndarray | ScaledWeight,
    kind: str,
    *,
    before: onnx.NodeProto | None = None,
) -> list[str]:
    """Point ``node.input[index]`` at ``value``; returns the initializer names created.

    Under the name rule a changed value never keeps its old name: an initializer of this scope
    read only by this node is overwritten in place under a fresh name (no copy of the list, and
    the old name no longer exists); anything shared, overridable, outer-scope or computed gets a
    fresh initializer beside it, so other readers keep the original values. ``before``: the node
    a new Constant goes before in a function body (``node`` itself unless it is not in the graph
    yet).
    """
    ns = scope.ns
    old = node.input[index] if index < len(node.input) else ""
    base = f"{old or (node.name or node.op_type) + '_' + kind}_bnfold"
    if old and old in scope.initializers and scope.single_use(old) and not scope.overridable(old):
        name = ns.fresh_name(base)
        t = scope.initializers.pop(old)
        if isinstance(value, ScaledWeight):
            new_t = _deferred(t, value, name)
            value = value.apply() if new_t is None else value
        if not isinstance(value, ScaledWeight):
            new_t = protos.from_array(value, name)
        new_t.doc_string = t.doc_string
        t.CopyFrom(new_t)
        scope.initializers[name] = t
        scope.const_cache.pop(old, None)
        if scope.graph is not None:
            _rename_declarations(scope.graph, old, name)
        node.input[index] = name
        ns.uses[old] -= 1
        ns.uses[name] += 1
        return [name]
    if isinstance(value, ScaledWeight):
        value = value.apply()
    name = add_constant(scope, base, value, before=before if before is not None else node)
    while len(node.input) <= index:
        node.input.append("")
    if old:
        ns.uses[old] -= 1
    node.input[index] = name
    ns.uses[name] += 1
    return [name]


def _deferred(t: onnx.TensorProto, value: ScaledWeight, name: str) -> onnx.TensorProto | None:
    """``t`` renamed to ``name``, holding ``value`` computed from its own bytes when it is saved
    or read (:func:`bnfold.onnx.io.defer_scaled`); None when ``t``'s bytes are in memory (they
    are computed now). Holds the fields ``protos.from_array`` writes, and the doc string."""
    if t.data_location != onnx.TensorProto.EXTERNAL or t.HasField("raw_data"):
        return None
    from .io import defer_scaled  # lazy: only a model with data in files gets here

    return defer_scaled(t, value.detached(), name)


def _rename_declarations(graph: onnx.GraphProto, old: str, new: str) -> None:
    """An initializer that is also declared as a graph input (IR <= 3) or has value_info follows its rename."""
    for v in (*graph.input, *graph.value_info):
        if v.name == old:
            v.name = new


def add_constant(scope: Scope, base: str, value: np.ndarray, *, before: onnx.NodeProto) -> str:
    """A new constant named after ``base``: an initializer, or a Constant node in a function body."""
    name = scope.ns.fresh_name(base)
    tensor = protos.from_array(value, name)
    if scope.graph is not None:
        scope.graph.initializer.append(tensor)
        scope.initializers[name] = scope.graph.initializer[-1]  # append() stored a copy
        if scope.index.ir_version <= 3 and scope.parent is None:
            scope.graph.input.append(protos.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            scope.formal_inputs.add(name)
    else:
        node = protos.make_node(
            "Constant", [], [name], value=tensor, name=scope.ns.fresh_name(name + "_const")
        )
        key = node_id(before)
        idx = next(i for i, n in enumerate(scope.nodes) if node_id(n) == key)
        scope.nodes.insert(idx, node)
        scope.producer[name] = scope.nodes[idx]
    return name


# --------------------------------------------------------------------------- removal


def _name(element: Any) -> str:
    return element.name


def _truncate(container: Any, dead: Collection[Any], key: Callable[[Any], Any] = _name) -> None:
    """Remove the elements whose ``key`` is in ``dead``: one stable sort, one truncation.

    Members of ``dead`` are normally keys of one element each; the tail is checked before it
    is cut, and counted when that does not hold.
    """
    if not dead:
        return
    container.sort(key=lambda e: key(e) in dead)
    size, n_dead = len(container), len(dead)
    tail_is_dead = n_dead <= size and all(key(e) in dead for e in container[size - n_dead :])
    if not tail_is_dead or (n_dead < size and key(container[size - n_dead - 1]) in dead):
        n_dead = sum(1 for e in container if key(e) in dead)
    del container[size - n_dead :]


def flush(scope: Scope) -> None:
    """Delete the nodes and value_info marked dead."""
    if scope.doomed:
        doomed = scope.doomed
        _truncate(scope.nodes, doomed, node_id)
        scope.doomed = set()
    if scope.stale_names and scope.graph is not None:
        stale = scope.stale_names
        _truncate(scope.graph.value_info, stale)
    scope.stale_names = set()


def remove_dead(scopes: list[Scope]) -> None:
    """Drop initializers and constant-chain nodes that no longer feed anything."""
    changed = True
    while changed:
        changed = False
        for scope in scopes:
            uses = scope.ns.uses
            for n in scope.nodes:
                key = node_id(n)
                if (
                    key in scope.const_nodes
                    and key not in scope.doomed
                    and all(uses[o] <= 0 and o not in scope.outputs for o in n.output if o)
                ):
                    kill(scope, n)
                    changed = True
            flush(scope)
    for scope in scopes:
        g = scope.graph
        if g is None:
            continue
        uses = scope.ns.uses
        dead = {
            t.name
            for t in g.initializer
            if uses[t.name] <= 0
            and t.name not in scope.outputs
            and t.name in uses  # never-used initializers are not ours to delete
            and not scope.overridable(t.name)
        }
        if not dead:
            continue
        _truncate(g.initializer, dead)
        if scope.index.ir_version <= 3:
            _truncate(g.input, dead)
        _truncate(g.value_info, dead)
