"""Shared pieces of the converter-shaped builders: a graph under construction, attribute forms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Shape = tuple[int, ...]


class GraphBuilder:
    """One graph under construction: nodes in emission order, initializers, a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def fresh(self, stem: str) -> str:
        """``stem``, then ``stem_1``, ``stem_2``, ... (torch's FX naming)."""
        k = self._counts.get(stem, 0)
        self._counts[stem] = k + 1
        return stem if k == 0 else f"{stem}_{k}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str, *, name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def weight(self, name: str, shape: Shape, *, fan_in: int | None = None) -> str:
        """He-normal float32 weights, so activations stay O(1) through a few layers."""
        fan = fan_in if fan_in is not None else int(np.prod(shape[1:]))
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan)
        return self.const(name, w.astype(np.float32))

    def vector(self, name: str, shape: Shape, scale: float = 0.5) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def bn_stats(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """gamma in +-[0.5, 1.5] (a fifth negative), beta, mean ~ N(0, 0.5), var ~ U(0.5, 2)."""
        gamma = self.rng.uniform(0.5, 1.5, c) * np.where(self.rng.random(c) < 0.2, -1.0, 1.0)
        beta = self.rng.normal(0.0, 0.5, c)
        mean = self.rng.normal(0.0, 0.5, c)
        var = self.rng.uniform(0.5, 2.0, c)
        return tuple(a.astype(np.float32) for a in (gamma, beta, mean, var))  # type: ignore[return-value]

    def bn(self, x: str, out: str, names: Sequence[str], c: int, *, name: str, **attrs: object) -> str:
        """A BatchNormalization node reading four fresh initializers named ``names``."""
        for n, a in zip(names, self.bn_stats(c), strict=True):
            self.const(n, a)
        return self.op("BatchNormalization", [x, *names], out, name=name, **attrs)

    def affine(self, c: int, shape: Shape, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """BN in inference as ``x * a + b`` (keras' ``batchnorm/mul`` and ``batchnorm/sub``)."""
        gamma, beta, mean, var = self.bn_stats(c)
        a = gamma / np.sqrt(var + np.float32(eps))
        return a.reshape(shape), (beta - mean * a).reshape(shape)

    def model(
        self,
        graph_name: str,
        inputs: dict[str, tuple[int | str, ...]],
        outputs: Sequence[str],
        *,
        opset: int,
        domains: Sequence[tuple[str, int]] = (),
        ir_version: int,
        producer: tuple[str, str],
        shapes: dict[str, Shape] | None = None,
    ) -> onnx.ModelProto:
        """The model, with inferred shapes for outputs and intermediates (converters write them);
        ``shapes`` gives those that inference cannot find and the converter writes."""
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid(d, v) for d, v in (("", opset), *domains)],
            producer_name=producer[0],
            producer_version=producer[1],
        )
        model.ir_version = ir_version
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        for name, shape in (shapes or {}).items():
            info = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            known = [v for v in (*model.graph.output, *model.graph.value_info) if v.name == name]
            if known:
                known[0].CopyFrom(info)
            else:
                model.graph.value_info.append(info)
        return model


DYNAMO_CONV = ("group", "pads", "auto_pad", "strides", "dilations", "kernel_shape")
TORCHSCRIPT_CONV = ("dilations", "group", "kernel_shape", "pads", "strides")
TF2ONNX_CONV = ("dilations", "strides", "kernel_shape", "pads", "group")
TF2ONNX_CONV_UNPADDED = ("dilations", "strides", "kernel_shape", "group")
PADDLE_CONV = ("dilations", "kernel_shape", "strides", "group", "pads")
"""Which Conv attributes each exporter writes, in its order (torch 2.13, tf2onnx 1.17, paddle2onnx 2.1)."""


def conv_attrs(
    keys: Sequence[str],
    k: int,
    *,
    pad: int = 0,
    pads: Sequence[int] | None = None,
    stride: int = 1,
    group: int = 1,
    rank: int = 2,
) -> dict[str, object]:
    """The Conv attributes ``keys`` (e.g. ``TF2ONNX_CONV``) for a k x k (x k) kernel."""
    values: dict[str, object] = {
        "group": group,
        "pads": list(pads) if pads is not None else [pad] * (2 * rank),
        "auto_pad": "NOTSET",
        "strides": [stride] * rank,
        "dilations": [1] * rank,
        "kernel_shape": [k] * rank,
    }
    return {key: values[key] for key in keys}
