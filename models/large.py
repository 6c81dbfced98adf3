"""Large generated models for scale tests: a deep Conv->BN->Relu stack plus Gemm->BN, from onnx.helper + numpy.

Torch is not involved (exporting gigabytes through torch is slow and memory hungry). The graph:

    input (1, 3, 8, 8)
    -> Conv 3x3 stride 2 (3 -> C) -> BN -> Relu                  stem, 4x4 from here on
    -> n x [Conv 3x3 (C -> C) -> BN -> Relu]                     the weight bytes live here
    -> GlobalAveragePool -> Flatten
    -> Gemm (C -> C, transB=1) -> BN -> Relu
    -> Gemm (C -> C, transB=0) -> BN -> Relu
    -> Gemm (C -> 10) -> output (1, 10)

``C`` is 256 for sizes of 64 MB and up (2.36 MB per 3x3 conv), smaller for tiny test models;
``n`` is chosen so the float32 weights reach the requested size. Every fourth conv has a bias,
every fifth BN has eps 1e-3 (the others 1e-5).
BN statistics follow the zoo's recipe (see models.torch_zoo); conv weights use He-normal
initialisation, so activations stay O(1) however deep the stack is.
Deep in the stack they depend only weakly on the input (the random BN shifts dominate), so
verify large models on intermediates as well as on the output.

Peak memory stays near one layer's weights when writing external data: each tensor's bytes go
straight to the ``.data`` file and the ModelProto only holds their offsets. Embedded models
(< 2 GB) are built in memory and written with one serialisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

MB = 1 << 20
OPSET = 17
IR_VERSION = 8
INPUT_SHAPE = (1, 3, 8, 8)
NUM_CLASSES = 10
GEMM_BN_BLOCKS = 2
PROTOBUF_LIMIT = (1 << 31) - 1
EXTERNAL_THRESHOLD = 1024
"""Tensors of at least this many bytes go to the external data file; smaller ones stay embedded."""


@dataclass(frozen=True)
class LargePlan:
    """The shape of a generated model for a requested size."""

    size_mb: float
    channels: int
    conv_blocks: int
    """3x3 conv blocks after the stem (each Conv -> BN -> Relu)."""

    @property
    def bn_count(self) -> int:
        return 1 + self.conv_blocks + GEMM_BN_BLOCKS

    @property
    def weight_bytes(self) -> int:
        c = self.channels
        conv = 4 * (9 * c * c)
        stem = 4 * (9 * 3 * c)
        gemm = 4 * (GEMM_BN_BLOCKS * c * c + NUM_CLASSES * c)
        return stem + self.conv_blocks * conv + gemm


def plan(size_mb: float) -> LargePlan:
    """Channels and depth for a model whose float32 weights total about ``size_mb`` MiB."""
    if size_mb <= 0:
        raise ValueError(f"size_mb must be positive, got {size_mb}")
    target = size_mb * MB
    if size_mb >= 64:
        channels = 256
    else:  # tiny test models: aim for ~16 conv blocks, channels a multiple of 8
        channels = max(8, min(256, int((target / (16 * 36)) ** 0.5) // 8 * 8))
    per_block = 4 * 9 * channels * channels
    fixed = LargePlan(size_mb, channels, 0).weight_bytes
    blocks = max(1, round((target - fixed) / per_block))
    return LargePlan(size_mb, channels, blocks)


class _TensorSink:
    """Makes initializers, either embedded or with their bytes appended to one external data file."""

    def __init__(self, data_file: BinaryIO | None, location: str) -> None:
        self._file = data_file
        self._location = location
        self._offset = 0

    def add(self, tensors: Any, name: str, array: np.ndarray) -> None:
        """Append ``array`` as initializer ``name`` to the repeated field ``tensors``, filled in place."""
        array = np.ascontiguousarray(array)
        tensor = tensors.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        if self._file is None or array.nbytes < EXTERNAL_THRESHOLD:
            tensor.raw_data = array.tobytes()
            return
        # Same alignment rule as onnx.save_model(..., save_as_external_data=True): mmap-friendly.
        align = 65536 if array.nbytes >= MB else 4096
        pad = -self._offset % align
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(array.data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._location), ("offset", self._offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += array.nbytes


def _bn_params(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.2, -1.0, 1.0)
    beta = rng.normal(0.0, 0.5, c)
    mean = rng.normal(0.0, 0.5, c)
    var = rng.uniform(0.5, 2.0, c)
    return [a.astype(np.float32) for a in (gamma, beta, mean, var)]


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / fan_in))
    return w


def _build(p: LargePlan, sink: _TensorSink, seed: int) -> onnx.ModelProto:
    """The model, filled in place (initializers appended one at a time, never copied as a whole)."""
    rng = np.random.default_rng(seed)
    c = p.channels
    model = helper.make_model(
        helper.make_graph([], f"large_{p.size_mb:g}mb", [], []),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="bnfold-models.large",
    )
    model.ir_version = IR_VERSION
    graph = model.graph
    nodes = graph.node
    inits = graph.initializer

    def bn_relu(tag: str, x: str, eps: float) -> str:
        names = [f"{tag}.bn.{k}" for k in ("scale", "bias", "mean", "var")]
        for n, a in zip(names, _bn_params(rng, c)):
            sink.add(inits, n, a)
        nodes.append(
            helper.make_node("BatchNormalization", [x, *names], [f"{tag}.bn_out"], f"{tag}.bn", epsilon=eps)
        )
        nodes.append(helper.make_node("Relu", [f"{tag}.bn_out"], [f"{tag}.relu_out"], f"{tag}.relu"))
        return f"{tag}.relu_out"

    def conv(tag: str, x: str, cin: int, *, stride: int, bias: bool) -> str:
        sink.add(inits, f"{tag}.weight", _he(rng, (c, cin, 3, 3), cin * 9))
        inputs = [x, f"{tag}.weight"]
        if bias:
            sink.add(inits, f"{tag}.bias", rng.normal(0.0, 0.1, c).astype(np.float32))
            inputs.append(f"{tag}.bias")
        nodes.append(
            helper.make_node(
                "Conv", inputs, [f"{tag}.conv_out"], f"{tag}.conv",
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride],
            )
        )  # fmt: skip
        return f"{tag}.conv_out"

    x = bn_relu("stem", conv("stem", "input", 3, stride=2, bias=False), 1e-5)
    for i in range(p.conv_blocks):
        tag = f"block{i}"
        x = bn_relu(tag, conv(tag, x, c, stride=1, bias=i % 4 == 3), 1e-3 if i % 5 == 4 else 1e-5)

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], "gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], "flatten", axis=1))
    x = "flat_out"
    for j in range(GEMM_BN_BLOCKS):
        tag = f"fc{j}"
        trans_b = 1 - j % 2
        w = _he(rng, (c, c), c)  # (out, in) when transB=1, (in, out) when transB=0
        sink.add(inits, f"{tag}.weight", w)
        sink.add(inits, f"{tag}.bias", rng.normal(0.0, 0.1, c).astype(np.float32))
        nodes.append(
            helper.make_node(
                "Gemm",
                [x, f"{tag}.weight", f"{tag}.bias"],
                [f"{tag}.gemm_out"],
                f"{tag}.gemm",
                transB=trans_b,
            )
        )
        x = bn_relu(tag, f"{tag}.gemm_out", 1e-5)
    sink.add(inits, "head.weight", _he(rng, (NUM_CLASSES, c), c))
    sink.add(inits, "head.bias", np.zeros(NUM_CLASSES, np.float32))
    nodes.append(helper.make_node("Gemm", [x, "head.weight", "head.bias"], ["output"], "head.gemm", transB=1))

    graph.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, INPUT_SHAPE))
    graph.output.append(
        helper.make_tensor_value_info("output", TensorProto.FLOAT, (INPUT_SHAPE[0], NUM_CLASSES))
    )
    return model


def build_large(
    size_mb: float, path: str | os.PathLike[str], *, external_data: bool = False, seed: int = 0
) -> Path:
    """Write a Conv/Gemm->BN->Relu model of about ``size_mb`` MiB of float32 weights to ``path``.

    With ``external_data`` every tensor of 1 KiB or more goes to ``<path name>.data`` next to
    the model, written as it is generated (peak memory: about one layer). Without it the
    weights are embedded, which protobuf limits to 2 GiB. Writes are atomic: temporary files
    in the target directory, then ``os.replace``.
    """
    path = Path(path)
    p = plan(size_mb)
    if not external_data and p.weight_bytes >= PROTOBUF_LIMIT - 16 * MB:
        raise ValueError(
            f"{size_mb} MB cannot be embedded in one protobuf (2 GiB limit); pass external_data=True"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_model = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if external_data:
        data_name = f"{path.name}.data"
        data_path = path.with_name(data_name)
        tmp_data = path.with_name(f".{data_name}.{os.getpid()}.tmp")
        try:
            with open(tmp_data, "wb") as f:
                model = _build(p, _TensorSink(f, data_name), seed)
            tmp_model.write_bytes(model.SerializeToString())
            os.replace(tmp_data, data_path)
            os.replace(tmp_model, path)
        finally:
            for t in (tmp_data, tmp_model):
                t.unlink(missing_ok=True)
    else:
        model = _build(p, _TensorSink(None, ""), seed)
        try:
            tmp_model.write_bytes(model.SerializeToString())
            os.replace(tmp_model, path)
        finally:
            tmp_model.unlink(missing_ok=True)
    return path
