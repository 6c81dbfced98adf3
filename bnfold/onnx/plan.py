"""The data a fold is made of: a source's affine map, a refusal, and the plan ``apply`` executes.

A *source* (:mod:`.sources`) yields a per-channel affine map ``y = scale * x + shift`` on one
axis of a tensor; a *check* (:mod:`.absorb`) returns a :class:`Plan` (every value to write,
every node that dies) or a :class:`Reject`; only :func:`bnfold.onnx.rewrite.apply` mutates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..fold_math import Affine
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
    """``batchnorm`` (more kinds come with issue 12)."""
    label: str
    """The name reported for it (a BN node's name)."""
    input: str
    output: str
    affine: Affine
    nodes: tuple[onnx.NodeProto, ...]
    axis: int = 1


@dataclass(frozen=True)
class NewValue:
    """Point ``node.input[index]`` at a constant holding ``value`` (``kind``: weight, bias)."""

    node: onnx.NodeProto
    index: int
    value: np.ndarray
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
    """Nodes removed besides ``source.nodes`` (ops looked through)."""
