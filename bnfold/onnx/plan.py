"""The data a fold is made of: a source's affine map, a refusal, and the plan ``apply`` executes.

A *source* (:mod:`.sources`) yields a per-channel affine map ``y = scale * x + shift`` on one
axis of a tensor; a *check* (:mod:`.absorb`) returns a :class:`Plan` (every value to write,
every node that dies) or a :class:`Reject`; only :func:`bnfold.onnx.rewrite.apply` mutates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bnfold.onnxlib import onnx

from ..fold_math import Affine, ScaledWeight
from ..report import SkipReason


@dataclass(frozen=True)
class Reject:
    """Why a source cannot be folded: a reason code and a sentence; ``node`` is the layer, if any."""

    reason: SkipReason
    detail: str
    node: onnx.NodeProto | None = None


@dataclass(frozen=True)
class Source:
    """A per-channel affine map that can be folded away.

    ``input`` is the tensor the map reads, ``output`` the tensor it writes (the name the
    absorbing chain will write), ``axis`` the channel axis of ``input``; ``nodes`` die when the
    map is folded.
    """

    kind: str
    """``batchnorm``, ``mul-add chain`` or ``bias add`` (see :attr:`bnfold.report.Folded.source`)."""
    label: str
    """The name reported for it (a BN node's name, a chain's first node's name)."""
    input: str
    output: str
    affine: Affine
    nodes: tuple[onnx.NodeProto, ...]
    axis: int | None = 1
    """Channel axis of ``input``; None for a map by scalars (the same on every channel)."""
    last_axis_vector: bool = False
    """The axis comes from a (C,) constant on a tensor of rank > 2 (its last axis)."""

    def on_axis(self, axis: int | None) -> Source:
        """The same map, with its channel axis expressed on another tensor (after a path)."""
        return self if axis == self.axis else replace(self, axis=axis)

    def widened(self, channels: int) -> Source:
        """A map by scalars (no axis, one channel) as a map on ``channels`` channels; a map with
        an axis is returned unchanged (a BN's (1,) parameters are a shape mismatch, not scalars)."""
        if self.axis is not None or self.affine.channels != 1 or channels == 1:
            return self
        aff = Affine(np.repeat(self.affine.scale, channels), np.repeat(self.affine.shift, channels))
        return replace(self, affine=aff)


@dataclass(frozen=True)
class NewValue:
    """Point ``node.input[index]`` at a constant holding ``value`` (``kind``: weight, bias); a
    :class:`~bnfold.fold_math.ScaledWeight` is computed where it is written when it can be."""

    node: onnx.NodeProto
    index: int
    value: np.ndarray | ScaledWeight
    kind: str


@dataclass(frozen=True)
class Plan:
    """Everything one fold changes, computed without touching the graph.

    ``chain`` lists the nodes whose outputs change values, in data order, ending with the node
    that will write ``source.output``; ``apply`` gives every other changed output a fresh name
    (the name rule). Every node named in ``values``, ``attrs`` or ``op_type`` is in ``chain``.
    """

    source: Source
    absorber: onnx.NodeProto
    """The node reported as having absorbed the map."""
    chain: tuple[onnx.NodeProto, ...]
    values: tuple[NewValue, ...]
    attrs: tuple[tuple[onnx.NodeProto, str, Any], ...] = ()
    """``(node, attribute, value)`` to set."""
    op_type: tuple[onnx.NodeProto, str] | None = None
    """``(node, new op type)``: the node's attributes are cleared first (MatMul -> Gemm)."""
    dead: tuple[onnx.NodeProto, ...] = ()
    """Nodes removed besides ``source.nodes``."""
    new_nodes: tuple[tuple[onnx.NodeProto, onnx.NodeProto], ...] = ()
    """``(new node, existing node it follows)``: nodes to insert (a bias Add after a MatMul);
    each new node must be in ``chain``."""
    through: tuple[str, ...] = ()
    """Op types of the path between the layer and the source (reported)."""
    direction: str = "backward"
    """``backward`` (the source's output is written by the chain's last node) or ``forward``
    (the source sat before the layer: its consumers read its input instead, the ops in
    ``renamed`` get fresh output names, and the chain's last node writes ``final``)."""
    renamed: tuple[onnx.NodeProto, ...] = ()
    """Forward: the look-through ops between the source and the layer, in data order."""
    final: str = ""
    """The name the chain's last node writes; "" means ``source.output``."""
    branches: tuple[Plan, ...] = ()
    """A split fold (BN after a Concat): one plan per Concat input, each applied first; every
    branch's chain writes a fresh name that the Concat (``chain[0]``) reads instead."""
