"""Pure checks: can the layer that produces a source's input absorb its affine map?

Each ``check_*`` reads the graph and returns a :class:`~.plan.Plan` or a
:class:`~.plan.Reject`; none mutates. With ``s`` the per-channel scale and ``t`` the shift
(:mod:`bnfold.fold_math`), backward into the producer::

    Conv          W (C_out, C_in/g, k...)  W' = W * s on axis 0,                b' = b*s + t
    ConvTranspose W (C_in, C_out/g, k...)  W' = W * s on axis 1 within groups,  b' = b*s + t
    Gemm          B (K, N) / transB (N, K) B' = B * s on the N axis, C' = beta*C*s + t, beta := 1
    MatMul (rank-2 output)                 becomes Gemm(A, B*s, t)
    MatMul (rank > 2 output)               B' = B * s, then a new Add(t) when t != 0
    MatMul -> Add(c)                       B' = B * s, c' = c*s + t

The source's channel axis must be the layer's output-channel axis: axis 1 for Conv,
ConvTranspose and Gemm, the last axis for MatMul (whose B is a constant matrix). A map by
scalars fits any layer. Ops between the layer and the source are looked through
(:mod:`.paths`); their outputs change values too, so they join the plan's chain.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from bnfold.onnxlib import onnx

from .. import fold_math
from ..fold_optimistic import scale_weight_undecided
from ..report import SkipReason
from . import protos
from .attrs import attr
from .constants import NotConstant
from .graph import Scope, is_op
from .paths import Route, walk_back
from .plan import NewValue, Plan, Reject, Source

Check = Callable[[Scope, onnx.NodeProto, Source], "Plan | Reject"]


def find_layer(scope: Scope, source: Source) -> tuple[onnx.NodeProto, Route] | Reject:
    """The layer that can absorb ``source`` (looking through :mod:`.paths`), or why none can."""
    route = walk_back(scope, source.input, source.axis)
    if isinstance(route, Reject):
        return route
    x = route.top
    producer = scope.producer.get(x)
    if producer is None:
        where = "a graph input" if x in scope.formal_inputs else "an initializer or outer-scope value"
        return Reject(SkipReason.NO_PRODUCER, f"its input {x!r} is {where}; no layer to fold into")
    if not is_op(producer, *ABSORBERS):
        return Reject(
            SkipReason.UNSUPPORTED_PRODUCER,
            f"its input comes from {producer.op_type} {producer.name!r}, which cannot absorb a per-channel affine map",
            producer,
        )
    if producer.op_type == "Add" and matmul_of_add(scope, producer) is None:
        return Reject(
            SkipReason.UNSUPPORTED_PRODUCER,
            "Add is not MatMul + constant; an Add of activations cannot absorb BN",
            producer,
        )
    if not scope.single_use(x):
        return Reject(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"{producer.op_type} output {x!r} also feeds other nodes or is a graph output",
            producer,
        )
    return producer, route


def plan_into(scope: Scope, layer: onnx.NodeProto, route: Route, source: Source) -> Plan | Reject:
    """The plan that folds ``source`` into ``layer`` along ``route`` (from :func:`find_layer`)."""
    try:
        result = ABSORBERS[layer.op_type](scope, layer, source.on_axis(route.axis))
    except NotConstant as e:
        return Reject(e.reason, e.detail, layer)
    if isinstance(result, Reject):
        return result if result.node is not None else Reject(result.reason, result.detail, layer)
    if not route.path and result.source is source:
        return result
    return replace(result, source=source, chain=result.chain + route.path, through=route.through)


def matmul_of_add(scope: Scope, add: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """``(MatMul, constant input name)`` when ``add`` is MatMul + something, else None."""
    for i, other in ((0, 1), (1, 0)):
        p = scope.producer.get(_input(add, i))
        if is_op(p, "MatMul") and _input(add, other):
            return p, add.input[other]
    return None


# --------------------------------------------------------------------------- helpers


def _float_problem(w: np.ndarray, what: str) -> Reject | None:
    if w.dtype.kind != "f" and str(w.dtype) != "bfloat16":
        return Reject(
            SkipReason.UNSUPPORTED_DTYPE,
            f"{what} has dtype {w.dtype}, only floating-point weights are folded",
        )
    return None


def _cast(values: np.ndarray, like: np.ndarray, what: str) -> np.ndarray | Reject:
    out, why = fold_math.cast_exact(values, like.dtype, channel_axis=None, original=like)
    if out is None:
        return Reject(SkipReason.NOT_REPRESENTABLE, f"folding into {what}: {why}")
    return out


_VALUES = (np.ndarray, fold_math.ScaledWeight)


def _scaled(
    w: np.ndarray, aff: fold_math.Affine, what: str, *, axis: int, groups: int = 1
) -> np.ndarray | fold_math.ScaledWeight | Reject | None:
    """``w`` scaled along ``axis`` (decided now, computed where it is written when that is
    exact: :class:`~bnfold.fold_math.ScaledWeight`); None when the scale is exactly 1. A large
    weight mapped from a file may be left undecided (:mod:`bnfold.fold_optimistic`)."""
    if aff.channels and aff.scale[0] == 1.0 and np.all(aff.scale == 1.0):
        return None
    if _mapped(w):
        undecided = scale_weight_undecided(w, aff.scale, axis=axis, groups=groups)
        if undecided is not None:
            return undecided
    out, why = fold_math.scale_weight_planned(w, aff.scale, axis=axis, groups=groups)
    if out is None:
        return Reject(SkipReason.NOT_REPRESENTABLE, f"folding into {what}: {why}")
    return out


def _mapped(w: np.ndarray) -> bool:
    """Whether ``w`` views a file mapping: a stub's or an external tensor's bytes, which a fold
    into it computes where it is written (``bnfold.onnx.io.read_array`` maps them)."""
    base: object = w
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def _channels_problem(aff: fold_math.Affine, op: str, c_out: int) -> Reject | None:
    if aff.channels != c_out:
        return Reject(SkipReason.SHAPE_MISMATCH, f"BN has {aff.channels} channels, {op} outputs {c_out}")
    return None


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _axis_problem(source: Source, want: int, op: str) -> Reject | None:
    if source.axis is None or source.axis == want:
        return None
    if source.last_axis_vector:
        return Reject(
            SkipReason.CONSTANT_ON_LAST_AXIS,
            f"a (C,) constant on a tensor of rank > 2 scales its last axis, which lands on axis "
            f"{source.axis} of the {op} output, not its channel axis {want}",
        )
    return Reject(
        SkipReason.CHANNEL_AXIS_MISMATCH,
        f"the affine map is on axis {source.axis} of the {op} output, whose channels are on axis {want}",
    )


def _plan(
    source: Source,
    absorber: onnx.NodeProto,
    chain: tuple[onnx.NodeProto, ...],
    writes: list[tuple[onnx.NodeProto, int, np.ndarray | Reject | None, str]],
    **extra: object,
) -> Plan | Reject:
    """A plan writing ``(node, input index, value, kind)`` for each of ``writes`` (None: nothing
    to write), or the first ``Reject`` among their values. ``extra``: other :class:`Plan` fields."""
    for _, _, value, _ in writes:
        if isinstance(value, Reject):
            return value
    values = tuple(NewValue(n, i, v, k) for n, i, v, k in writes if isinstance(v, _VALUES))
    return Plan(source=source, absorber=absorber, chain=chain, values=values, **extra)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- absorbers


def check_conv(scope: Scope, node: onnx.NodeProto, source: Source) -> Plan | Reject:
    """Conv: W (C_out, C_in/g, k...) scaled on axis 0 (any group); ConvTranspose: W (C_in,
    C_out/g, k...) scaled on axis 1 within each group; bias b*s + t (created when absent)."""
    transpose = node.op_type == "ConvTranspose"
    if (bad := _axis_problem(source, 1, node.op_type)) is not None:
        return bad
    w = scope.constant(node.input[1], what="weight")
    if (bad := _float_problem(w, "weight")) is not None:
        return bad
    if w.ndim < 3:
        return Reject(SkipReason.SHAPE_MISMATCH, f"weight has rank {w.ndim}, expected >= 3")
    group = attr(node, "group", 1, "INT")
    c_out = w.shape[1] * group if transpose else w.shape[0]
    aff = source.widened(c_out).affine
    if (bad := _channels_problem(aff, node.op_type, c_out)) is not None:
        return bad
    if transpose and w.shape[0] % group:
        return Reject(SkipReason.SHAPE_MISMATCH, f"weight {w.shape} does not split into {group} groups")
    b = scope.constant(node.input[2], what="bias") if _input(node, 2) else None
    if b is not None and b.shape != (c_out,):
        return Reject(SkipReason.SHAPE_MISMATCH, f"bias has shape {b.shape}, expected ({c_out},)")
    w_new = _scaled(w, aff, "the weight", axis=1 if transpose else 0, groups=group if transpose else 1)
    b_new = _cast(fold_math.fold_bias(b, aff), b if b is not None else w, "the bias")
    return _plan(source, node, (node,), [(node, 1, w_new, "weight"), (node, 2, b_new, "bias")])


def check_gemm(scope: Scope, node: onnx.NodeProto, source: Source) -> Plan | Reject:
    """Gemm: Y = alpha*A'B' + beta*C. B's N axis scaled; C' = (beta*C)*s + t; beta := 1."""
    if (bad := _axis_problem(source, 1, "Gemm")) is not None:
        return bad
    b = scope.constant(node.input[1], what="weight (B)")
    if (bad := _float_problem(b, "weight (B)")) is not None:
        return bad
    if b.ndim != 2:
        return Reject(SkipReason.SHAPE_MISMATCH, f"B has rank {b.ndim}")
    n_axis = 0 if attr(node, "transB", 0, "INT") else 1
    aff = source.widened(b.shape[n_axis]).affine
    if (bad := _channels_problem(aff, "Gemm", b.shape[n_axis])) is not None:
        return bad
    beta = attr(node, "beta", 1.0, "FLOAT")
    c_vec = None
    if _input(node, 2):
        c = scope.constant(node.input[2], what="bias (C)")
        c_vec = fold_math.channel_vector(c, aff.channels)
        if c_vec is None:
            return Reject(
                SkipReason.BIAS_NOT_PER_CHANNEL,
                f"C has shape {c.shape}, which is not constant per output column",
            )
        c_vec = c_vec * float(np.float32(beta))
    b_new = _scaled(b, aff, "B", axis=n_axis)
    c_new = _cast(fold_math.fold_bias(c_vec, aff), b, "C")
    attrs = ((node, "beta", 1.0), *(((node, "broadcast", 1),) if scope.index.opset < 7 else ()))
    return _plan(source, node, (node,), [(node, 1, b_new, "weight"), (node, 2, c_new, "bias")], attrs=attrs)


def _matmul_weight(
    scope: Scope, mm: onnx.NodeProto, source: Source
) -> tuple[np.ndarray, int, fold_math.Affine] | Reject:
    """B, the MatMul's output rank and the map sized to its features, when the source's axis is
    its output-feature (last) axis."""
    b = scope.constant(mm.input[1], what="weight (B)")
    a_rank = scope.rank(mm.input[0])
    if a_rank is None:
        return Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            f"rank of MatMul input {mm.input[0]!r} is unknown, so BN's channel axis cannot be proven "
            "to be the output-feature axis",
        )
    if b.ndim != 2 or a_rank < 2:
        return Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            f"MatMul of ranks {a_rank} and {b.ndim}: only a constant matrix B has one output-feature axis",
        )
    if source.kind == "batchnorm" and source.axis not in (None, a_rank - 1):
        return Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            f"MatMul output has rank {a_rank}: BN normalizes axis {source.axis}, which is not the "
            "MatMul's output-feature (last) axis",
        )
    if (bad := _axis_problem(source, a_rank - 1, "MatMul")) is not None:
        return bad
    if (bad := _float_problem(b, "weight (B)")) is not None:
        return bad
    aff = source.widened(b.shape[1]).affine
    if (bad := _channels_problem(aff, "MatMul", b.shape[1])) is not None:
        return bad
    return b, a_rank, aff


def check_matmul(scope: Scope, node: onnx.NodeProto, source: Source) -> Plan | Reject:
    """MatMul with a constant B: rank-2 output becomes Gemm(A, B*s, t) (BN's axis 1 is B's N
    axis); a higher-rank output keeps MatMul(A, B*s) and gains an Add(t) when t != 0."""
    found = _matmul_weight(scope, node, source)
    if isinstance(found, Reject):
        return found
    b, rank, aff = found
    b_new = _scaled(b, aff, "B", axis=1)
    c_new = _cast(fold_math.fold_bias(None, aff), b, "the new bias")
    if rank == 2:
        attrs = ((node, "broadcast", 1),) if scope.index.opset < 7 else ()
        writes = [(node, 1, b_new, "weight"), (node, 2, c_new, "bias")]
        return _plan(source, node, (node,), writes, attrs=attrs, op_type=(node, "Gemm"))
    if isinstance(c_new, np.ndarray) and not np.any(c_new):
        return _plan(source, node, (node,), [(node, 1, b_new, "weight")])
    add = protos.make_node("Add", [node.output[0], ""], [""])  # apply names it
    writes = [(node, 1, b_new, "weight"), (add, 1, c_new, "bias")]
    return _plan(source, node, (node, add), writes, new_nodes=((add, node),))


def check_matmul_add(scope: Scope, add: onnx.NodeProto, source: Source) -> Plan | Reject:
    """MatMul -> Add(c): B' = B*s, c' = c*s + t. The MatMul's output changes values, so
    ``apply`` renames it."""
    found_mm = matmul_of_add(scope, add)
    if found_mm is None:
        return Reject(
            SkipReason.UNSUPPORTED_PRODUCER,
            "Add is not MatMul + constant; an Add of activations cannot absorb BN",
        )
    mm, c_name = found_mm
    if not scope.single_use(mm.output[0]):
        return Reject(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"MatMul output {mm.output[0]!r} also feeds other nodes or is a graph output",
        )
    c = scope.constant(c_name, what="bias (Add constant)")
    found = _matmul_weight(scope, mm, source)
    if isinstance(found, Reject):
        return found
    b, _rank, aff = found
    c_vec = fold_math.channel_vector(c, aff.channels)
    if c_vec is None:
        return Reject(
            SkipReason.BIAS_NOT_PER_CHANNEL,
            f"Add constant has shape {c.shape}, which is not constant per output column",
        )
    b_new = _scaled(b, aff, "B", axis=1)
    c_like = c if c.dtype.kind == "f" or str(c.dtype) == "bfloat16" else b
    c_new = _cast(fold_math.fold_bias(c_vec, aff), c_like, "the Add constant")
    c_index = list(add.input).index(c_name)
    return _plan(source, add, (mm, add), [(mm, 1, b_new, "weight"), (add, c_index, c_new, "bias")])


ABSORBERS: dict[str, Check] = {
    "Conv": check_conv,
    "ConvTranspose": check_conv,
    "Gemm": check_gemm,
    "MatMul": check_matmul,
    "Add": check_matmul_add,
}
"""Op type of the layer producing the source's input -> its check."""
