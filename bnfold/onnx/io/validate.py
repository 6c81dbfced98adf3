"""What a loaded model must satisfy before anything reads it.

:func:`check_names`: every name, op type, domain and the model's and nodes' descriptive strings
decode as UTF-8. onnx.proto is proto2, so protobuf does not check string fields: an invalid byte
sequence comes back as ``bytes`` instead of ``str`` and breaks whatever compares or joins names
later.

:func:`check_arity`: every node of the default ONNX domain has at least the inputs and outputs
its operator schema requires, and a ``Constant`` holds exactly one value. Only what would crash
the pass (it indexes a node's inputs and outputs by position) is checked: names nothing defines,
duplicate outputs and the like are left to onnxruntime; ``onnx.checker`` is too strict and too
slow for large models. The schemas' minimums come from a table generated from onnx
(:mod:`bnfold.onnx.io.arity`), so a load does not import onnx.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from bnfold.errors import InputError
from bnfold.onnxlib import onnx

from .arity import min_arity


def _bad(values: Iterable[object]) -> object | None:
    for value in values:
        if type(value) is bytes:
            return value
    return None


def _check_graph(graph: onnx.GraphProto) -> object | None:
    found = _bad((graph.name, graph.doc_string))
    found = found or _bad(t.name for t in graph.initializer)
    for infos in (graph.input, graph.output, graph.value_info):
        found = found or _bad(v.name for v in infos)
    found = found or _check_nodes(graph.node)
    return found


def _check_nodes(nodes: Iterable[onnx.NodeProto]) -> object | None:
    for node in nodes:
        found = _bad((node.name, node.op_type, node.domain, node.doc_string))
        found = found or _bad(node.input) or _bad(node.output)
        if found is not None:
            return found
        for attr in node.attribute:
            found = _bad((attr.name, attr.ref_attr_name))
            if found is not None:
                return found
            if attr.HasField("g"):
                found = _check_graph(attr.g)
            for sub in attr.graphs:
                found = found or _check_graph(sub)
            if found is not None:
                return found
    return None


def check_names(model: onnx.ModelProto, path: str) -> None:
    """Refuse a model with a name that is not valid UTF-8, naming where it is.

    Strings deeper in (value-info details, tensor doc strings) are left to the places that copy
    them, which raise InputError too (:func:`bnfold.onnx.io.wire.copy_except`)."""
    found = _bad(o.domain for o in model.opset_import)
    found = found or _bad((model.producer_name, model.producer_version, model.domain, model.doc_string))
    found = found or _bad(e.key for e in model.metadata_props) or _bad(e.value for e in model.metadata_props)
    found = found or _check_graph(model.graph)
    for function in model.functions:
        found = found or _bad((function.name, function.domain))
        found = found or _bad(function.input) or _bad(function.output) or _bad(function.attribute)
        found = found or _check_nodes(function.node)
    if found is not None:
        raise InputError(f"{path}: a name in the model is not valid UTF-8 ({found!r:.60})")


_DEFAULT_DOMAINS = ("", "ai.onnx")


def _bodies(model: onnx.ModelProto) -> Iterator[tuple[Iterable[onnx.NodeProto], int, str]]:
    """``(nodes, default-domain opset, where)`` for the main graph, every function and every
    subgraph; iterative, so a deep nesting of subgraphs cannot exhaust Python's stack."""

    def opset_of(imports: Iterable[onnx.OperatorSetIdProto], default: int) -> int:
        return next((o.version for o in imports if o.domain in _DEFAULT_DOMAINS), default)

    main = opset_of(model.opset_import, 1)
    todo: list[tuple[Iterable[onnx.NodeProto], int, str]] = [(model.graph.node, main, "main graph")]
    todo += [(f.node, opset_of(f.opset_import, main), f"function {f.name!r}") for f in model.functions]
    while todo:
        nodes, opset, where = todo.pop()
        yield nodes, opset, where
        for node in nodes:
            for a in node.attribute:
                for g in [a.g] if a.HasField("g") else a.graphs:
                    todo.append((g.node, opset, f"a subgraph of node {node.name or node.op_type!r}"))


def check_arity(model: onnx.ModelProto) -> None:
    """Refuse a model with a node that lacks inputs or outputs its operator requires (or a
    ``Constant`` without exactly one value), naming the node."""
    for nodes, opset, where in _bodies(model):
        for node in nodes:
            if node.domain not in _DEFAULT_DOMAINS:
                continue
            name = node.name or (node.output[0] if node.output else "")
            label = f"{'node ' + repr(name) if name else 'an unnamed node'} ({node.op_type}) in the {where}"
            if node.op_type == "Constant" and len(node.attribute) != 1:
                raise InputError(f"{label} has {len(node.attribute)} attributes, expected one value")
            need = min_arity(node.op_type, opset)  # None: an unknown op or opset, onnxruntime decides
            if need is None:
                continue
            if len(node.input) < need[0]:
                raise InputError(f"{label} has {len(node.input)} inputs, its operator needs {need[0]}")
            if len(node.output) < max(need[1], 1):
                raise InputError(
                    f"{label} has {len(node.output)} outputs, its operator needs {max(need[1], 1)}"
                )
