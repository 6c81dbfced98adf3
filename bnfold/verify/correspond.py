"""Which candidate tensor holds which reference tensor: pairs by name, by fold alias, by position.

A shared name is evidence, not proof. bnfold's own pass keeps a name only where the values stay
the same (the absorbing layer takes over the BN's output name), but onnxsim and onnxoptimizer
delete the BN and let the Conv keep its own output name, which then holds the post-BN values;
a MatMul->Add fold by other tools keeps the MatMul's name. Compared by name, such a tensor is a
false alarm.

Fold aliases
    Where a shared name ``n`` feeds, in the reference, a chain of per-channel affine nodes
    (BatchNormalization, Add, Sub, Mul, Div, Identity, each the only reader of its input) whose
    outputs the candidate no longer has, the candidate's ``n`` may hold any tensor of that chain.
    On the first sample it is paired with the chain tensor it is closest to (relative to that
    tensor's magnitude): ``n`` itself (``matched_by="name"``) or a later one (``"fold-alias"``),
    if that one is within ``CONFIRM`` (10%) of it; else it means nothing the reference has
    (a MatMul keeping its name after a fold scaled its weight) and is not compared
    (``matched["unconfirmed"]``). A wrong fold worth catching (1e-3..1e-2 in a channel) is
    confirmed and then fails the comparison; a random BN moves values far more than 10%.

Graph outputs
    By name, in any order, when the candidate has every output name of the reference; else by
    position, with a note naming the renamed ones (models exported separately, e.g. the torch
    export's reference, name their outputs as they like).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .models import FETCHABLE, OrtModel, constant_names, value_types

__all__ = ["Pair", "alias_candidates", "output_pairs", "pick_aliases", "shared_by_name"]

AFFINE_OPS = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div", "Identity"})
"""Ops a peer tool may fold away behind a surviving name."""
_DEFAULT_DOMAINS = ("", "ai.onnx")
CONFIRM = 0.1
"""A candidate tensor is taken to hold a reference tensor when it is within this fraction of the
reference tensor's largest magnitude on the first sample."""


@dataclass(frozen=True)
class Pair:
    """The reference tensor ``ref`` is compared with the candidate tensor ``cand``."""

    ref: str
    cand: str
    kind: str
    """``output`` or ``intermediate``."""
    matched_by: str = "name"


def output_pairs(ref_outs: Sequence[str], cand_outs: Sequence[str]) -> tuple[list[Pair], str, str]:
    """(pairs, problem, note): outputs by name, or by position when no name is shared."""
    if len(ref_outs) != len(cand_outs):
        return [], f"the reference has {len(ref_outs)} outputs, the candidate {len(cand_outs)}", ""
    if set(ref_outs) == set(cand_outs):
        return [Pair(n, n, "output") for n in ref_outs], "", ""
    pairs = [Pair(r, c, "output", "name" if r == c else "position") for r, c in zip(ref_outs, cand_outs)]
    renamed = ", ".join(f"{r}->{c}" for r, c in zip(ref_outs, cand_outs) if r != c)
    return pairs, "", f"outputs matched by position ({renamed})"


def _produced(g: onnx.GraphProto) -> set[str]:
    outs = {o for n in g.node for o in n.output if o}
    return outs - constant_names(g) - {v.name for v in (*g.input, *g.output)}


def shared_by_name(
    ref: OrtModel, cand: OrtModel, exclude: set[str]
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(name -> element type of the float tensors both main graphs compute, outputs and
    ``exclude`` left out, in the reference's order; the element type of every tensor of the
    reference; of the candidate)."""
    names = (_produced(ref.graph) & _produced(cand.graph)) - exclude
    ref_types, cand_types = value_types(ref.proto), value_types(cand.proto)
    order = [o for n in ref.graph.node for o in n.output]  # the reference's order, for stable reports
    shared = {
        n: ref_types[n]
        for n in order
        if n in names and ref_types.get(n) in FETCHABLE and cand_types.get(n) == ref_types[n]
    }
    return shared, ref_types, cand_types


def alias_candidates(ref: OrtModel, cand: OrtModel, ref_types: Mapping[str, int]) -> dict[str, list[str]]:
    """Shared name -> the reference tensors it may hold: itself, then each affine node's output
    along the chain it feeds, while the candidate lacks that output (see the module docstring)."""
    g = ref.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    uses = Counter(i for n in g.node for i in n.input if i) + Counter(o.name for o in g.output)
    in_cand = _produced(cand.graph) | {o.name for o in cand.graph.output}
    chains = {}
    for name in _produced(g) & in_cand:
        chain = [name]
        here = name
        while uses[here] == 1 and len(consumers.get(here, ())) == 1:  # one reader, not an output
            node = consumers[here][0]
            if node.op_type not in AFFINE_OPS or node.domain not in _DEFAULT_DOMAINS:
                break
            nxt = node.output[0]
            if nxt in in_cand or ref_types.get(nxt) not in FETCHABLE:
                break
            chain.append(nxt)
            here = nxt
        if len(chain) > 1 and ref_types.get(name) in FETCHABLE:
            chains[name] = chain
    return chains


def pick_aliases(
    chains: Mapping[str, Sequence[str]],
    ref_values: Mapping[str, np.ndarray],
    cand_values: Mapping[str, np.ndarray],
    label: str = "fold-alias",
) -> list[Pair]:
    """One pair per chain: the reference tensor the candidate's tensor is closest to (one
    sample), when within ``CONFIRM``; chains with no such tensor get no pair. ``label`` is the
    pair's ``matched_by`` unless the tensor is the reference's of the same name."""
    pairs = []
    for name, chain in chains.items():
        got = cand_values[name]
        best, best_err = name, np.inf
        for r in chain:
            want = ref_values[r]
            if want.shape != got.shape:
                continue
            err = _relative_error(want, got)
            if err < best_err:
                best, best_err = r, err
        if best_err <= CONFIRM:
            pairs.append(Pair(best, name, "intermediate", "name" if best == name else label))
    return pairs


def _relative_error(want: np.ndarray, got: np.ndarray) -> float:
    w, g = want.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(w) & np.isfinite(g)
    if not finite.any():
        return np.inf
    scale = max(float(np.abs(w[finite]).max()), np.finfo(np.float64).tiny)
    return float(np.abs(w[finite] - g[finite]).max()) / scale
