"""Small graph helpers for the converter-model tests: build a model, read its constants and
wiring, and edit it by hand (the float64 folds that check the builders' claims)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from models import converters, registry


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    return converters.build(name, seed)


def feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    return registry.example_arrays(name, seed=seed)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node values, by name."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            attr = n.attribute[0]
            value = helper.get_attribute_value(attr)
            out[n.output[0]] = numpy_helper.to_array(value) if attr.name == "value" else np.array(value)
    return out


def producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def attr(node: onnx.NodeProto, name: str) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def rel_err(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.astype(np.float64), out.astype(np.float64)
    return float(np.abs(r - o).max() / max(np.abs(r).max(), 1e-30))


def bn_affine(model: onnx.ModelProto, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """BN as ``y = x * s + t`` in float64."""
    c = constants(model)
    gamma, beta, mean, var = (c[i].astype(np.float64) for i in bn.input[1:])
    eps = attr(bn, "epsilon")
    s = gamma / np.sqrt(var + (1e-5 if eps is None else eps))
    return s, beta - mean * s


def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
            return name
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def bypass(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Remove a one-input-one-output node, its consumers reading its input instead."""
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == node.output[0]:
                n.input[i] = node.input[0]
    model.graph.node.remove(node)


def after(model: onnx.ModelProto, tensor: str, through: tuple[str, ...]) -> tuple[onnx.NodeProto, list[int]]:
    """The single reader of ``tensor`` past ``through`` ops, and the composed Transpose permutation."""
    perm: list[int] = []
    while True:
        (node,) = consumers(model, tensor)
        if node.op_type not in through:
            return node, perm
        if node.op_type == "Transpose":
            p = list(attr(node, "perm"))
            perm = [perm[i] for i in p] if perm else p
        tensor = node.output[0]
