"""Names a model must be able to print: every name, op type, domain and the model's and nodes'
descriptive strings decode as UTF-8.

onnx.proto is proto2, so protobuf does not check string fields: an invalid byte sequence comes
back as ``bytes`` instead of ``str`` and breaks whatever compares or joins names later.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from bnfold.errors import InputError


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
