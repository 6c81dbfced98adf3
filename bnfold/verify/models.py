"""The two models as onnxruntime sees them: loading, sessions at a chosen level, typed tensor names.

Every comparison session runs on the CPUExecutionProvider at ``ORT_DISABLE_ALL``: at any higher
level onnxruntime fuses Conv+BatchNormalization itself, and the reference would be a folded model
too. Extra tensors are fetched by appending them to the graph outputs without copying the
caller's model (protobuf merges concatenated messages).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper

from ..onnx.io import copy_except, load_model, save_model, stub_of

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"
FLOAT_TYPES = frozenset({TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
FETCHABLE = FLOAT_TYPES - {TensorProto.BFLOAT16}
"""Intermediates of these types are compared; onnxruntime's Python API cannot return bfloat16."""
SMALL_INITIALIZER = 64
"""Initializers up to this many elements keep their values for shape inference (Reshape shapes...)."""

ModelLike = onnx.ModelProto | str | os.PathLike


class NotRun(Exception):
    """onnxruntime could not load or run a model, or inputs cannot be passed to it."""


def release_memory() -> None:
    """Hand the heap a deleted session freed back to the system: glibc keeps it otherwise (after
    a session of a 500 MB model, 1 GB stays resident), and the next session adds its own."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class OrtModel:
    label: str
    proto: onnx.ModelProto
    """The model, for reading its graph; from a path, loaded lazily (large weights left in the file)."""
    path: str | None = None
    """A file onnxruntime can load the model from, with its external data beside it."""
    _bytes: bytes | None = field(default=None, repr=False)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def directory(self) -> str | None:
        """Where the model's external data (or lazy stubs) are read from."""
        return os.path.dirname(self.path) if self.path else None

    def prepare(self, tmp: str) -> None:
        """Make the model loadable by onnxruntime, once (the candidate has two sessions).

        An in-memory model is serialized. One over protobuf's 2 GB limit, or whose weights live
        in files (external data, stubs from ``load_model(lazy=True)``: save_model resolves them,
        or raises InputError naming the tensor), is written to ``tmp`` instead.
        """
        if self.path is None and not any(
            t.data_location == TensorProto.EXTERNAL for t in self.graph.initializer
        ):
            self._bytes = serialize(self.proto)
        if self.path is None and self._bytes is None:
            self.path = os.path.join(tmp, f"{self.label}.onnx")
            save_model(self.proto, self.path, external_data=True)

    def serialized(self) -> bytes:
        """The bytes sessions are built from. For a file, a weightless copy when the lazy load
        left stubs: onnxruntime reads those weights from the file itself (external references,
        shared with the page cache) instead of from a copy of the file in Python."""
        if self._bytes is None:
            self._bytes = weightless(self.proto, self.path) or Path(self.path).read_bytes()
        return self._bytes


def weightless(model: onnx.ModelProto, path: str) -> bytes | None:
    """``model`` (lazily loaded from ``path``) with each stub turned into an external reference
    onnxruntime can follow (its file, relative to ``path``'s folder, at the payload's offset);
    None when that does not apply."""
    folder = os.path.dirname(os.path.abspath(path))
    copy = onnx.ModelProto()
    stubs = [s for g in _graphs(model.graph) for t in g.initializer if (s := stub_of(t)) is not None]
    if not stubs or any(os.path.dirname(s.source.path) != folder for s in stubs):
        return None  # no stub, or ``path`` is a copy written elsewhere (stubs resolved into it)
    copy.CopyFrom(model)  # stubs carry no payload: this copies the graph, not the weights
    for graph in _graphs(copy.graph):
        for tensor in graph.initializer:
            stub = stub_of(tensor)
            if stub is None:
                continue
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = os.path.relpath(stub.source.path, folder)
    return serialize(copy)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(g)


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None past protobuf's 2 GB limit (upb raises EncodeError there)."""
    try:
        return model.SerializeToString()
    except (EncodeError, ValueError):
        return None


def open_model(model: ModelLike, label: str) -> OrtModel:
    if isinstance(model, onnx.ModelProto):
        return OrtModel(label, model)
    path = os.path.abspath(os.fspath(model))
    return OrtModel(label, load_model(path, lazy=True), path=path)


def onnxruntime() -> Any:
    """The onnxruntime module, imported on first use: a fold that is not verified never loads it."""
    import onnxruntime as ort

    return ort


def session_options(level: str) -> Any:
    """Options of every verification session at ``level`` (a ``GraphOptimizationLevel`` name such as
    ``"ORT_DISABLE_ALL"``): weight pre-packing off (a packed copy of each weight per session; a
    few samples do not repay it)."""
    ort = onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    # fatal only: every failure reaches us as an exception (reported as not-run); onnxruntime's
    # own colored error lines on fd 2 (e.g. while trying sizes for a free dimension) are noise
    so.log_severity_level = 4
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def session(model: OrtModel, extra_outputs: Sequence[onnx.ValueInfoProto], level: str) -> Any:
    """One InferenceSession of ``model`` with ``extra_outputs`` appended to its graph outputs."""
    so = session_options(level)
    try:
        if model.path is not None:  # external data (and weightless stubs) are found in this folder
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", os.path.dirname(model.path)
            )
        # Protobuf parses concatenated messages as one merged message, and merging appends to
        # repeated fields: this adds the outputs without a copy of the caller's ModelProto.
        suffix = onnx.ModelProto(graph=onnx.GraphProto(output=extra_outputs)).SerializeToString()
        return onnxruntime().InferenceSession(model.serialized() + suffix, so, providers=[PROVIDER])
    except Exception as e:  # onnxruntime raises its own Fail, InvalidGraph, NotImplemented... types
        raise NotRun(f"onnxruntime cannot load the {model.label}: {first_line(e)}") from e


def run(sess: Any, model: OrtModel, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, dict(feed))
    except Exception as e:  # any onnxruntime failure means NOT_RUN
        raise NotRun(f"onnxruntime cannot run the {model.label}: {first_line(e)}") from e


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that shape inference can type.

    Runs on a copy whose large initializers are declared as typed inputs instead, so that
    no weight is serialized (and models over 2 GB work).
    """
    skeleton = copy_except(model, "graph")
    skeleton.graph.CopyFrom(copy_except(model.graph, "initializer"))
    declared = {vi.name for vi in skeleton.graph.input}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= SMALL_INITIALIZER:
            skeleton.graph.initializer.append(t)
        elif t.name not in declared:
            skeleton.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
    except Exception as e:  # noqa: BLE001 - a graph it rejects still has the types its model declares
        log.debug("shape inference failed: %s", first_line(e))
    g = skeleton.graph
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*g.input, *g.value_info, *g.output)
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type
    }


def constant_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
