"""The ONNX pass: fold inference-mode BatchNormalization into the layer that produces its input.

Patterns (the producer absorbs the BN; the producer then writes the BN's output name)::

    Conv          W (C_out, C_in/g, k...)  W' = W * s on axis 0,                b' = b*s + t
    ConvTranspose W (C_in, C_out/g, k...)  W' = W * s on axis 1 within groups,  b' = b*s + t
    Gemm          B (K, N) / transB (N, K) B' = B * s on the N axis, C' = beta*C*s + t, beta := 1
    MatMul (rank-2 output)                 becomes Gemm(A, B*s, t)
    MatMul -> Add(c) (rank-2 output)       B' = B * s, c' = c*s + t

with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (see :mod:`bnfold.fold_math`;
ONNX spec: ``epsilon`` defaults to 1e-5, channel axis is 1).

A BN is left in place, with a :class:`~bnfold.report.SkipReason` and a sentence, when folding
could change outputs: training mode, ``spatial=0``, extra outputs consumed, a producer whose
output is shared or is a graph output, parameters that are not constant (computed at run time,
or an initializer a caller can override because it is also a graph input in IR >= 4), weights
from DequantizeLinear, shape mismatches, a channel axis that is not provably the layer's
output-feature axis, or folded values not representable in the weight's dtype.

Constants are initializers, ``Constant`` nodes, ``Identity`` of constants, and deterministic
nodes whose inputs are all constant (evaluated with onnx's reference evaluator). Subgraphs
(If/Loop/Scan bodies, with outer-scope constants) and model-local functions are folded too.
The pass runs to a fixed point, so ``Conv -> BN -> BN`` folds both and a second run finds
nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import fold_math
from .errors import InputError
from .report import Folded, FoldReport, FoldResult, Skipped, SkipReason

log = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
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
_MAX_CONST_EVAL_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------- public API


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    inplace: bool = False,
    base_dir: str | None = None,
    exclude: Collection[str] = (),
    verify: bool = False,
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model``.

    ``model`` is a ``ModelProto`` (copied unless ``inplace=True``) or a path (loaded; external
    data is read relative to it). ``exclude`` lists BN output tensor names to leave alone.

    With ``verify=True`` the folded model is checked against the original with onnxruntime at
    ``ORT_DISABLE_ALL``, every fold whose tensors diverge is reverted (reason
    ``verification-failed``), and the result is verified again; a model that still fails raises
    :class:`~bnfold.errors.VerificationError` carrying the report.
    """
    start = time.perf_counter()
    source: onnx.ModelProto
    if isinstance(model, onnx.ModelProto):
        source = model
    elif isinstance(model, (str, os.PathLike)):
        from .io import load_model

        source = load_model(os.fspath(model))
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(os.fspath(model)))
        inplace = True  # we own the freshly loaded copy
    else:
        raise InputError(f"fold_onnx: expected an onnx.ModelProto or a path, got {type(model).__name__}")

    if not verify:
        work = source if inplace else _copy(source)
        report = _fold_model(work, base_dir=base_dir, exclude=frozenset(exclude))
        return FoldResult(model=work, report=report, seconds=time.perf_counter() - start)

    from .safe import fold_verified

    def make(excl: frozenset[str]) -> tuple[onnx.ModelProto, FoldReport, onnx.ModelProto]:
        work = _copy(source)
        rep = _fold_model(work, base_dir=base_dir, exclude=excl)
        return work, rep, work

    done = fold_verified(
        make,
        source,
        exclude=frozenset(exclude),
        inputs=inputs,
        shapes=shapes,
        seed=seed,
        samples=samples,
        atol=atol,
        rtol=rtol,
    )
    if inplace:
        source.CopyFrom(done.payload)
        done_model = source
    else:
        done_model = done.payload
    return FoldResult(
        model=done_model,
        report=done.report,
        verification=done.verification,
        seconds=time.perf_counter() - start,
    )


def analyze_onnx(
    model: onnx.ModelProto | str | os.PathLike[str], *, base_dir: str | None = None
) -> FoldReport:
    """What :func:`fold_onnx` would do, without changing ``model``: ``folded`` lists the BN
    nodes that can still be folded, ``skipped`` those that would be left, with reasons."""
    return fold_onnx(model, base_dir=base_dir).report


def count_bn(model: onnx.ModelProto) -> int:
    """Number of BatchNormalization nodes in the model, subgraphs and functions included."""
    graphs: list[Any] = [model.graph, *model.functions]
    n = 0
    for g in graphs:
        for node in _walk_nodes(g.node):
            if node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS:
                n += 1
    return n


def _walk_nodes(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g.node)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk_nodes(g.node)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _read_array(tensor: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    from .io import read_array

    return read_array(tensor, base_dir)


# --------------------------------------------------------------------------- model context


class _Model:
    """Model-wide facts: opset, IR version, every name in use, global use counts."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None, exclude: frozenset[str]) -> None:
        self.model = model
        self.base_dir = base_dir
        self.exclude = exclude
        self.ir_version = model.ir_version
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS),
            1,
        )
        self.names: set[str] = set()
        self.uses: Counter[str] = Counter()
        self._scan_graph(model.graph)
        for f in model.functions:
            self.names.update(f.input)
            self.names.update(f.output)
            self._scan_nodes(f.node)
        self._ranks: dict[str, int] | None = None

    def _scan_graph(self, g: onnx.GraphProto) -> None:
        self.names.update(t.name for t in g.initializer)
        self.names.update(v.name for v in g.input)
        self.names.update(v.name for v in g.output)
        self.names.update(v.name for v in g.value_info)
        for v in g.output:
            self.uses[v.name] += 1
        self._scan_nodes(g.node)

    def _scan_nodes(self, nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            self.names.update(node.output)
            if node.name:
                self.names.add(node.name)
            for i in node.input:
                if i:
                    self.uses[i] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    self._scan_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        self._scan_graph(g)

    def fresh_name(self, base: str) -> str:
        name = base
        i = 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def rank(self, name: str) -> int | None:
        """Rank of a tensor from the model's type information (shape inference on a data-free copy)."""
        if self._ranks is None:
            self._ranks = _infer_ranks(self.model)
        return self._ranks.get(name)


def _infer_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of every typed tensor, via onnx shape inference on a copy without large tensor data."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    src = model.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.initializer.extend(t for t in src.initializer if not _is_large(t))
    declared = {v.name for v in g.input}
    for t in src.initializer:
        if _is_large(t) and t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    _strip_large_data(g)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference is a best-effort source of facts
        log.debug("shape inference failed: %s", exc)
        inferred = light
    ranks: dict[str, int] = {}

    def collect(g: onnx.GraphProto) -> None:
        for v in [*g.input, *g.output, *g.value_info]:
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.HasField("shape"):
                ranks[v.name] = len(t.shape.dim)
        for t in g.initializer:
            ranks[t.name] = len(t.dims)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sg in attr.graphs:
                        collect(sg)

    collect(inferred.graph)
    return ranks


def _is_large(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 4096


def _strip_large_data(g: onnx.GraphProto) -> None:
    """Replace large initializers by typed graph inputs: shapes survive, data does not."""
    keep = []
    for t in g.initializer:
        if _is_large(t):
            if not any(v.name == t.name for v in g.input):
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_large_data(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sg in attr.graphs:
                    _strip_large_data(sg)


# --------------------------------------------------------------------------- scopes


class _NotConstant(Exception):
    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Scope:
    """One graph (or function body) being folded, with a link to its enclosing scope."""

    ctx: _Model
    nodes: Any  # RepeatedCompositeContainer[NodeProto]
    label: str
    graph: onnx.GraphProto | None  # None for a FunctionProto body
    parent: _Scope | None = None
    formal_inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    const_cache: dict[str, np.ndarray] = field(default_factory=dict)
    const_nodes: set[tuple[str, str]] = field(default_factory=set)  # nodes read as constants
    doomed: set[tuple[str, str]] = field(default_factory=set)  # nodes to delete at the end of a pass
    stale_names: set[str] = field(default_factory=set)  # value_info to drop at the end of a pass

    @classmethod
    def of_graph(cls, ctx: _Model, g: onnx.GraphProto, label: str, parent: _Scope | None) -> _Scope:
        s = cls(ctx=ctx, nodes=g.node, label=label, graph=g, parent=parent)
        s.formal_inputs = {v.name for v in g.input}
        s.outputs = {v.name for v in g.output}
        s.initializers = {t.name: t for t in g.initializer}
        s.reindex()
        return s

    @classmethod
    def of_function(cls, ctx: _Model, f: onnx.FunctionProto) -> _Scope:
        s = cls(ctx=ctx, nodes=f.node, label=f"function:{f.domain}.{f.name}", graph=None)
        s.formal_inputs = set(f.input)
        s.outputs = set(f.output)
        s.reindex()
        return s

    def reindex(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output if o}

    # ---- constants

    def overridable(self, name: str) -> bool:
        """An initializer also listed as a graph input can be fed at run time (IR >= 4)."""
        return name in self.formal_inputs and self.ctx.ir_version >= 4

    def constant(self, name: str, *, what: str) -> np.ndarray:
        """The value of ``name`` if it is a constant here, else raise :class:`_NotConstant`."""
        if name in self.const_cache:
            return self.const_cache[name]
        value = self._constant(name, what=what, depth=0)
        self.const_cache[name] = value
        return value

    def _constant(self, name: str, *, what: str, depth: int) -> np.ndarray:
        if depth > 64:
            raise _NotConstant(
                _non_const_reason(what), f"{what} {name!r} comes from a constant chain too deep to evaluate"
            )
        if name in self.initializers:
            if self.overridable(name):
                raise _NotConstant(
                    _non_const_reason(what),
                    f"{what} {name!r} is an initializer also listed as a graph input, so it can be overridden at run time",
                )
            return _read_array(self.initializers[name], self.ctx.base_dir)
        node = self.producer.get(name)
        if node is None:
            if name in self.formal_inputs:
                raise _NotConstant(_non_const_reason(what), f"{what} {name!r} is a graph input")
            if self.parent is not None:
                return self.parent.constant(name, what=what)
            raise _NotConstant(_non_const_reason(what), f"{what} {name!r} has no producer in this graph")
        if (
            node.op_type in ("DequantizeLinear", "QLinearConv", "DynamicQuantizeLinear")
            or node.domain not in _DEFAULT_DOMAINS
        ):
            if node.op_type == "DequantizeLinear":
                raise _NotConstant(
                    SkipReason.QUANTIZED_WEIGHT,
                    f"{what} {name!r} is produced by DequantizeLinear {node.name!r} (quantized model)",
                )
            raise _NotConstant(
                _non_const_reason(what),
                f"{what} {name!r} is computed by {node.domain}:{node.op_type} {node.name!r}",
            )
        if node.op_type == "Constant":
            self.const_nodes.add(_node_id(node))
            return _constant_node_value(node)
        if node.op_type == "Identity":
            value = self._constant(node.input[0], what=what, depth=depth + 1)
            self.const_nodes.add(_node_id(node))
            return value
        if node.op_type in _NONDETERMINISTIC or _has_subgraph(node):
            raise _NotConstant(
                _non_const_reason(what),
                f"{what} {name!r} is computed at run time by {node.op_type} {node.name!r}",
            )
        args = []
        for i in node.input:
            args.append(None if not i else self._constant(i, what=what, depth=depth + 1))
        value = _evaluate(node, args, name, self.ctx.opset)
        if value is None:
            raise _NotConstant(
                _non_const_reason(what),
                f"{what} {name!r} is computed by {node.op_type} {node.name!r}, which could not be evaluated",
            )
        self.const_nodes.add(_node_id(node))
        return value

    def add_constant(self, base: str, value: np.ndarray, *, before: onnx.NodeProto) -> str:
        """Add a new constant named after ``base`` (an initializer, or a Constant node in a function)."""
        name = self.ctx.fresh_name(base)
        tensor = numpy_helper.from_array(value, name)
        if self.graph is not None:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]  # append() stored a copy
            if self.ctx.ir_version <= 3 and self.parent is None:
                self.graph.input.append(
                    helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
                )
                self.formal_inputs.add(name)
        else:
            node = helper.make_node(
                "Constant", [], [name], value=tensor, name=self.ctx.fresh_name(name + "_const")
            )
            idx = _index_of(self.nodes, before)
            self.nodes.insert(idx, node)
            self.producer[name] = self.nodes[idx]
        return name


def _non_const_reason(what: str) -> SkipReason:
    return SkipReason.NON_CONSTANT_BN_PARAM if what.startswith("BN") else SkipReason.NON_CONSTANT_WEIGHT


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _node_id(node: onnx.NodeProto) -> tuple[str, str]:
    """A node's identity in its graph: op type and first output (outputs are unique in SSA)."""
    return (node.op_type, node.output[0] if node.output else "")


def _index_of(nodes: Any, target: onnx.NodeProto) -> int:
    key = _node_id(target)
    for i, n in enumerate(nodes):
        if _node_id(n) == key:
            return i
    raise ValueError("node not in graph")


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise _NotConstant(
        SkipReason.NON_CONSTANT_WEIGHT, f"Constant {node.name!r} has an unsupported {attr.name!r}"
    )


def _evaluate(
    node: onnx.NodeProto, args: list[np.ndarray | None], name: str, opset: int
) -> np.ndarray | None:
    """Evaluate one deterministic node on constant inputs with onnx's reference evaluator."""
    if sum(a.size for a in args if a is not None) > _MAX_CONST_EVAL_ELEMENTS:
        return None
    try:
        from onnx.reference import ReferenceEvaluator

        feeds = {}
        inputs = []
        for i, (nm, a) in enumerate(zip(node.input, args)):
            if not nm:
                continue
            key = f"in{i}"
            feeds[key] = a
            inputs.append(
                helper.make_tensor_value_info(key, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            )
        new_inputs = [f"in{i}" if nm else "" for i, nm in enumerate(node.input)]
        outs = [f"out{i}" for i in range(len(node.output))]
        n = helper.make_node(node.op_type, new_inputs, outs, domain=node.domain)
        n.attribute.extend(node.attribute)
        g = helper.make_graph(
            [n], "const", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(m).run(None, feeds)
        return np.asarray(results[list(node.output).index(name)])
    except Exception as exc:  # noqa: BLE001 - evaluation is best-effort; failure means "not constant"
        log.debug("could not evaluate %s %s: %s", node.op_type, node.name, exc)
        return None


# --------------------------------------------------------------------------- the pass


def _fold_model(model: onnx.ModelProto, *, base_dir: str | None, exclude: frozenset[str]) -> FoldReport:
    ctx = _Model(model, base_dir, exclude)
    folded: list[Folded] = []
    skipped: list[Skipped] = []
    scopes: list[_Scope] = []
    _collect_scopes(ctx, model.graph, "", None, scopes)
    for f in model.functions:
        scopes.append(_Scope.of_function(ctx, f))
        for node in f.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    _collect_scopes(
                        ctx,
                        attr.g,
                        f"function:{f.name}/{node.name or node.op_type}/{attr.name}",
                        None,
                        scopes,
                    )
    for scope in scopes:
        f_list, s_list = _fold_scope(scope)
        folded.extend(f_list)
        skipped.extend(s_list)
    _remove_dead(ctx, scopes)
    return FoldReport(folded=tuple(folded), skipped=tuple(skipped))


def _collect_scopes(
    ctx: _Model, g: onnx.GraphProto, label: str, parent: _Scope | None, out: list[_Scope]
) -> None:
    scope = _Scope.of_graph(ctx, g, label, parent)
    out.append(scope)
    for node in g.node:
        for attr in node.attribute:
            sub_label = f"{label + '/' if label else ''}{node.name or node.op_type}/{attr.name}"
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_scopes(ctx, attr.g, sub_label, scope, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, sg in enumerate(attr.graphs):
                    _collect_scopes(ctx, sg, f"{sub_label}[{i}]", scope, out)


def _fold_scope(scope: _Scope) -> tuple[list[Folded], list[Skipped]]:
    """Fold BN nodes of one scope to a fixed point; return folds and the final skips."""
    folded: list[Folded] = []
    while True:
        skipped: list[Skipped] = []
        progress = False
        for bn in [
            n for n in scope.nodes if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
        ]:
            outcome = _try_fold(scope, bn)
            if isinstance(outcome, Folded):
                folded.append(outcome)
                progress = True
                log.debug("folded %s into %s", outcome.bn, outcome.producer)
            else:
                skipped.append(outcome)
        _flush(scope)
        if not progress:
            return folded, skipped


def _bn_label(bn: onnx.NodeProto) -> str:
    return bn.name or f"BatchNormalization({bn.output[0]})"


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _try_fold(scope: _Scope, bn: onnx.NodeProto) -> Folded | Skipped:
    """Fold ``bn`` into its producer, or say why not.

    Handles: Conv (any group, with/without bias), ConvTranspose (any group), Gemm (transB,
    alpha, beta, C absent/scalar/(N,)/(1,N)), MatMul and MatMul->Add with a rank-2 output.
    """
    ctx = scope.ctx
    out = bn.output[0]
    label = _bn_label(bn)

    def skip(reason: SkipReason, detail: str, producer: onnx.NodeProto | None = None) -> Skipped:
        return Skipped(
            bn=label,
            reason=reason,
            detail=detail,
            output=out,
            graph=scope.label,
            producer=(producer.name if producer is not None else ""),
            producer_op=(producer.op_type if producer is not None else ""),
        )

    if out in ctx.exclude:
        return skip(SkipReason.EXCLUDED, "excluded by the caller")

    # --- inference mode
    if ctx.opset <= 6 and int(_attr(bn, "is_test", 0)) != 1:
        return skip(
            SkipReason.TRAINING_MODE, "is_test is not 1 (opset <= 6 default is training: batch statistics)"
        )
    if int(_attr(bn, "training_mode", 0)) != 0:
        return skip(SkipReason.TRAINING_MODE, "training_mode=1: the node normalizes with batch statistics")
    for extra in bn.output[1:]:
        if extra and ctx.uses[extra] > 0:
            return skip(
                SkipReason.EXTRA_OUTPUTS_USED, f"output {extra!r} (running/saved statistics) is consumed"
            )
    if ctx.opset < 14 and any(bn.output[1:]):
        return skip(
            SkipReason.TRAINING_MODE,
            f"opset {ctx.opset} BN declares {sum(1 for o in bn.output if o)} outputs, which is training mode: "
            "onnxruntime normalizes with batch statistics even when they are unused",
        )
    if ctx.opset <= 8 and int(_attr(bn, "spatial", 1)) != 1:
        return skip(SkipReason.SPATIAL_0, "spatial=0: statistics are per element, not per channel")
    if len(bn.input) < 5 or not bn.input[0]:
        return skip(SkipReason.SHAPE_MISMATCH, "BatchNormalization needs five inputs")

    # --- producer
    x = bn.input[0]
    producer = scope.producer.get(x)
    if producer is None:
        where = "a graph input" if x in scope.formal_inputs else "an initializer or outer-scope value"
        return skip(SkipReason.NO_PRODUCER, f"its input {x!r} is {where}; no layer to fold into")
    if producer.domain not in _DEFAULT_DOMAINS or producer.op_type not in (
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Add",
    ):
        return skip(
            SkipReason.UNSUPPORTED_PRODUCER,
            f"its input comes from {producer.op_type} {producer.name!r}, which cannot absorb a per-channel affine map",
            producer,
        )
    if x in scope.outputs or ctx.uses[x] != 1:
        return skip(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"{producer.op_type} output {x!r} also feeds other nodes or is a graph output",
            producer,
        )

    # --- BN parameters
    try:
        gamma, beta, mean, var = (
            scope.constant(n, what=f"BN {w}") for n, w in zip(bn.input[1:5], ("scale", "bias", "mean", "var"))
        )
    except _NotConstant as e:
        return skip(e.reason, e.detail, producer)
    if not all(
        np.issubdtype(np.asarray(a).dtype, np.floating) or str(np.asarray(a).dtype) == "bfloat16"
        for a in (gamma, beta, mean, var)
    ):
        return skip(SkipReason.UNSUPPORTED_DTYPE, "BN parameters are not floating point", producer)
    shapes = {np.asarray(a).shape for a in (gamma, beta, mean, var)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return skip(
            SkipReason.SHAPE_MISMATCH, f"BN parameters have shapes {sorted(shapes)}, expected (C,)", producer
        )
    eps = float(_attr(bn, "epsilon", fold_math.DEFAULT_EPSILON))
    affine = fold_math.bn_affine(gamma, beta, mean, var, eps)

    handler = _HANDLERS[producer.op_type]
    try:
        result = handler(scope, producer, bn, affine)
    except _NotConstant as e:
        return skip(e.reason, e.detail, producer)
    if isinstance(result, _Reject):
        return skip(result.reason, result.detail, producer)
    new_names, absorber = result.new_names, result.node
    _rewire(scope, producer=absorber, old_out=x, bn=bn)
    return Folded(
        bn=label,
        producer=absorber.name or absorber.op_type,
        producer_op=absorber.op_type,
        output=out,
        graph=scope.label,
        new_initializers=tuple(new_names),
    )


@dataclass(frozen=True)
class _Reject:
    reason: SkipReason
    detail: str


@dataclass(frozen=True)
class _Absorbed:
    new_names: list[str]
    node: onnx.NodeProto


def _weight(scope: _Scope, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    return scope.constant(node.input[index], what=what)


def _check_float(w: np.ndarray, what: str) -> _Reject | None:
    if w.dtype.kind != "f" and str(w.dtype) != "bfloat16":
        return _Reject(
            SkipReason.UNSUPPORTED_DTYPE,
            f"{what} has dtype {w.dtype}, only floating-point weights are folded",
        )
    return None


def _cast(values: np.ndarray, like: np.ndarray, what: str, channel_axis: int | None) -> np.ndarray | _Reject:
    out, why = fold_math.cast_exact(values, like.dtype, channel_axis=channel_axis, original=like)
    if out is None:
        return _Reject(SkipReason.NOT_REPRESENTABLE, f"folding into {what}: {why}")
    return out


def _scaled(
    w: np.ndarray, aff: fold_math.Affine, what: str, *, axis: int, groups: int = 1
) -> np.ndarray | _Reject:
    out, why = fold_math.scale_weight_exact(w, aff.scale, axis=axis, groups=groups)
    if out is None:
        return _Reject(SkipReason.NOT_REPRESENTABLE, f"folding into {what}: {why}")
    return out


def _fold_conv(scope: _Scope, node: onnx.NodeProto, bn: onnx.NodeProto, aff: fold_math.Affine):
    """Conv: W (C_out, C_in/g, k...) scaled on axis 0 (any group), bias b*s + t."""
    transpose = node.op_type == "ConvTranspose"
    w = _weight(scope, node, 1, "weight")
    if (bad := _check_float(w, "weight")) is not None:
        return bad
    if w.ndim < 3:
        return _Reject(SkipReason.SHAPE_MISMATCH, f"weight has rank {w.ndim}, expected >= 3")
    group = int(_attr(node, "group", 1))
    c_out = w.shape[1] * group if transpose else w.shape[0]
    if aff.channels != c_out:
        return _Reject(
            SkipReason.SHAPE_MISMATCH, f"BN has {aff.channels} channels, {node.op_type} outputs {c_out}"
        )
    if transpose and w.shape[0] % group:
        return _Reject(SkipReason.SHAPE_MISMATCH, f"weight {w.shape} does not split into {group} groups")
    has_bias = len(node.input) > 2 and bool(node.input[2])
    b = _weight(scope, node, 2, "bias") if has_bias else None
    if b is not None and (b.shape != (c_out,)):
        return _Reject(SkipReason.SHAPE_MISMATCH, f"bias has shape {b.shape}, expected ({c_out},)")
    w_axis = 1 if transpose else 0
    w_new = _scaled(w, aff, "the weight", axis=w_axis, groups=group if transpose else 1)
    if isinstance(w_new, _Reject):
        return w_new
    b_new = _cast(fold_math.fold_bias(b, aff), b if b is not None else w, "the bias", None)
    if isinstance(b_new, _Reject):
        return b_new
    names = _set_input(scope, node, 1, w_new, "weight")
    names += _set_input(scope, node, 2, b_new, "bias")
    return _Absorbed(names, node)


def _fold_gemm(scope: _Scope, node: onnx.NodeProto, bn: onnx.NodeProto, aff: fold_math.Affine):
    """Gemm: Y = alpha*A'B' + beta*C. B's N axis scaled; C' = (beta*C)*s + t; beta := 1."""
    b = _weight(scope, node, 1, "weight (B)")
    if (bad := _check_float(b, "weight (B)")) is not None:
        return bad
    if b.ndim != 2:
        return _Reject(SkipReason.SHAPE_MISMATCH, f"B has rank {b.ndim}")
    trans_b = int(_attr(node, "transB", 0))
    n_axis = 0 if trans_b else 1
    if aff.channels != b.shape[n_axis]:
        return _Reject(
            SkipReason.SHAPE_MISMATCH, f"BN has {aff.channels} channels, Gemm outputs {b.shape[n_axis]}"
        )
    beta = float(_attr(node, "beta", 1.0))
    has_c = len(node.input) > 2 and bool(node.input[2])
    c_vec = None
    if has_c:
        c = _weight(scope, node, 2, "bias (C)")
        c_vec = fold_math.channel_vector(c, aff.channels)
        if c_vec is None:
            return _Reject(
                SkipReason.BIAS_NOT_PER_CHANNEL,
                f"C has shape {c.shape}, which is not constant per output column",
            )
        c_vec = c_vec * float(np.float32(beta))
    b_new = _scaled(b, aff, "B", axis=n_axis)
    if isinstance(b_new, _Reject):
        return b_new
    c_new = _cast(fold_math.fold_bias(c_vec, aff), b, "C", None)
    if isinstance(c_new, _Reject):
        return c_new
    names = _set_input(scope, node, 1, b_new, "weight")
    names += _set_input(scope, node, 2, c_new, "bias")
    _set_attr(node, "beta", 1.0)
    if scope.ctx.opset < 7:
        _set_attr(node, "broadcast", 1)
    return _Absorbed(names, node)


def _fold_matmul(scope: _Scope, node: onnx.NodeProto, bn: onnx.NodeProto, aff: fold_math.Affine):
    """MatMul with a rank-2 output: becomes Gemm(A, B*s, t), so BN's axis 1 is B's N axis."""
    b = _weight(scope, node, 1, "weight (B)")
    if (bad := _matmul_axis_problem(scope, node, b)) is not None:
        return bad
    if (bad2 := _check_float(b, "weight (B)")) is not None:
        return bad2
    if aff.channels != b.shape[1]:
        return _Reject(
            SkipReason.SHAPE_MISMATCH, f"BN has {aff.channels} channels, MatMul outputs {b.shape[1]}"
        )
    b_new = _scaled(b, aff, "B", axis=1)
    if isinstance(b_new, _Reject):
        return b_new
    c_new = _cast(fold_math.fold_bias(None, aff), b, "the new bias", None)
    if isinstance(c_new, _Reject):
        return c_new
    names = _set_input(scope, node, 1, b_new, "weight")
    node.op_type = "Gemm"
    del node.attribute[:]
    if scope.ctx.opset < 7:
        node.attribute.append(helper.make_attribute("broadcast", 1))
    names += _set_input(scope, node, 2, c_new, "bias")
    return _Absorbed(names, node)


def _matmul_axis_problem(scope: _Scope, node: onnx.NodeProto, b: np.ndarray) -> _Reject | None:
    """BN normalizes axis 1; that is the MatMul's output-feature axis only for a rank-2 output."""
    a_rank = scope.ctx.rank(node.input[0])
    b_rank = b.ndim
    if a_rank is None:
        return _Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            (
                f"rank of MatMul input {node.input[0]!r} is unknown, so BN's channel axis cannot be proven "
                "to be the output-feature axis"
            ),
        )
    if a_rank != 2 or b_rank != 2:
        return _Reject(
            SkipReason.CHANNEL_AXIS_MISMATCH,
            (
                f"MatMul output has rank {max(a_rank, b_rank)}: BN normalizes axis 1, which is not the "
                "MatMul's output-feature (last) axis"
            ),
        )
    return None


def _fold_add(scope: _Scope, add: onnx.NodeProto, bn: onnx.NodeProto, aff: fold_math.Affine):
    """MatMul -> Add(c) with a rank-2 output: B' = B*s, c' = c*s + t."""
    mm = None
    c_name = None
    for i, other in ((0, 1), (1, 0)):
        p = scope.producer.get(add.input[i])
        if p is not None and p.op_type == "MatMul" and p.domain in _DEFAULT_DOMAINS:
            mm, c_name = p, add.input[other]
            break
    if mm is None or c_name is None:
        return _Reject(
            SkipReason.UNSUPPORTED_PRODUCER,
            "Add is not MatMul + constant; an Add of activations cannot absorb BN",
        )
    mm_out = mm.output[0]
    if mm_out in scope.outputs or scope.ctx.uses[mm_out] != 1:
        return _Reject(
            SkipReason.PRODUCER_OUTPUT_SHARED,
            f"MatMul output {mm_out!r} also feeds other nodes or is a graph output",
        )
    c = scope.constant(c_name, what="bias (Add constant)")
    b = _weight(scope, mm, 1, "weight (B)")
    if (bad := _matmul_axis_problem(scope, mm, b)) is not None:
        return bad
    if (bad2 := _check_float(b, "weight (B)")) is not None:
        return bad2
    if aff.channels != b.shape[1]:
        return _Reject(
            SkipReason.SHAPE_MISMATCH, f"BN has {aff.channels} channels, MatMul outputs {b.shape[1]}"
        )
    c_vec = fold_math.channel_vector(c, aff.channels)
    if c_vec is None:
        return _Reject(
            SkipReason.BIAS_NOT_PER_CHANNEL,
            f"Add constant has shape {c.shape}, which is not constant per output column",
        )
    b_new = _scaled(b, aff, "B", axis=1)
    if isinstance(b_new, _Reject):
        return b_new
    c_like = c if c.dtype.kind == "f" or str(c.dtype) == "bfloat16" else b
    c_new = _cast(fold_math.fold_bias(c_vec, aff), c_like, "the Add constant", None)
    if isinstance(c_new, _Reject):
        return c_new
    names = _set_input(scope, mm, 1, b_new, "weight")
    c_index = list(add.input).index(c_name)
    names += _set_input(scope, add, c_index, c_new, "bias")
    return _Absorbed(names, add)


_HANDLERS: dict[str, Callable[..., Any]] = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
    "Add": _fold_add,
}


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _set_input(scope: _Scope, node: onnx.NodeProto, index: int, value: np.ndarray, kind: str) -> list[str]:
    """Point ``node.input[index]`` at ``value``.

    An initializer of this scope used only by this node is overwritten in place (its name is
    kept); anything shared, overridable, outer-scope or computed gets a fresh initializer with a
    name that collides with nothing, so other users keep the original values.
    """
    ctx = scope.ctx
    old = node.input[index] if index < len(node.input) else ""
    if (
        old
        and old in scope.initializers
        and ctx.uses[old] == 1
        and not scope.overridable(old)
        and old not in scope.outputs
    ):
        t = scope.initializers[old]
        new_t = numpy_helper.from_array(value, old)
        new_t.doc_string = t.doc_string
        t.CopyFrom(new_t)
        scope.const_cache.pop(old, None)
        return []
    base = f"{old or (node.name or node.op_type) + '_' + kind}_bnfold"
    name = scope.add_constant(base, value, before=node)
    while len(node.input) <= index:
        node.input.append("")
    if old:
        ctx.uses[old] -= 1
    node.input[index] = name
    ctx.uses[name] += 1
    return [name]


def _rewire(scope: _Scope, *, producer: onnx.NodeProto, old_out: str, bn: onnx.NodeProto) -> None:
    """Make ``producer`` write BN's output and delete BN (and its now-dead parameter uses)."""
    ctx = scope.ctx
    new_out = bn.output[0]
    for i, o in enumerate(producer.output):
        if o == old_out:
            producer.output[i] = new_out
    for i in bn.input:
        if i:
            ctx.uses[i] -= 1
    scope.doomed.add(_node_id(bn))
    scope.producer.pop(old_out, None)
    scope.producer[new_out] = producer
    for extra in bn.output[1:]:
        scope.producer.pop(extra, None)
    scope.stale_names.update({old_out, *[e for e in bn.output[1:] if e]})


def _flush(scope: _Scope) -> None:
    """Delete the nodes and value_info marked dead, in one pass over each list.

    Deleting one node at a time means a linear search per fold: quadratic on models with
    thousands of folds.
    """
    if scope.doomed:
        for i in reversed([i for i, n in enumerate(scope.nodes) if _node_id(n) in scope.doomed]):
            del scope.nodes[i]
        scope.doomed.clear()
    if scope.stale_names and scope.graph is not None:
        _drop_value_info(scope.graph, scope.stale_names)
    scope.stale_names.clear()


def _drop_value_info(g: onnx.GraphProto, names: set[str]) -> None:
    keep = [v for v in g.value_info if v.name not in names]
    if len(keep) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(keep)


def _remove_dead(ctx: _Model, scopes: list[_Scope]) -> None:
    """Drop initializers and constant-chain nodes that no longer feed anything."""
    changed = True
    while changed:
        changed = False
        for scope in scopes:
            dead_nodes = [
                n
                for n in scope.nodes
                if _node_id(n) in scope.const_nodes
                and all(ctx.uses[o] == 0 and o not in scope.outputs for o in n.output if o)
            ]
            for n in dead_nodes:
                for i in n.input:
                    if i:
                        ctx.uses[i] -= 1
                scope.doomed.add(_node_id(n))
                for o in n.output:
                    scope.producer.pop(o, None)
                scope.stale_names.update(n.output)
                changed = True
            _flush(scope)
    for scope in scopes:
        g = scope.graph
        if g is None:
            continue
        dead = {
            t.name
            for t in g.initializer
            if ctx.uses[t.name] <= 0
            and t.name not in scope.outputs
            and t.name in ctx.uses  # never-used initializers are not ours to delete
            and not scope.overridable(t.name)
        }
        if not dead:
            continue
        # delete in place: rebuilding the list would copy every tensor's bytes
        for i in reversed([i for i, t in enumerate(g.initializer) if t.name in dead]):
            del g.initializer[i]
        if ctx.ir_version <= 3:
            inputs = [v for v in g.input if v.name not in dead]
            del g.input[:]
            g.input.extend(inputs)
        _drop_value_info(g, dead)
