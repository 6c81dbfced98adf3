"""Prove a folded model computes what the original computes, with onnxruntime.

Both models run on onnxruntime's CPUExecutionProvider at ``ORT_DISABLE_ALL``: at any higher
level onnxruntime fuses Conv+BatchNormalization itself, and the reference would be a folded
model too. The candidate is also loaded and run once at onnxruntime's default level
(``ORT_ENABLE_ALL``), reported as ``candidate_runs_optimized``.

What is compared
    The graph outputs (matched by name, or by position when the names differ), and every
    *intermediate* tensor that both main graphs produce under the same name with the same
    known float type. The fold pass keeps each BN's output name (the absorbing Conv/Gemm
    now writes it), so the intermediates are exactly the fold points and everything between
    them; a wrong fold shows up at its own tensor, and ``first_divergent`` names the failing
    tensors none of whose failing ancestors (in the reference graph) explain them.

    At each fold point (a name the reference writes with a BatchNormalization and the
    candidate with a Conv/ConvTranspose/Gemm) the candidate's stored weights are also checked
    statically against the reference's layer and BN folded in float64, to 4 ulps of the weight
    dtype (:mod:`bnfold.verify_weights`, reported in ``weights``). This check sees no runtime
    noise: it catches what float32 noise hides, and fails a fold of a training-mode BN outright.

The metric
    ``scale`` is the reference's largest finite magnitude in one sample: per tensor for graph
    outputs, per axis-1 channel for intermediates of rank >= 2, so that one channel folded
    wrongly is judged against that channel's own magnitude. A channel's scale is floored at
    ``CHANNEL_SCALE_FLOOR`` (0.1) of its tensor's scale: a quiet channel downstream of loud
    ones carries their absolute rounding noise (on a random 18-conv ResNet-style graph the
    worst correct-fold error was 1.8e-6 of the tensor scale but 4.4e-5 of a channel scale
    floored at 1e-2, 8e-6 floored at 0.1). Every scale is at least the dtype's smallest
    normal number. An element is out of tolerance when::

        |ref - cand| > atol + rtol * scale[channel]

    ``max_rel`` is ``max |ref - cand| / scale``. NaN and Inf must sit at the same places
    with the same sign in both models; matching ones are left out of the error figures,
    differing ones fail the tensor (``nan_inf_mismatch``). Integer, bool and string tensors
    must be equal, whatever ``atol``/``rtol`` say.

Default tolerances (``atol`` is 0 for every float type: the scale already carries the unit)
    ========  =====  ==================================================================
    dtype     rtol   why
    ========  =====  ==================================================================
    float64   1e-9   rounding is ~1e-16; seven orders of headroom for noise growth, and
                     small enough to see ``epsilon`` 1e-5 dropped. (onnxruntime's CPU
                     provider has no float64 Conv: such models are NOT_RUN.)
    float32   1e-4   a correct fold (float64 math, one rounding) differs from the unfolded
                     graph by float32 reassociation noise: ~3e-7 on one Conv+BN, at most
                     1.2e-5 over 5 seeds of the 18-conv graph above, 8.3e-6 over 3 seeds
                     of every model in models/ folded by fold_onnx. 1e-4 is 8x above that
                     and 10x below a 1e-3 fold error.
    float16   5e-2   every kernel boundary rounds to float16 (2**-11), and the folded
                     weights are rounded once more; the 18-conv graph reached 1.5e-2 with
                     a correct fold. Catches only errors of ~5% and up.
    bfloat16  0.1    8x float16's unit roundoff; not measured: onnxruntime's Python API
                     cannot pass bfloat16 tensors, so such models are NOT_RUN.
    ========  =====  ==================================================================

What the float32 defaults catch, and what they cannot
    The runtime comparison (tests/test_verify_power.py, 195 faults on the zoo) catches two
    channels swapped, a training-mode BN folded with running statistics, one channel's bias
    off by 1e-3 of its magnitude, ``epsilon`` dropped when it is 1e-3, and 37 of 39 weights
    off by 1e-3 in one channel (the other two moved their channel by 1e-6 and 5.6e-5: its
    values come mostly from the bias). It cannot see ``epsilon`` dropped when it is the ONNX
    default 1e-5: that changes ``1/sqrt(var+eps)`` by ``eps/(2 var)``, 5.9e-6 to 2.7e-5 of
    the channel measured, under rtol (float64 models catch it). The weights check catches all
    195, including those. A channel quieter than 10% of its tensor's peak is judged against
    that 10%: a 1e-3 error is seen down to channels at ~1% of the peak.
    Where a BN's input is far larger than its output (``|mean| * gamma/sqrt(var)`` >>
    ``|y|``), the unfolded reference itself loses digits in ``x - mean`` and a correct fold
    can exceed ``rtol``: pass a looser ``rtol`` there.

Limits
    Every shared intermediate becomes a graph output, so onnxruntime keeps them all alive:
    memory grows with the activations of one sample (``intermediates=False`` avoids it).
    Tensors inside If/Loop bodies, bfloat16 intermediates and tensors of unknown type are
    not compared; fold points inside subgraphs, MatMul->Add folds and bfloat16 weights are
    not checked statically.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError, ShapeError
from .io import copy_except, load_model, save_model
from .report import InputSpec, TensorDiff, VerifyReport, VerifyStatus
from .verify_weights import WeightCheck, check_weights

__all__ = ["CHANNEL_SCALE_FLOOR", "DEFAULT_RTOL", "load_inputs", "make_inputs", "verify"]

log = logging.getLogger(__name__)

DEFAULT_RTOL: dict[str, float] = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2, "bfloat16": 0.1}
"""Default ``rtol`` relative to the channel scale, by dtype (complex: by its parts); ``atol`` defaults to 0."""
CHANNEL_SCALE_FLOOR = 0.1
"""A channel's scale is at least this fraction of its tensor's scale."""

_FLOAT_TYPES = frozenset({TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
_FETCHABLE = _FLOAT_TYPES - {TensorProto.BFLOAT16}
"""Intermediates of these types are compared; onnxruntime's Python API cannot return bfloat16."""
_PROVIDER = "CPUExecutionProvider"
_SMALL_INITIALIZER = 64
"""Initializers up to this many elements keep their values for shape inference (Reshape shapes...)."""

ModelLike = onnx.ModelProto | str | os.PathLike
Sample = Mapping[str, np.ndarray]
InputsLike = Sample | Sequence[Sample] | str | os.PathLike


class _NotRun(Exception):
    """onnxruntime could not load or run a model, or inputs cannot be passed to it."""


# --------------------------------------------------------------------------- models


@dataclass
class _Model:
    label: str
    proto: onnx.ModelProto
    """The model, for reading its graph; from a path, loaded lazily (large weights left in the file)."""
    path: str | None = None
    """A file onnxruntime can load the model from, with its external data beside it."""
    _bytes: bytes | None = field(default=None, repr=False)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def prepare(self, tmp: str) -> None:
        """Make the model loadable by onnxruntime, once (the candidate has two sessions).

        An in-memory model is serialized. One over protobuf's 2 GB limit, or whose weights live
        in files (external data, stubs from ``load_model(lazy=True)``: bnfold.io.save_model
        resolves them, or raises InputError naming the tensor), is written to ``tmp`` instead.
        """
        if self.path is None and not any(
            t.data_location == TensorProto.EXTERNAL for t in self.graph.initializer
        ):
            self._bytes = _serialize(self.proto)
        if self.path is None and self._bytes is None:
            self.path = os.path.join(tmp, f"{self.label}.onnx")
            save_model(self.proto, self.path, external_data=True)

    def serialized(self) -> bytes:
        if self._bytes is None:
            self._bytes = Path(self.path).read_bytes()
        return self._bytes


def _serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None past protobuf's 2 GB limit (upb raises EncodeError there)."""
    try:
        return model.SerializeToString()
    except (EncodeError, ValueError):
        return None


def _open_model(model: ModelLike, label: str) -> _Model:
    if isinstance(model, onnx.ModelProto):
        return _Model(label, model)
    path = os.path.abspath(os.fspath(model))
    return _Model(label, load_model(path, lazy=True), path=path)


def _session_options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return so


def _session(model: _Model, extra_outputs: Sequence[onnx.ValueInfoProto], level: ort.GraphOptimizationLevel):
    """One InferenceSession of ``model`` with ``extra_outputs`` appended to its graph outputs."""
    so = _session_options(level)
    try:
        if model.path is not None and not extra_outputs:
            return ort.InferenceSession(model.path, so, providers=[_PROVIDER])
        if model.path is not None:  # from bytes, external data is looked up in this folder
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", os.path.dirname(model.path)
            )
        # Protobuf parses concatenated messages as one merged message, and merging appends to
        # repeated fields: this adds the outputs without a copy of the caller's ModelProto.
        suffix = onnx.ModelProto(graph=onnx.GraphProto(output=extra_outputs)).SerializeToString()
        return ort.InferenceSession(model.serialized() + suffix, so, providers=[_PROVIDER])
    except Exception as e:  # onnxruntime raises its own Fail, InvalidGraph, NotImplemented... types
        raise _NotRun(f"onnxruntime cannot load the {model.label}: {_first_line(e)}") from e


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every main-graph tensor that shape inference can type.

    Runs on a copy whose large initializers are declared as typed inputs instead, so that
    no weight is serialized (and models over 2 GB work).
    """
    skeleton = copy_except(model, "graph")
    skeleton.graph.CopyFrom(copy_except(model.graph, "initializer"))
    declared = {vi.name for vi in skeleton.graph.input}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= _SMALL_INITIALIZER:
            skeleton.graph.initializer.append(t)
        elif t.name not in declared:
            skeleton.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
    except Exception as e:  # noqa: BLE001 - a graph it rejects still has the types its model declares
        log.debug("shape inference failed: %s", _first_line(e))
    g = skeleton.graph
    return {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*g.input, *g.value_info, *g.output)
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type
    }


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}


def _shared_intermediates(ref: _Model, cand: _Model) -> dict[str, int]:
    """Name -> element type of the float tensors both main graphs compute, outputs excluded."""

    def produced(g: onnx.GraphProto) -> set[str]:
        outs = {o for n in g.node for o in n.output if o}
        return outs - _constant_names(g) - {v.name for v in (*g.input, *g.output)}

    names = produced(ref.graph) & produced(cand.graph)
    if not names:
        return {}
    ref_types, cand_types = _value_types(ref.proto), _value_types(cand.proto)
    order = [o for n in ref.graph.node for o in n.output]  # the reference's order, for stable reports
    return {
        n: ref_types[n]
        for n in order
        if n in names and ref_types.get(n) in _FETCHABLE and cand_types.get(n) == ref_types[n]
    }


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _InputDecl:
    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None
    """Static size, symbolic name, or None (unknown); None for an unknown rank."""


def _declared_inputs(graph: onnx.GraphProto) -> list[_InputDecl]:
    """Graph inputs a caller must feed: initializers listed as inputs keep their defaults."""
    constants = _constant_names(graph)
    decls = []
    for vi in graph.input:
        if vi.name in constants:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise _NotRun(f"input '{vi.name}' is not a tensor; bnfold verifies tensor inputs only")
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
        decls.append(_InputDecl(vi.name, tt.elem_type, dims))
    return decls


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _resolve_shapes(decls: Sequence[_InputDecl], shapes: Mapping[str, Sequence[int]] | None) -> dict:
    """Concrete shape per input: ``shapes`` first, then symbols they bind, then batch 1 on dim 0."""
    shapes = dict(shapes or {})
    by_name = {d.name: d for d in decls}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise InputError(f"shapes names unknown input(s) {unknown}; the model's inputs are {sorted(by_name)}")
    symbols: dict[str, int] = {}
    for name, shape in shapes.items():
        dims, shape = by_name[name].dims, tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"input '{name}': shapes gives negative size(s) {shape}")
        if dims is not None and len(dims) != len(shape):
            raise ShapeError(f"input '{name}' has rank {len(dims)}, but shapes gives {shape}")
        for i, (d, s) in enumerate(zip(dims or shape, shape)):
            if isinstance(d, int) and d != s:
                raise ShapeError(f"input '{name}' dimension {i} is {d}, but shapes gives {s}")
            if isinstance(d, str):
                symbols.setdefault(d, s)
    resolved = {}
    for d in decls:
        if d.name in shapes:
            resolved[d.name] = tuple(int(s) for s in shapes[d.name])
            continue
        if d.dims is None:
            raise ShapeError(f"input '{d.name}' has no declared shape: {_shape_hint(d)}")
        out = []
        for i, dim in enumerate(d.dims):
            if isinstance(dim, int):
                out.append(dim)
            elif dim in symbols:
                out.append(symbols[dim])
            elif i == 0:
                out.append(1)
                if dim:
                    symbols[dim] = 1
            else:
                what = f"'{dim}'" if dim else "unknown"
                raise ShapeError(f"input '{d.name}' dimension {i} ({what}) is not fixed: {_shape_hint(d)}")
        resolved[d.name] = tuple(out)
    return resolved


def _shape_hint(d: _InputDecl) -> str:
    if not d.dims:
        return f"pass shapes={{'{d.name}': (1, 3, 224, 224)}} or --shape {d.name}=1x3x224x224"
    example = "x".join(str(x) if isinstance(x, int) else (x or "?") for x in d.dims)
    return f"pass shapes={{'{d.name}': (...)}} or --shape {d.name}={example} with numbers in place of names"


def _generate(decls, shapes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample: standard normal floats, integers in 0..4 (usable as indices), fair bools."""
    sample = {}
    for d in decls:
        dtype, shape = _np_dtype(d.elem_type), shapes[d.name]
        if d.elem_type in _FLOAT_TYPES:
            sample[d.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "c":
            sample[d.name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind in "iu":
            sample[d.name] = rng.integers(0, 5, size=shape).astype(dtype)
        elif dtype.kind == "b":
            sample[d.name] = rng.random(shape) < 0.5
        else:
            raise _NotRun(f"cannot generate inputs of type {dtype.name} ('{d.name}'); pass inputs")
    return sample


def _generated_samples(decls, shapes, seed: int, samples: int) -> list[dict[str, np.ndarray]]:
    if samples < 1:
        raise InputError(f"samples must be at least 1, not {samples}")
    fixed, rng = _resolve_shapes(decls, shapes), np.random.default_rng(seed)
    return [_generate(decls, fixed, rng) for _ in range(samples)]


def make_inputs(
    model: ModelLike, *, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, samples: int = 3
) -> list[dict[str, np.ndarray]]:
    """The ``samples`` input draws :func:`verify` generates for ``model`` (same seed, same arrays).

    Raises ShapeError for a dimension nothing fixes, InputError for an input it cannot make.
    """
    try:
        return _generated_samples(_declared_inputs(_open_model(model, "model").graph), shapes, seed, samples)
    except _NotRun as e:
        raise InputError(str(e)) from None


def load_inputs(
    path: str | os.PathLike, input_names: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Samples from ``path``: an ``.npz`` (one sample, keys = input names), a folder of
    ``input_<i>.pb`` TensorProto files (one sample, the ONNX test-data layout), or a folder of
    ``test_data_set_<n>`` folders (one sample each). A ``.pb`` tensor without a name takes the
    name at its position in ``input_names``, or without those its file's stem (``input_0``).
    Raises InputError (one line) for anything missing or unreadable.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder (inputs)")
    if p.is_file():
        if p.suffix != ".npz":
            raise InputError(f"{p}: inputs must be an .npz file or a folder of .pb tensors")
        try:
            with np.load(p, allow_pickle=False) as npz:
                return [{k: npz[k] for k in npz.files}]
        except Exception as e:
            raise InputError(f"{p}: cannot read as .npz ({_first_line(e)})") from e
    sets = [d for d in p.iterdir() if d.is_dir() and re.fullmatch(r"test_data_set_\d+", d.name)]
    sets.sort(key=lambda d: int(d.name.rsplit("_", 1)[1]))
    return [_load_pb_dir(d, input_names) for d in (sets or [p])]


def _load_pb_dir(folder: Path, input_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    files = [
        (int(m.group(1)), f) for f in folder.iterdir() if (m := re.fullmatch(r"input_(\d+)\.pb", f.name))
    ]
    if not files:
        raise InputError(f"{folder}: no input_<i>.pb files")
    sample = {}
    for index, f in sorted(files):
        try:
            t = TensorProto.FromString(f.read_bytes())
            array = numpy_helper.to_array(t)
        except Exception as e:
            raise InputError(f"{f}: not a serialized onnx TensorProto ({_first_line(e)})") from e
        name = t.name
        if not name and input_names is None:
            name = f.stem
        elif not name:
            if index >= len(input_names):
                raise InputError(f"{f}: tensor has no name and its position matches no model input")
            name = input_names[index]
        sample[name] = array
    return sample


def _user_samples(inputs: InputsLike, decls: Sequence[_InputDecl]) -> tuple[list[dict], str]:
    names = [d.name for d in decls]
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        samples, source = load_inputs(p, names), ("npz:" if p.is_file() else "pb-dir:") + str(p)
    elif isinstance(inputs, Mapping):
        samples, source = [dict(inputs)], "user"
    else:
        samples, source = [dict(s) for s in inputs], "user"
    if not samples:
        raise InputError("inputs hold no sample")
    checked = []
    for i, sample in enumerate(samples):
        where = f"sample {i}" if len(samples) > 1 else "inputs"
        unknown, missing = sorted(set(sample) - set(names)), [n for n in names if n not in sample]
        if unknown:
            raise InputError(f"{where}: unknown input(s) {unknown}; the model's inputs are {names}")
        if missing:
            raise InputError(f"{where}: missing input(s) {missing}")
        checked.append({d.name: _check_array(d, sample[d.name], where) for d in decls})
    return checked, source


def _check_array(d: _InputDecl, value: Any, where: str) -> np.ndarray:
    array, dtype = np.asarray(value), _np_dtype(d.elem_type)
    if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InputError(f"{where}: input '{d.name}' is {array.dtype}, the model wants {dtype.name}")
        array = array.astype(dtype)
    if d.dims is not None and (
        len(d.dims) != array.ndim or any(isinstance(x, int) and x != s for x, s in zip(d.dims, array.shape))
    ):
        want = tuple(x if isinstance(x, int) else (x or "?") for x in d.dims)
        raise InputError(f"{where}: input '{d.name}' has shape {array.shape}, the model wants {want}")
    return array


# --------------------------------------------------------------------------- comparison


@dataclass
class _Stats:
    """One tensor's comparison, accumulated over samples."""

    name: str
    kind: str
    """``output`` (one scale per tensor) or ``intermediate`` (one scale per axis-1 channel)."""
    user_atol: float | None
    user_rtol: float | None
    shape: tuple[int, ...] = ()
    dtype: str = ""
    atol: float = 0.0
    rtol: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    counted: int = 0
    mismatched: int = 0
    total: int = 0
    nan_inf_mismatch: bool = False
    channel_rel: np.ndarray | None = None
    problem: str = ""

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if not self.total:
            self.shape, self.dtype = tuple(ref.shape), ref.dtype.name
            if ref.dtype.kind in "fc":  # else atol = rtol = 0: integers, bools and strings must be equal
                self.atol = 0.0 if self.user_atol is None else float(self.user_atol)
                self.rtol = (
                    DEFAULT_RTOL[np.finfo(ref.dtype).dtype.name]
                    if self.user_rtol is None
                    else float(self.user_rtol)
                )
        self.total += ref.size
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            self.problem = self.problem or (
                f"'{self.name}' is {ref.dtype}{list(ref.shape)} in the reference "
                f"but {cand.dtype}{list(cand.shape)} in the candidate"
            )
            self.mismatched += ref.size
            return
        if ref.dtype.kind not in "fciub":  # strings
            self.mismatched += int(np.count_nonzero(ref != cand))
            return
        wide = np.result_type(ref.dtype, np.float64)
        r, c = ref.astype(wide), cand.astype(wide)
        finite = np.isfinite(r) & np.isfinite(c)
        special_bad = ~finite & ~((np.isnan(r) & np.isnan(c)) | (r == c))  # r == c: same-signed Inf
        self.nan_inf_mismatch |= bool(special_bad.any())
        with np.errstate(invalid="ignore"):  # Inf - Inf
            diff = np.where(finite, np.abs(r - c), 0.0)
        per_channel = self.kind == "intermediate" and ref.ndim >= 2
        tiny = float(np.finfo(ref.dtype).tiny) if ref.dtype.kind in "fc" else 1.0
        scale = _scale(np.where(np.isfinite(r), np.abs(r), 0.0), per_channel, tiny)
        rel = diff / scale
        self.mismatched += int(np.count_nonzero((diff > self.atol + self.rtol * scale) | special_bad))
        if finite.any():
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            self.counted += int(np.count_nonzero(finite))
        if per_channel:
            per = _channel_max(rel)
            self.channel_rel = per if self.channel_rel is None else np.maximum(self.channel_rel, per)

    def result(self) -> TensorDiff:
        return TensorDiff(
            name=self.name,
            kind=self.kind,
            shape=self.shape,
            dtype=self.dtype,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            mean_abs=self.sum_abs / self.counted if self.counted else 0.0,
            mismatched=self.mismatched,
            total=self.total,
            atol=self.atol,
            rtol=self.rtol,
            passed=self.mismatched == 0 and not self.problem,
            worst_channel=int(np.argmax(self.channel_rel)) if self.channel_rel is not None else None,
            nan_inf_mismatch=self.nan_inf_mismatch,
        )


def _scale(magnitude: np.ndarray, per_channel: bool, tiny: float) -> np.ndarray | float:
    """The reference's largest magnitude, per tensor or per axis-1 channel (floored, see module doc)."""
    whole = float(magnitude.max()) if magnitude.size else 0.0
    if not per_channel:
        return max(whole, tiny)
    channel = np.maximum(_channel_max(magnitude), max(CHANNEL_SCALE_FLOOR * whole, tiny))
    return channel.reshape((1, -1) + (1,) * (magnitude.ndim - 2))


def _channel_max(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return np.zeros(a.shape[1])
    return a.max(axis=tuple(i for i in range(a.ndim) if i != 1))


def _first_divergent(graph: onnx.GraphProto, failing: Sequence[str]) -> tuple[str, ...]:
    """Failing tensors with no failing tensor among their ancestors in ``graph``, in graph order.

    One pass over the nodes, which ONNX requires to be in topological order.
    """
    bad = set(failing)
    upstream_bad: dict[str, bool] = {}  # tensor -> some ancestor fails
    first = []
    for node in graph.node:
        ins = [i for i in node.input if i] + _outer_names(node)
        above = any(i in bad or upstream_bad.get(i, False) for i in ins)
        for o in node.output:
            upstream_bad[o] = above
            if o in bad and not above:
                first.append(o)
    return tuple(first)


def _outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read (a superset of the outer-scope values they use)."""
    names = []
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for n in g.node:
                names.extend(i for i in n.input if i)
                names.extend(_outer_names(n))
    return names


# --------------------------------------------------------------------------- verify


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    inputs: InputsLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    intermediates: bool = True,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare outputs and shared tensors.

    ``inputs``: one sample (name -> array), a list of samples, an ``.npz`` or a ``.pb`` folder
    (see :func:`load_inputs`); by default ``samples`` draws seeded from ``seed``. ``shapes``
    fixes symbolic dimensions ({"input": (1, 3, 224, 224)}); an unresolved dimension 0 is 1.
    ``atol``/``rtol`` replace the per-dtype defaults (module docstring) for float tensors, and
    loosen (never tighten) the static weights check. ``intermediates=False`` compares the
    graph outputs only: no shared tensors, no weights check.

    Raises ShapeError for a dimension nothing fixes, InputError for unusable inputs or
    files. A model onnxruntime cannot load or run gives status NOT_RUN, never PASSED.
    """
    start = time.perf_counter()
    ref, cand = _open_model(reference, "reference"), _open_model(candidate, "candidate")
    fields: dict[str, Any] = {"onnxruntime_version": ort.__version__, "provider": _PROVIDER}

    def finish(status: VerifyStatus, message: str = "") -> VerifyReport:
        return VerifyReport(status=status, message=message, seconds=time.perf_counter() - start, **fields)

    try:
        decls = _declared_inputs(ref.graph)
        if inputs is None:
            feeds = _generated_samples(decls, shapes, seed, samples)
            fields.update(seed=seed, input_source="generated")
        else:
            feeds, fields["input_source"] = _user_samples(inputs, decls)
        first = feeds[0]
        fields["samples"] = len(feeds)
        fields["inputs"] = tuple(
            InputSpec(d.name, first[d.name].shape, first[d.name].dtype.name) for d in decls
        )
        if any(d.elem_type == TensorProto.BFLOAT16 for d in decls):
            raise _NotRun("onnxruntime's Python API cannot pass bfloat16 tensors")
        cand_inputs = _declared_inputs(cand.graph)
    except _NotRun as e:
        return finish(VerifyStatus.NOT_RUN, str(e))

    known = {d.name: d.elem_type for d in decls}
    strangers = [d.name for d in cand_inputs if known.get(d.name) != d.elem_type]
    if strangers:
        return finish(
            VerifyStatus.FAILED,
            f"candidate input(s) {strangers} are not inputs of that type in the reference",
        )
    ref_outs, cand_outs = [o.name for o in ref.graph.output], [o.name for o in cand.graph.output]
    if len(ref_outs) != len(cand_outs):
        return finish(
            VerifyStatus.FAILED, f"the reference has {len(ref_outs)} outputs, the candidate {len(cand_outs)}"
        )
    notes = []
    if ref_outs != cand_outs:
        renamed = ", ".join(f"{r}->{c}" for r, c in zip(ref_outs, cand_outs) if r != c)
        notes.append(f"outputs matched by position ({renamed})")

    shared = _shared_intermediates(ref, cand) if intermediates else {}
    fields["compared_on"] = "outputs+intermediates" if shared else "outputs"
    stats = [_Stats(n, "output", atol, rtol) for n in ref_outs] + [
        _Stats(n, "intermediate", atol, rtol) for n in shared
    ]
    extra = [helper.make_tensor_value_info(n, t, None) for n, t in shared.items()]
    cand_feeds = [{d.name: feed[d.name] for d in cand_inputs} for feed in feeds]
    level = ort.GraphOptimizationLevel
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
        try:
            ref.prepare(tmp)
            cand.prepare(tmp)
            ref_sess = _session(ref, extra, level.ORT_DISABLE_ALL)
            cand_sess = _session(cand, extra, level.ORT_DISABLE_ALL)
            for feed, cand_feed in zip(feeds, cand_feeds):
                for s, r, c in zip(stats, _run(ref_sess, ref, feed), _run(cand_sess, cand, cand_feed)):
                    s.add(r, c)
            del ref_sess, cand_sess
        except _NotRun as e:
            return finish(VerifyStatus.NOT_RUN, str(e))
        try:
            _run(_session(cand, (), level.ORT_ENABLE_ALL), cand, cand_feeds[0])
            fields["candidate_runs_optimized"] = True
        except _NotRun as e:
            fields["candidate_runs_optimized"] = False
            notes.append(f"at ORT_ENABLE_ALL: {e}")

    diffs = [s.result() for s in stats]
    weights = _weights(ref, cand, atol, rtol) if intermediates else []
    fields["outputs"] = tuple(d for d in diffs if d.kind == "output")
    fields["intermediates"] = tuple(d for d in diffs if d.kind == "intermediate")
    fields["weights"] = tuple(w.diff for w in weights)
    failing = [d.name for d in diffs if not d.passed]
    bad_weights = [w for w in weights if not w.diff.passed]
    if not failing and not bad_weights:
        return finish(VerifyStatus.PASSED, "; ".join(notes))
    first = _first_divergent(ref.graph, failing) or tuple(failing)
    fields["first_divergent"] = _in_graph_order(ref.graph, [*first, *(w.diff.name for w in bad_weights)])
    problem = next((s.problem for s in stats if s.problem), "")
    summary = problem or (_failure_summary(diffs, failing, first) if failing else "")
    return finish(
        VerifyStatus.FAILED, "; ".join(p for p in [summary, *(w.problem for w in bad_weights), *notes] if p)
    )


def _weights(ref: _Model, cand: _Model, atol: float | None, rtol: float | None) -> list[WeightCheck]:
    """The static check of every fold point (bnfold.verify_weights); if it cannot read a graph,
    the fold points are left to the runtime comparison."""
    try:
        return check_weights(
            ref.proto,
            cand.proto,
            reference_dir=os.path.dirname(ref.path) if ref.path else None,
            candidate_dir=os.path.dirname(cand.path) if cand.path else None,
            atol=atol,
            rtol=rtol,
        )
    except Exception as e:  # noqa: BLE001 - a graph it cannot read is left to the runtime comparison
        log.debug("weights check skipped: %s", _first_line(e))
        return []


def _in_graph_order(graph: onnx.GraphProto, names: Sequence[str]) -> tuple[str, ...]:
    wanted = set(names)
    order = [o for n in graph.node for o in n.output if o in wanted]
    return tuple(dict.fromkeys([*order, *names]))


def _failure_summary(diffs: Sequence[TensorDiff], failing: Sequence[str], first: Sequence[str]) -> str:
    worst = max((d for d in diffs if d.name in first), key=lambda d: (d.nan_inf_mismatch, d.max_rel))
    what = "NaN/Inf at different places" if worst.nan_inf_mismatch else f"max_rel {worst.max_rel:.3g}"
    return (
        f"{len(failing)} of {len(diffs)} compared tensors differ; first divergent: {', '.join(first)} "
        f"({worst.name}: {worst.mismatched} of {worst.total} elements out of tolerance, {what}, "
        f"rtol {worst.rtol:g})"
    )


def _run(sess: ort.InferenceSession, model: _Model, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, dict(feed))
    except Exception as e:  # any onnxruntime failure means NOT_RUN
        raise _NotRun(f"onnxruntime cannot run the {model.label}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
