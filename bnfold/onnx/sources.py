"""What yields a per-channel affine map: BatchNormalization in inference mode, and chains of
Mul/Add/Sub/Div by per-channel constants (keras 3 writes every BN as ``Mul -> Add``).

ONNX BatchNormalization (all opsets) normalizes axis 1 of its input ``X``::

    Y = scale * (X - mean) / sqrt(var + epsilon) + B      (epsilon defaults to 1e-5)
      = s * X + t,   s = scale / sqrt(var + epsilon),  t = B - mean * s

(see :func:`bnfold.fold_math.bn_affine`). It is an affine map only with running statistics:
``training_mode=1``, opset <= 6 ``is_test=0``, statistics outputs declared before opset 14
(onnxruntime then normalizes with batch statistics) and opset <= 8 ``spatial=0``
(per-element statistics) are refused, as are parameters that are not constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bnfold.onnxlib import onnx

from .. import fold_math
from ..report import SkipReason
from .attrs import attr
from .constants import NotConstant
from .graph import Scope, is_op, node_id
from .plan import Reject, Source


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return is_op(node, "BatchNormalization")


def bn_label(bn: onnx.NodeProto) -> str:
    return bn.name or f"BatchNormalization({bn.output[0]})"


def inference_problem(bn: onnx.NodeProto, opset: int, *, used: bool) -> Reject | None:
    """Why ``bn`` is not an inference-mode, per-channel BN, or None.

    ``used``: whether one of its statistics outputs is consumed. This is the single place of
    the training-mode policy.
    """
    if opset <= 6 and attr(bn, "is_test", 0, "INT") != 1:
        return Reject(
            SkipReason.TRAINING_MODE, "is_test is not 1 (opset <= 6 default is training: batch statistics)"
        )
    if attr(bn, "training_mode", 0, "INT") != 0:
        return Reject(SkipReason.TRAINING_MODE, "training_mode=1: the node normalizes with batch statistics")
    if used:
        return Reject(SkipReason.EXTRA_OUTPUTS_USED, "an output with running/saved statistics is consumed")
    if opset < 14 and any(bn.output[1:]):
        return Reject(
            SkipReason.TRAINING_MODE,
            f"opset {opset} BN declares {sum(1 for o in bn.output if o)} outputs, which is training mode: "
            "onnxruntime normalizes with batch statistics even when they are unused",
        )
    if opset <= 8 and attr(bn, "spatial", 1, "INT") != 1:
        return Reject(SkipReason.SPATIAL_0, "spatial=0: statistics are per element, not per channel")
    return None


def bn_problem(scope: Scope, bn: onnx.NodeProto) -> Reject | None:
    """Why ``bn`` is not an inference-mode BN with the inputs of one (parameters not read yet)."""
    used = next((e for e in bn.output[1:] if e and scope.uses(e) > 0), None)
    problem = inference_problem(bn, scope.index.opset, used=used is not None)
    if problem is not None and problem.reason is SkipReason.EXTRA_OUTPUTS_USED:
        return Reject(problem.reason, f"output {used!r} (running/saved statistics) is consumed")
    if problem is None and (len(bn.input) < 5 or not bn.input[0]):
        return Reject(SkipReason.SHAPE_MISMATCH, "BatchNormalization needs five inputs")
    return problem


def bn_source(scope: Scope, bn: onnx.NodeProto) -> Source | Reject:
    """``bn`` (which passed :func:`bn_problem`) as an affine map on axis 1 of its input."""
    try:
        gamma, beta, mean, var = (
            scope.constant(n, what=f"BN {w}") for n, w in zip(bn.input[1:5], ("scale", "bias", "mean", "var"))
        )
    except NotConstant as e:
        return Reject(e.reason, e.detail)
    if not all(_is_float(a) for a in (gamma, beta, mean, var)):
        return Reject(SkipReason.UNSUPPORTED_DTYPE, "BN parameters are not floating point")
    shapes = {np.asarray(a).shape for a in (gamma, beta, mean, var)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return Reject(SkipReason.SHAPE_MISMATCH, f"BN parameters have shapes {sorted(shapes)}, expected (C,)")
    eps = attr(bn, "epsilon", fold_math.DEFAULT_EPSILON, "FLOAT")
    return Source(
        kind="batchnorm",
        label=bn_label(bn),
        input=bn.input[0],
        output=bn.output[0],
        affine=fold_math.bn_affine(gamma, beta, mean, var, eps),
        nodes=(bn,),
        axis=1,
    )


def _is_float(a: np.ndarray) -> bool:
    dtype = np.asarray(a).dtype
    return dtype.kind == "f" or str(dtype) == "bfloat16"


# --------------------------------------------------------------------------- Mul/Add/Sub/Div chains

AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


@dataclass(frozen=True)
class Step:
    """One ``Mul/Add/Sub/Div`` of an activation by a constant."""

    node: onnx.NodeProto
    activation: str
    constant: np.ndarray
    activation_first: bool


def affine_step(scope: Scope, node: onnx.NodeProto) -> Step | None:
    """``node`` as an affine step (one activation, one floating-point constant), else None.

    ``c / x`` is not affine in ``x``: None.
    """
    if not is_op(node, *AFFINE_OPS) or len(node.input) != 2 or len(node.output) != 1:
        return None
    a, b = node.input
    ca, cb = _small_constant(scope, a), _small_constant(scope, b)
    if (ca is None) == (cb is None):
        return None
    step = Step(node, b, ca, False) if ca is not None else Step(node, a, cb, True)  # type: ignore[arg-type]
    if node.op_type == "Div" and not step.activation_first:
        return None
    if not _is_float(step.constant):
        return None
    return step


# A per-channel constant has one value per channel; bigger initializers (weights being
# preprocessed) are not read just to find that out (lazily loaded models keep them on disk).
_MAX_STEP_CONSTANT = 1 << 16


def _small_constant(scope: Scope, name: str) -> np.ndarray | None:
    t = scope.initializers.get(name)
    if t is not None and int(np.prod(t.dims, dtype=np.int64)) > _MAX_STEP_CONSTANT:
        return None
    return scope.constant_or_none(name)


def chain_steps(
    scope: Scope, start: onnx.NodeProto, consumers: Mapping[str, Sequence[onnx.NodeProto]]
) -> list[Step] | None:
    """The longest chain of affine steps beginning at ``start``, or None when ``start`` is not
    a chain's first step (not affine, or continuing a chain whose earlier step reads a constant).

    Every step but the last writes a tensor only the next step reads.
    """
    first = affine_step(scope, start)
    if first is None:
        return None
    before = scope.producer.get(first.activation)
    if (
        before is not None
        and _only_reader(scope, first.activation)
        and affine_step(scope, before) is not None
    ):
        return None
    steps = [first]
    while _only_reader(scope, steps[-1].node.output[0]):
        out = steps[-1].node.output[0]
        readers = [n for n in consumers.get(out, ()) if node_id(n) not in scope.doomed]
        nxt = affine_step(scope, readers[0]) if len(readers) == 1 else None
        if nxt is None or nxt.activation != out:
            break
        steps.append(nxt)
    return steps


def _only_reader(scope: Scope, name: str) -> bool:
    """One reader in all (metadata readers included): a chain's inner tensors disappear."""
    return name not in scope.outputs and scope.uses(name) == 1


def chain_source(scope: Scope, steps: Sequence[Step]) -> Source | Reject | None:
    """The chain as one affine map on its input's channel axis, or why it is not per-channel;
    None for a chain of scalars alone (``x * 0.5`` in a GELU, attention's ``* scale``: not a
    BN-like structure, left as it is).

    Constants count as per-channel only when they vary along one axis once right-aligned with
    the input (``(1,C,1,1)``, ``(C,1,1)`` and ``(C,)`` on a rank-2 tensor: axis 1; ``(C,)`` on a
    rank-4 tensor: axis 3, its last); scalars fit every axis.
    """
    x = steps[0].activation
    rank = scope.rank(x)
    axis: int | None = None
    channels = 1
    last_vector = False
    for st in steps:
        c = st.constant
        if c.size == 1 and (rank is None or c.ndim <= rank):
            continue
        if rank is None:
            return Reject(
                SkipReason.CHANNEL_AXIS_MISMATCH,
                f"the rank of {x!r} is unknown, so the axis of {st.node.op_type} constant {c.shape} is unknown",
            )
        padded = (1,) * (rank - c.ndim) + c.shape
        varying = [i for i, d in enumerate(padded) if d != 1]
        if c.ndim > rank or len(varying) != 1 or (axis is not None and varying[0] != axis):
            return Reject(
                SkipReason.NOT_PER_CHANNEL,
                f"{st.node.op_type} {st.node.name!r} by a constant of shape {c.shape} on a rank-{rank} "
                "tensor does not vary along one channel axis",
            )
        axis, channels = varying[0], padded[varying[0]]
        last_vector = last_vector or (c.ndim == 1 and rank > 2)
    if axis is None:
        return None
    scale, shift = np.ones(channels), np.zeros(channels)
    for st in steps:
        c = np.asarray(st.constant, dtype=np.float64).reshape(-1)
        op = st.node.op_type
        if op == "Mul":
            scale, shift = scale * c, shift * c
        elif op == "Add":
            shift = shift + c
        elif op == "Sub" and st.activation_first:
            shift = shift - c
        elif op == "Sub":
            scale, shift = -scale, c - shift
        elif np.any(c == 0):
            return Reject(
                SkipReason.DIVISION_BY_ZERO,
                f"Div {st.node.name!r} divides by a constant with a zero element: x / 0 is not W / 0",
            )
        else:
            scale, shift = scale / c, shift / c
    head = steps[0].node
    return Source(
        kind=chain_kind(steps),
        label=head.name or f"{head.op_type}({head.output[0]})",
        input=x,
        output=steps[-1].node.output[0],
        affine=fold_math.Affine(scale=scale, shift=shift),
        nodes=tuple(st.node for st in steps),
        axis=axis,
        last_axis_vector=last_vector,
    )


def chain_kind(steps: Sequence[Step]) -> str:
    """``bias add`` for a chain of ``+ c`` / ``- c`` alone, else ``mul-add chain``."""
    bias_only = all(
        st.node.op_type == "Add" or (st.node.op_type == "Sub" and st.activation_first) for st in steps
    )
    return "bias add" if bias_only else "mul-add chain"
