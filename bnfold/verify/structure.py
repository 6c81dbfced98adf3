"""Renamed tensors matched by structure: same op, same attributes, matched data inputs.

Most tools rename intermediate tensors; compared by name, only the graph outputs are left, and a
fault in one channel of one fold hides in them. Walking the candidate in graph order from the
tensors already paired (graph inputs, shared names), a candidate node is matched with the one
reference node of the same op and attributes whose data inputs (inputs that are not constants:
weights may differ by a fold) are the ones its own inputs hold. Its outputs may then hold the
reference node's outputs or, after a fold, the output of the affine chain that follows it in the
reference (BatchNormalization, or Add/Sub/Mul/Div by a constant). Where several reference nodes
fit, the one whose weights have the candidate's shapes wins, then graph order. Identity, Dropout
and one-input Concat in the reference are looked through (other tools remove them). Each candidate
tensor gets those
options, a later match narrows them (a Relu the reference applies to the BN's output says the
Conv before it holds that output), and the first sample picks and confirms one
(:func:`bnfold.verify.correspond.pick_aliases`). Nodes with subgraphs are not matched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from ..onnx.graph import has_subgraph
from .correspond import AFFINE_OPS, FETCHABLE, OrtModel, constant_names

__all__ = ["CHAIN_LIMIT", "affine_chain", "structural_options"]

CHAIN_LIMIT = 4
"""At most this many affine nodes after a layer are options for what its candidate holds."""

_DEFAULT_DOMAINS = ("", "ai.onnx")


_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and what nodes compute from constants alone (torch's
    exporter writes ``Identity(weight)``; onnxoptimizer leaves a fold as Mul/Div/Sqrt nodes)."""
    consts = constant_names(graph)
    for n in graph.node:
        inputs = [i for i in n.input if i]
        computed = inputs and all(i in consts for i in inputs) and n.op_type not in _RANDOM
        if n.op_type == "Constant" or (computed and not has_subgraph(n)):
            consts.update(o for o in n.output if o)
    return consts


def _attrs_key(node: onnx.NodeProto) -> tuple:
    return tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))


def _pass_through(graph: onnx.GraphProto):
    """A function extending reference tensor names with every name that holds the same values
    through Identity, Dropout or a one-input Concat (ops other tools remove), either way."""
    near: dict[str, list[str]] = {}
    for n in graph.node:
        data = [i for i in n.input if i]
        plain = n.op_type in ("Identity", "Dropout") or (n.op_type == "Concat" and len(data) == 1)
        if plain and data and n.output and n.output[0] and n.domain in _DEFAULT_DOMAINS:
            near.setdefault(data[0], []).append(n.output[0])
            near.setdefault(n.output[0], []).append(data[0])

    def extend(names: Sequence[str]) -> list[str]:
        out = list(names)
        for name in out:  # grows while iterated: follows chains of them
            out += [x for x in near.get(name, ()) if x not in out]
        return out

    return extend


def _const_shapes(node: onnx.NodeProto, dims: Mapping[str, tuple[int, ...]]) -> tuple:
    """The shapes of a node's initializer inputs (a fold keeps them), None where not one."""
    return tuple(dims.get(i) for i in node.input)


def affine_chain(graph: onnx.GraphProto, name: str, types: Mapping[str, int], consts: set[str]) -> list[str]:
    """``name``, then each output of the per-channel affine nodes that follow it (each the only
    reader of its input; the other inputs constant), up to :data:`CHAIN_LIMIT`."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in set(node.input):
            if i:
                readers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    chain, here = [name], name
    while len(chain) <= CHAIN_LIMIT and here not in outputs and len(readers.get(here, ())) == 1:
        node = readers[here][0]
        if node.op_type not in AFFINE_OPS or node.domain not in _DEFAULT_DOMAINS:
            break
        if (
            any(i != here and i not in consts for i in node.input if i)
            or types.get(node.output[0]) not in FETCHABLE
        ):
            break
        here = node.output[0]
        chain.append(here)
    return chain


def structural_options(
    ref: OrtModel,
    cand: OrtModel,
    known: Mapping[str, Sequence[str]],
    ref_types: Mapping[str, int],
    cand_types: Mapping[str, int],
) -> dict[str, list[str]]:
    """Candidate tensor -> the reference tensors it may hold, for the candidate's float tensors
    that ``known`` (tensors already paired: name -> options) does not cover."""
    ref_consts, cand_consts = _constants(ref.graph), _constants(cand.graph)
    index: dict[tuple, list[tuple[onnx.NodeProto, tuple[str, ...]]]] = {}
    for node in ref.graph.node:
        if has_subgraph(node):
            continue
        data = [(i, n) for i, n in enumerate(node.input) if n and n not in ref_consts]
        key = (node.domain, node.op_type, _attrs_key(node), tuple(i for i, _ in data))
        index.setdefault(key, []).append((node, tuple(n for _, n in data)))
    ref_dims = {t.name: tuple(t.dims) for t in ref.graph.initializer}
    cand_dims = {t.name: tuple(t.dims) for t in cand.graph.initializer}
    used: set[int] = set()
    same = _pass_through(ref.graph)
    options: dict[str, list[str]] = {k: same(v) for k, v in known.items()}
    for vi in cand.graph.input:
        options.setdefault(vi.name, same([vi.name]))
    found: dict[str, list[str]] = {}
    for node in cand.graph.node:
        if has_subgraph(node) or all(o in options for o in node.output if o):
            continue
        data = [(i, n) for i, n in enumerate(node.input) if n and n not in cand_consts]
        if any(n not in options for _, n in data):
            continue
        key = (node.domain, node.op_type, _attrs_key(node), tuple(i for i, _ in data))
        matches = [
            (r, ins)
            for r, ins in index.get(key, ())
            if id(r) not in used and all(ri in options[ci] for ri, (_, ci) in zip(ins, data))
        ]
        if len(matches) > 1:  # e.g. a block's 1x1 Conv and its downsample 1x1 Conv read the same tensor
            shape = _const_shapes(node, cand_dims)
            matches = [m for m in matches if _const_shapes(m[0], ref_dims) == shape] or matches
        if not matches:
            continue
        r, ins = matches[0]  # still several: graph order; the first sample confirms or drops it
        used.add(id(r))
        for ri, (_, ci) in zip(ins, data):  # the match says which option each input holds
            options[ci] = same([ri])
            if ci in found:
                found[ci] = [x for x in options[ci] if x in found[ci]] or found[ci]
        for k, out in enumerate(node.output):
            if not out or out in options or k >= len(r.output) or not r.output[k]:
                continue
            chain = affine_chain(ref.graph, r.output[k], ref_types, ref_consts)
            same_type = [t for t in chain if ref_types.get(t) == cand_types.get(out)]
            options[out] = same(same_type or [r.output[k]])  # to go on matching what reads it
            if same_type and cand_types.get(out) in FETCHABLE:
                found[out] = same_type
    cand_outputs = {o.name for o in cand.graph.output}
    return {c: opts for c, opts in found.items() if c not in cand_outputs}
