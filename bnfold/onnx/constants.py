"""What is constant: a value that depends only on constants.

Constants are initializers that no caller can override (not also graph inputs at IR >= 4),
``Constant`` nodes, ``Identity`` of constants, and deterministic nodes whose inputs are all
constant (evaluated with onnx's reference evaluator). In a subgraph, names not found locally
resolve in the enclosing scope. Anything else raises :class:`NotConstant` with the skip reason
and a sentence for the report.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from bnfold.onnxlib import onnx

from ..errors import InputError
from ..report import SkipReason
from . import protos
from .attrs import attr

if TYPE_CHECKING:  # the protocol below is what this module reads; graph.Scope implements it
    from collections.abc import Mapping

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops whose output is not a pure function of their inputs: never evaluated as constants.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}
_QUANTIZED = ("DequantizeLinear", "QLinearConv", "DynamicQuantizeLinear")
MAX_EVAL_ELEMENTS = 1 << 26
_MAX_DEPTH = 64


class NotConstant(Exception):
    """``name`` is not a constant: ``reason`` is the skip reason, ``detail`` the sentence."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ConstantScope(Protocol):
    """What constant resolution reads from a scope (implemented by :class:`bnfold.onnx.graph.Scope`)."""

    initializers: Mapping[str, onnx.TensorProto]
    producer: Mapping[str, onnx.NodeProto]
    formal_inputs: set[str]
    const_nodes: set[tuple[str, str]]

    @property
    def parent(self) -> ConstantScope | None: ...

    @property
    def index(self) -> Any: ...  # ModelIndex: opset, base_dir

    def overridable(self, name: str) -> bool: ...

    def constant(self, name: str, *, what: str) -> np.ndarray: ...

    def shape(self, name: str) -> tuple[int | str | None, ...] | None: ...

    def elem_type(self, name: str) -> int | None: ...


def non_const_reason(what: str) -> SkipReason:
    """BN parameters and layer weights have their own reason codes."""
    return SkipReason.NON_CONSTANT_BN_PARAM if what.startswith("BN") else SkipReason.NON_CONSTANT_WEIGHT


def resolve(scope: ConstantScope, name: str, *, what: str, depth: int = 0) -> np.ndarray:
    """The value of ``name`` in ``scope``, or raise :class:`NotConstant`.

    ``what`` names the role of the tensor in the report ("weight", "BN scale"...). Nodes read
    as constants are recorded in ``scope.const_nodes`` so dead ones can be removed after folding.
    """
    if depth > _MAX_DEPTH:
        raise NotConstant(
            non_const_reason(what), f"{what} {name!r} comes from a constant chain too deep to evaluate"
        )
    if name in scope.initializers:
        if scope.overridable(name):
            raise NotConstant(
                non_const_reason(what),
                f"{what} {name!r} is an initializer also listed as a graph input, so it can be overridden at run time",
            )
        return read_initializer(scope.initializers[name], scope.index.base_dir, scope.index.io_cache)
    node = scope.producer.get(name)
    if node is None:
        if name in scope.formal_inputs:
            raise NotConstant(non_const_reason(what), f"{what} {name!r} is a graph input")
        if scope.parent is not None:
            return scope.parent.constant(name, what=what)
        raise NotConstant(non_const_reason(what), f"{what} {name!r} has no producer in this graph")
    if node.op_type in _QUANTIZED or node.domain not in _DEFAULT_DOMAINS:
        if node.op_type == "DequantizeLinear":
            raise NotConstant(
                SkipReason.QUANTIZED_WEIGHT,
                f"{what} {name!r} is produced by DequantizeLinear {node.name!r} (quantized model)",
            )
        raise NotConstant(
            non_const_reason(what),
            f"{what} {name!r} is computed by {node.domain}:{node.op_type} {node.name!r}",
        )
    key = (node.op_type, node.output[0] if node.output else "")
    if node.op_type == "Constant":
        scope.const_nodes.add(key)
        return constant_node_value(node)
    if node.op_type == "Identity":
        value = resolve(scope, node.input[0], what=what, depth=depth + 1)
        scope.const_nodes.add(key)
        return value
    if node.op_type in _METADATA_OPS:
        value = _from_metadata(scope, node, what=what, depth=depth)
        scope.const_nodes.add(key)
        return value
    if node.op_type in _NONDETERMINISTIC or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        raise NotConstant(
            non_const_reason(what), f"{what} {name!r} is computed at run time by {node.op_type} {node.name!r}"
        )
    args = [None if not i else resolve(scope, i, what=what, depth=depth + 1) for i in node.input]
    size = output_size(node, args, name, scope.index.opset)
    if size is None or size > MAX_EVAL_ELEMENTS:
        amount = "an unknown number of" if size is None else f"{size:,}"
        raise NotConstant(
            non_const_reason(what),
            f"{what} {name!r} is computed by {node.op_type} {node.name!r}, which would make {amount} "
            f"elements: too large to evaluate (the limit is {MAX_EVAL_ELEMENTS:,})",
        )
    value = evaluate(node, args, name, scope.index.opset)
    if value is None:
        raise NotConstant(
            non_const_reason(what),
            f"{what} {name!r} is computed by {node.op_type} {node.name!r}, which could not be evaluated",
        )
    scope.const_nodes.add(key)
    return value


_METADATA_OPS = ("CastLike", "Shape", "Size")


def _from_metadata(scope: ConstantScope, node: onnx.NodeProto, *, what: str, depth: int) -> np.ndarray:
    """Ops that read only static metadata of one input: ``CastLike``'s second input contributes
    its element type, ``Shape``/``Size`` a static shape. That input need not be constant (torch's
    exporter writes a bias-less Conv's zero bias as ``Expand(CastLike(0, x), Shape(W)[0:1])``)."""
    subject = node.input[1] if node.op_type == "CastLike" else node.input[0]
    if node.op_type == "CastLike":
        elem = scope.elem_type(subject)
        if elem is None or elem == onnx.TensorProto.UNDEFINED:
            elem = protos.data_type_of(resolve(scope, subject, what=what, depth=depth + 1).dtype)
        value = resolve(scope, node.input[0], what=what, depth=depth + 1)
        return value.astype(protos.np_dtype(elem))
    shape = scope.shape(subject)
    if shape is None or not all(isinstance(d, int) for d in shape):
        try:
            shape = resolve(scope, subject, what=what, depth=depth + 1).shape
        except NotConstant:
            raise NotConstant(
                non_const_reason(what),
                f"{what} {node.output[0]!r} is the {node.op_type} of {subject!r}, whose shape is not static",
            ) from None
    dims = np.array([int(d) for d in shape], dtype=np.int64)  # type: ignore[arg-type]
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), dtype=np.int64)
    rank = len(dims)
    start = _clamp(attr(node, "start", 0, "INT"), rank)
    end = _clamp(attr(node, "end", rank, "INT"), rank)
    return dims[start:end]


def _clamp(axis: int, rank: int) -> int:
    """ONNX Shape's start/end: negative counts from the back; clamped to [0, rank]."""
    return min(max(axis + rank if axis < 0 else axis, 0), rank)


def read_initializer(
    tensor: onnx.TensorProto, base_dir: str | None, cache: dict[str, Any] | None = None
) -> np.ndarray:
    """An initializer's values, reading external data (or a lazy stub) relative to ``base_dir``.

    ``cache``: a dict kept for one pass, where the I/O layer remembers the data files it has
    resolved (a model names one file from thousands of tensors)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return protos.to_array(tensor)
    from .io import Files, read_array  # lazy: the pass loads I/O only for external data

    files = None
    if cache is not None:
        files = cache.get("files")
        if files is None:
            files = cache["files"] = Files()
    return read_array(tensor, base_dir, files)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a ``Constant`` node."""
    name = node.attribute[0].name
    if name == "value":
        try:
            return protos.to_array(attr(node, name, None, "TENSOR"))
        except (TypeError, ValueError) as e:  # a tensor the loader did not see: an in-memory model
            raise InputError(
                f"Constant {node.name or node.output[0]!r}: its value cannot be read ({e})"
            ) from None
    if name in _CONSTANT_VALUES:
        kind, dtype = _CONSTANT_VALUES[name]
        return np.array(attr(node, name, None, kind), dtype=dtype)
    raise NotConstant(SkipReason.NON_CONSTANT_WEIGHT, f"Constant {node.name!r} has an unsupported {name!r}")


_CONSTANT_VALUES = {
    "value_float": ("FLOAT", np.float32),
    "value_floats": ("FLOATS", np.float32),
    "value_int": ("INT", np.int64),
    "value_ints": ("INTS", np.int64),
}


_SMALL_ARG = 1024
"""Inputs up to this many elements are given to shape inference by value (a shape, repeats,
pads, scales, a Range's bounds); larger ones by shape only."""


def output_size(node: onnx.NodeProto, args: list[np.ndarray | None], name: str, opset: int) -> int | None:
    """How many elements ``node``'s output ``name`` has, from onnx shape inference on the node
    alone with its constant inputs, before anything is computed; None when inference cannot tell.

    Inputs are capped, outputs must be too: ``ConstantOfShape([2**29])``, ``Expand``, ``Tile``,
    ``Range``, ``Pad``, ``Resize`` or a broadcasting ``Add`` of two vectors turn a few bytes of
    model into gigabytes."""
    try:
        m = _node_model(node, args, opset, by_value=_SMALL_ARG)
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - an op inference rejects: its size is unknown
        log.debug("no output size for %s %s: %s", node.op_type, node.name, exc)
        return None
    wanted = f"out{list(node.output).index(name)}"
    found = {v.name: v.type for v in [*inferred.graph.output, *inferred.graph.value_info]}.get(wanted)
    if found is None or not found.HasField("tensor_type") or not found.tensor_type.HasField("shape"):
        return None
    dims = found.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return int(np.prod([d.dim_value for d in dims], dtype=object))


def evaluate(node: onnx.NodeProto, args: list[np.ndarray | None], name: str, opset: int) -> np.ndarray | None:
    """Evaluate one deterministic node on constant inputs with onnx's reference evaluator."""
    if sum(a.size for a in args if a is not None) > MAX_EVAL_ELEMENTS:
        return None
    try:
        from onnx.reference import ReferenceEvaluator

        m = _node_model(node, args, opset)
        feeds = {f"in{i}": a for i, (nm, a) in enumerate(zip(node.input, args)) if nm and a is not None}
        results = ReferenceEvaluator(m).run(None, feeds)
        return np.asarray(results[list(node.output).index(name)])
    except Exception as exc:  # noqa: BLE001 - evaluation is best-effort; failure means "not constant"
        log.debug("could not evaluate %s %s: %s", node.op_type, node.name, exc)
        return None


def _node_model(
    node: onnx.NodeProto, args: list[np.ndarray | None], opset: int, *, by_value: int = 0
) -> onnx.ModelProto:
    """A model of ``node`` alone: input ``i`` is ``in{i}``, typed and shaped like ``args[i]``
    (an initializer too when it has at most ``by_value`` elements), output ``i`` is ``out{i}``."""
    inputs, inits = [], []
    for i, (nm, a) in enumerate(zip(node.input, args)):
        if nm and a is not None:
            key = f"in{i}"
            inputs.append(protos.make_tensor_value_info(key, protos.data_type_of(a.dtype), a.shape))
            if a.size <= by_value:
                inits.append(protos.from_array(np.asarray(a), key))
    names = [f"in{i}" if nm and a is not None else "" for i, (nm, a) in enumerate(zip(node.input, args))]
    outs = [f"out{i}" for i in range(len(node.output))]
    n = protos.make_node(node.op_type, names, outs, domain=node.domain)
    n.attribute.extend(node.attribute)
    g = onnx.helper.make_graph(
        [n], "node", inputs, [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outs], inits
    )
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
