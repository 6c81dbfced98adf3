"""Model facts the pass and the verifier read: scopes, names, uses, producers, types and shapes.

A *namespace* is where tensor names live: the main graph together with its subgraphs (If/Loop/
Scan bodies read outer-scope names), and each model-local function together with its
subgraphs. Use counts and fresh names are kept per namespace: a name in a function body has
nothing to do with the same name in the main graph.

A *scope* is one graph or function body being folded, linked to its enclosing scope for
outer-scope constants. :func:`walk_graphs` is the one walker over graphs, subgraphs and
functions; :func:`walk_nodes` walks nodes with their subgraphs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.onnxlib import onnx

from . import constants, protos, ranks
from .protos import DEFAULT_DOMAINS

log = logging.getLogger(__name__)


Shape = tuple[int | str | None, ...]
"""A static shape: an int per known dimension, the ``dim_param`` name of a symbolic one, or None."""


# --------------------------------------------------------------------------- nodes and walking


def node_id(node: onnx.NodeProto) -> tuple[str, str]:
    """A node's identity in its graph: op type and first output (outputs are unique in SSA)."""
    return (node.op_type, node.output[0] if node.output else "")


def is_op(node: onnx.NodeProto | None, *ops: str) -> bool:
    """``node`` is one of ``ops`` in the default ONNX domain."""
    return node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in ops


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(label suffix, graph)`` for every graph attribute of ``node``."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def metadata_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs ``node`` reads only the element type or static shape of: ``CastLike``'s second,
    ``Shape``'s and ``Size``'s only (see :mod:`.constants`)."""
    if node.domain not in DEFAULT_DOMAINS:
        return []
    if node.op_type == "CastLike" and len(node.input) > 1 and node.input[1]:
        return [node.input[1]]
    if node.op_type in ("Shape", "Size") and node.input and node.input[0]:
        return [node.input[0]]
    return []


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(True for _ in subgraphs(node))


def walk_nodes(nodes: Sequence[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node of ``nodes`` and of their subgraphs, depth first."""
    for node in nodes:
        yield node
        for _, g in subgraphs(node):
            yield from walk_nodes(g.node)


@dataclass(frozen=True)
class GraphSite:
    """One graph or function body found by :func:`walk_graphs`."""

    body: onnx.GraphProto | onnx.FunctionProto
    label: str
    """"" for the main graph, ``node/attr`` for subgraphs, ``function:domain.name`` for functions."""
    parent: onnx.GraphProto | None
    """The enclosing graph of a subgraph (outer-scope names resolve there), else None."""
    function: onnx.FunctionProto | None
    """The function whose namespace this body belongs to, None for the main graph's."""


def walk_graphs(model: onnx.ModelProto) -> Iterator[GraphSite]:
    """The main graph, its subgraphs, then each model-local function and its subgraphs; parents first."""
    yield from _walk_graph(model.graph, "", None, None)
    for f in model.functions:
        label = f"function:{f.domain}.{f.name}"
        yield GraphSite(f, label, None, f)
        for node in f.node:
            for suffix, g in subgraphs(node):
                # subgraph labels inside functions keep their historic form (no domain)
                yield from _walk_graph(g, f"function:{f.name}/{node.name or node.op_type}/{suffix}", None, f)


def _walk_graph(
    g: onnx.GraphProto, label: str, parent: onnx.GraphProto | None, function: onnx.FunctionProto | None
) -> Iterator[GraphSite]:
    yield GraphSite(g, label, parent, function)
    for node in g.node:
        for suffix, sg in subgraphs(node):
            sub = f"{label + '/' if label else ''}{node.name or node.op_type}/{suffix}"
            yield from _walk_graph(sg, sub, g, function)


# --------------------------------------------------------------------------- namespaces


class Namespace:
    """Names in use and use counts of one namespace (the main graph's, or one function's)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.uses: Counter[str] = Counter()
        self.types: dict[str, tuple[int, Shape | None]] = {}
        """Element type and shape (None: rank unknown) of every typed tensor, when inferred."""

    def scan_graph(self, g: onnx.GraphProto) -> None:
        self.names.update(t.name for t in g.initializer)
        self.names.update(v.name for v in g.input)
        self.names.update(v.name for v in g.output)
        self.names.update(v.name for v in g.value_info)
        for v in g.output:
            self.uses[v.name] += 1
        self.scan_nodes(g.node)

    def scan_nodes(self, nodes: Sequence[onnx.NodeProto]) -> None:
        for node in nodes:
            self.names.update(node.output)
            if node.name:
                self.names.add(node.name)
            for i in node.input:
                if i:
                    self.uses[i] += 1
            for a in node.attribute:  # inline subgraphs(): this loop runs once per node
                if a.type == onnx.AttributeProto.GRAPH:
                    self.scan_graph(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        self.scan_graph(g)

    def fresh_name(self, base: str) -> str:
        """A name that collides with nothing in this namespace (and is reserved from now on)."""
        name = base
        i = 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name


class ModelIndex:
    """Model-wide facts: opset, IR version, the namespaces, and inferred types (on demand)."""

    def __init__(
        self, model: onnx.ModelProto, base_dir: str | None, exclude: frozenset[str] = frozenset()
    ) -> None:
        self.model = model
        self.base_dir = base_dir
        self.exclude = exclude
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self.main = Namespace()
        self.main.scan_graph(model.graph)
        self.function_ns: dict[tuple[str, str], Namespace] = {}
        for f in model.functions:
            ns = Namespace()
            ns.names.update(f.input)
            ns.names.update(f.output)
            ns.uses.update(o for o in f.output)
            ns.scan_nodes(f.node)
            self.function_ns[(f.domain, f.name)] = ns
        self._typed = False
        self.io_cache: dict[str, Any] = {}
        """What the I/O layer learns about data files during this pass (see ``read_initializer``)."""

    def namespace(self, function: onnx.FunctionProto | None) -> Namespace:
        return self.main if function is None else self.function_ns[(function.domain, function.name)]

    @property
    def typed(self) -> bool:
        """Whether shape inference has run."""
        return self._typed

    def ensure_types(self) -> None:
        """Infer element types and shapes of the main namespace once (functions stay untyped)."""
        if not self._typed:
            self._typed = True
            self.main.types.update(infer_types(self.model))


# --------------------------------------------------------------------------- scopes


@dataclass
class Scope:
    """One graph (or function body) being folded, with a link to its enclosing scope."""

    index: ModelIndex
    ns: Namespace
    nodes: Any  # RepeatedCompositeContainer[NodeProto]
    label: str
    graph: onnx.GraphProto | None  # None for a FunctionProto body
    parent: Scope | None = None
    formal_inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    const_cache: dict[str, np.ndarray] = field(default_factory=dict)
    const_nodes: set[tuple[str, str]] = field(default_factory=set)  # nodes read as constants
    doomed: set[tuple[str, str]] = field(default_factory=set)  # nodes to delete at the end of a round
    stale_names: set[str] = field(default_factory=set)  # value_info to drop at the end of a round
    not_constant: set[str] = field(default_factory=set)  # names found not constant (see constant_or_none)
    meta_readers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    """Name -> nodes of this scope that read only its element type or shape (see single_use)."""

    @classmethod
    def of_graph(
        cls,
        index: ModelIndex,
        g: onnx.GraphProto,
        label: str,
        parent: Scope | None,
        ns: Namespace | None = None,
    ) -> Scope:
        ns = ns if ns is not None else (parent.ns if parent is not None else index.main)
        s = cls(index=index, ns=ns, nodes=g.node, label=label, graph=g, parent=parent)
        s.formal_inputs = {v.name for v in g.input}
        s.outputs = {v.name for v in g.output}
        s.initializers = {t.name: t for t in g.initializer}
        s.reindex()
        return s

    @classmethod
    def of_function(cls, index: ModelIndex, f: onnx.FunctionProto) -> Scope:
        ns = index.namespace(f)
        s = cls(index=index, ns=ns, nodes=f.node, label=f"function:{f.domain}.{f.name}", graph=None)
        s.formal_inputs = set(f.input)
        s.outputs = set(f.output)
        s.reindex()
        return s

    @property
    def ctx(self) -> ModelIndex:
        """The model index (the name today's weights check uses)."""
        return self.index

    def reindex(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.meta_readers = {}
        for n in self.nodes:
            for name in metadata_inputs(n):
                self.meta_readers.setdefault(name, []).append(n)

    def uses(self, name: str) -> int:
        return self.ns.uses[name]

    def single_use(self, name: str) -> bool:
        """``name`` feeds exactly one node input by value and is not an output of this scope.

        Readers of its metadata alone (``CastLike``'s second input, ``Shape``/``Size``) do not
        count: a fold that renames ``name`` points them at a tensor of the same type and shape.
        """
        readers = self.meta_readers.get(name)
        return name not in self.outputs and self.ns.uses[name] - (len(readers) if readers else 0) == 1

    def overridable(self, name: str) -> bool:
        """An initializer also listed as a graph input can be fed at run time (IR >= 4)."""
        return name in self.formal_inputs and self.index.ir_version >= 4

    def constant(self, name: str, *, what: str) -> np.ndarray:
        """The value of ``name`` if it is a constant here, else raise :class:`~.constants.NotConstant`."""
        if name in self.const_cache:
            return self.const_cache[name]
        value = constants.resolve(self, name, what=what)
        self.const_cache[name] = value
        return value

    def constant_or_none(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant here, else None (remembered: cheap to ask again)."""
        if name in self.const_cache:
            return self.const_cache[name]
        if not name or name in self.not_constant:
            return None
        try:
            return self.constant(name, what="constant")
        except constants.NotConstant:
            self.not_constant.add(name)
            return None

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """Name -> the nodes of this scope reading it (a snapshot: rebuild after changes)."""
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def shape(self, name: str) -> Shape | None:
        """Static shape (see :data:`Shape`) of a tensor, or None when even its rank is unknown."""
        if self.graph is None:  # function bodies are not shape-inferred
            return None
        self.index.ensure_types()
        found = self.ns.types.get(name)
        return None if found is None else found[1]

    def rank(self, name: str) -> int | None:
        """The rank of a tensor: from what the graph states (see :meth:`stated_rank`) while no
        shape inference has run, else from the inferred shape."""
        if self.graph is not None and not self.index.typed:
            stated = self.stated_rank(name)
            if stated is not None:
                return stated
        s = self.shape(name)
        return None if s is None else len(s)

    def stated_rank(self, name: str) -> int | None:
        """A rank the graph states without shape inference (see :mod:`.ranks`), or None."""
        return ranks.stated_rank(self, name)

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of a tensor when declared or inferred."""
        if self.graph is None:
            return None
        self.index.ensure_types()
        found = self.ns.types.get(name)
        return None if found is None else found[0]


def main_scope(model: onnx.ModelProto, base_dir: str | None) -> Scope:
    """The main graph's scope, for readers (the weights check) that resolve constants."""
    return Scope.of_graph(ModelIndex(model, base_dir, frozenset()), model.graph, "", None)


def collect_scopes(index: ModelIndex) -> list[Scope]:
    """A scope for every graph, subgraph and function body of the model, parents first."""
    scopes: list[Scope] = []
    by_graph: dict[int, Scope] = {}
    for site in walk_graphs(index.model):
        if isinstance(site.body, onnx.FunctionProto):
            scope = Scope.of_function(index, site.body)
        else:
            parent = by_graph.get(id(site.parent)) if site.parent is not None else None
            scope = Scope.of_graph(index, site.body, site.label, parent, index.namespace(site.function))
            by_graph[id(site.body)] = scope
        scopes.append(scope)
    return scopes


# --------------------------------------------------------------------------- types and shapes


def infer_types(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """Element type and shape of every typed tensor of the main graph and its subgraphs, via onnx
    shape inference on a copy without large tensor data."""
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
    g.initializer.extend(t for t in src.initializer if not _is_large(t))  # never copy big tensors
    declared = {v.name for v in g.input}
    for t in src.initializer:
        if _is_large(t) and t.name not in declared:
            g.input.append(protos.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    _strip_large_data(g)  # subgraphs' initializers
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference is a best-effort source of facts
        log.debug("shape inference failed: %s", exc)
        inferred = light
    types: dict[str, tuple[int, Shape | None]] = {}
    for site in _walk_graph(inferred.graph, "", None, None):
        body = site.body
        assert isinstance(body, onnx.GraphProto)
        for v in [*body.input, *body.output, *body.value_info]:
            if v.type.HasField("tensor_type"):
                t = v.type.tensor_type
                shape = tuple(_dim(d) for d in t.shape.dim) if t.HasField("shape") else None
                if v.name not in types or types[v.name][1] is None:
                    types[v.name] = (t.elem_type, shape)
        for tensor in body.initializer:
            types[tensor.name] = (tensor.data_type, tuple(int(d) for d in tensor.dims))
    return types


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param if d.HasField("dim_param") and d.dim_param else None


def _is_large(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 4096


def _strip_large_data(g: onnx.GraphProto) -> None:
    """Replace large initializers by typed graph inputs: shapes survive, data does not."""
    declared = {v.name for v in g.input}
    keep = []
    for t in g.initializer:
        if _is_large(t):
            if t.name not in declared:
                g.input.append(protos.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    for node in g.node:
        for _, sg in subgraphs(node):
            _strip_large_data(sg)
