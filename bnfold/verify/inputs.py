"""What both models are fed: the inputs a caller must give, seeded draws, and files of samples.

Generated samples are standard normal floats, integers in 0..4 (usable as indices) and fair
bools, drawn from one seeded generator per call (:func:`make_inputs` gives the same arrays
:func:`bnfold.verify.verify` uses). Symbolic dimensions come from ``shapes``, then from symbols
those bind, then batch 1 on dimension 0.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError, ShapeError
from .models import FLOAT_TYPES, ModelLike, NotRun, constant_names, first_line, open_model
from .options import InputsLike

__all__ = [
    "InputDecl",
    "declared_inputs",
    "free_dims",
    "generate",
    "generated_samples",
    "load_inputs",
    "make_inputs",
    "switch_inputs",
    "unfixed_error",
    "user_samples",
]


@dataclass(frozen=True)
class InputDecl:
    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None
    """Static size, symbolic name, or None (unknown); None for an unknown rank."""


def declared_inputs(graph: onnx.GraphProto) -> list[InputDecl]:
    """Graph inputs a caller must feed: initializers listed as inputs keep their defaults."""
    constants = constant_names(graph)
    decls = []
    for vi in graph.input:
        if vi.name in constants:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise NotRun(f"input '{vi.name}' is not a tensor; bnfold verifies tensor inputs only")
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
        decls.append(InputDecl(vi.name, tt.elem_type, dims))
    return decls


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def free_dims(decls: Sequence[InputDecl], shapes: Mapping[str, Sequence[int]] | None) -> list[str]:
    """The dimensions nothing fixes, other than a leading (batch) one: their symbol, or
    ``input[i]`` for an unnamed one (the keys :func:`resolve_shapes` takes in ``bind``)."""
    given = dict(shapes or {})
    bound = set()  # symbols that ``shapes`` or a leading dimension fix
    for d in decls:
        for i, dim in enumerate(d.dims or ()):
            if isinstance(dim, str) and dim and (d.name in given or i == 0):
                bound.add(dim)
    free: list[str] = []
    for d in decls:
        if d.name in given:
            continue
        for i, dim in enumerate(d.dims or ()):
            key = dim or f"{d.name}[{i}]"
            if i > 0 and not isinstance(dim, int) and key not in bound and key not in free:
                free.append(key)
    return free


def resolve_shapes(
    decls: Sequence[InputDecl],
    shapes: Mapping[str, Sequence[int]] | None,
    bind: Mapping[str, int] | None = None,
) -> dict:
    """Concrete shape per input: ``shapes`` first, then symbols they bind, then batch 1 on dim 0,
    then ``bind`` (sizes chosen for :func:`free_dims`)."""
    bind = dict(bind or {})
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
            raise unfixed_error(d, f"input '{d.name}' has no declared shape")
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
            elif (dim or f"{d.name}[{i}]") in bind:
                out.append(bind[dim or f"{d.name}[{i}]"])
            else:
                what = f"'{dim}'" if dim else "unknown"
                raise unfixed_error(d, f"input '{d.name}' dimension {i} ({what}) is not fixed")
        resolved[d.name] = tuple(out)
    for name, shape in resolved.items():
        _check_generable(name, shape)
    return resolved


MAX_SAMPLE_ELEMENTS = 1 << 28
"""Elements one generated input may have (1 GiB of float32): a declared or given shape past it is
refused before anything is allocated, instead of exhausting memory."""


def _check_generable(name: str, shape: tuple[int, ...]) -> None:
    if any(s < 0 for s in shape):
        raise InputError(f"input '{name}' declares negative size(s) {shape}: not a valid ONNX shape")
    size = 1
    for s in shape:
        size *= s
    if size > MAX_SAMPLE_ELEMENTS:
        raise InputError(
            f"input '{name}' of shape {shape} would be {size:,} elements per sample (at most "
            f"{MAX_SAMPLE_ELEMENTS:,} are generated); pass a smaller shape, or real inputs",
        )


def unfixed_error(d: InputDecl, what: str) -> ShapeError:
    """A ShapeError in the API's words; ``cli_message`` says the same in the command line's."""
    if not d.dims:
        api, cli = f"shapes={{'{d.name}': (1, 3, 224, 224)}}", f"--shape {d.name}=1x3x224x224"
    else:
        dims = [str(x) if isinstance(x, int) else (x or "?") for x in d.dims]
        api = f"shapes={{'{d.name}': ({', '.join(dims)})}} with numbers in place of names"
        cli = f"--shape {d.name}={'x'.join(dims)} with numbers in place of names"
    return ShapeError(f"{what}: pass {api}", cli_message=f"{what}: pass {cli}")


def generate(decls, shapes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample: standard normal floats, integers in 0..4 (usable as indices), fair bools."""
    sample = {}
    for d in decls:
        dtype, shape = np_dtype(d.elem_type), shapes[d.name]
        if d.elem_type in FLOAT_TYPES:
            sample[d.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "c":
            sample[d.name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind in "iu":
            sample[d.name] = rng.integers(0, 5, size=shape).astype(dtype)
        elif dtype.kind == "b":
            sample[d.name] = np.asarray(rng.random(shape) < 0.5)  # a rank-0 draw is a numpy.bool_
        else:
            raise NotRun(f"cannot generate inputs of type {dtype.name} ('{d.name}'); pass inputs")
    return sample


def generated_samples(
    decls: Sequence[InputDecl],
    shapes: Mapping[str, Sequence[int]] | None,
    seed: int,
    samples: int,
    bind: Mapping[str, int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``samples`` seeded draws. A bool input of one element (an If condition) alternates True,
    False, ... over the samples, and there are at least two of them, so both branches run."""
    if samples < 1:
        raise InputError(f"samples must be at least 1, not {samples}")
    fixed, rng = resolve_shapes(decls, shapes, bind), np.random.default_rng(seed)
    switches = switch_inputs(decls, fixed)
    drawn = [generate(decls, fixed, rng) for _ in range(max(samples, 2 if switches else 1))]
    for i, sample in enumerate(drawn):
        for name in switches:
            sample[name] = np.full(fixed[name], i % 2 == 0)
    return drawn


def switch_inputs(decls: Sequence[InputDecl], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Bool inputs of one element: the ones that can steer an If."""
    return [
        d.name
        for d in decls
        if np_dtype(d.elem_type).kind == "b" and int(np.prod(shapes[d.name], dtype=np.int64)) == 1
    ]


def make_inputs(
    model: ModelLike, *, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, samples: int = 3
) -> list[dict[str, np.ndarray]]:
    """The ``samples`` input draws :func:`verify` generates for ``model`` (same seed, same arrays).

    Raises ShapeError for a dimension nothing fixes, InputError for an input it cannot make.
    """
    try:
        return generated_samples(declared_inputs(open_model(model, "model").graph), shapes, seed, samples)
    except NotRun as e:
        raise InputError(str(e)) from None


def load_inputs(
    path: str | os.PathLike, input_names: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Samples from ``path``: an ``.npz`` (one sample, keys = input names), a folder of
    ``input_<i>.pb`` TensorProto files (one sample, the ONNX test-data layout), or a folder of
    ``test_data_set_<n>`` folders (one sample each). A ``.pb`` tensor without a name takes the
    name at its position in ``input_names``, or without those its file's stem (``input_0``).
    Raises InputError (one line) for anything missing or unreadable; an ``.npz`` is checked from
    its zip directory before anything is inflated (an array named after none of ``input_names``,
    one past :data:`MAX_NPZ_MEMBER_BYTES` inflated).
    """
    return _load(Path(path), input_names, {})


MAX_NPZ_MEMBER_BYTES = 1 << 31
"""The most bytes one array of an ``.npz`` may inflate to when the model does not bound it (an
input with a symbolic dimension): 3 GB of zeros compress to 3 MB."""


def _load(
    p: Path, input_names: Sequence[str] | None, limits: Mapping[str, int]
) -> list[dict[str, np.ndarray]]:
    """:func:`load_inputs`; ``limits`` caps the inflated bytes of the named arrays of an ``.npz``."""
    if not p.exists():
        raise InputError(f"{p}: no such file or folder (inputs)")
    if p.is_file():
        if p.suffix != ".npz":
            raise InputError(f"{p}: inputs must be an .npz file or a folder of .pb tensors")
        _check_npz_directory(p, input_names, limits)
        try:
            with np.load(p, allow_pickle=False) as npz:
                return [{k: npz[k] for k in npz.files}]
        except Exception as e:
            raise InputError(f"{p}: cannot read as .npz ({first_line(e)})") from e
    sets = [d for d in p.iterdir() if d.is_dir() and re.fullmatch(r"test_data_set_\d+", d.name)]
    sets.sort(key=lambda d: int(d.name.rsplit("_", 1)[1]))
    return [_load_pb_dir(d, input_names) for d in (sets or [p])]


def _check_npz_directory(p: Path, input_names: Sequence[str] | None, limits: Mapping[str, int]) -> None:
    """Refuse, from the zip's directory alone (nothing inflated yet), an ``.npz`` with an array
    the model has no input for or one that would inflate past what its input can hold."""
    try:
        with zipfile.ZipFile(p) as z:
            members = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise InputError(f"{p}: cannot read as .npz ({first_line(e)})") from None
    keys = {m.filename.removesuffix(".npy"): m for m in members}
    if input_names is not None and (unknown := sorted(set(keys) - set(input_names))):
        raise InputError(f"inputs: unknown input(s) {unknown}; the model's inputs are {list(input_names)}")
    for key, member in keys.items():
        limit = limits.get(key, MAX_NPZ_MEMBER_BYTES)
        if member.file_size > limit:
            raise InputError(
                f"{p}: array {key!r} inflates to {member.file_size:,} bytes, more than "
                + (
                    f"input {key!r} can hold ({limit:,} bytes)"
                    if key in limits
                    else f"bnfold reads ({limit:,})"
                )
            )


def _npz_limits(decls: Sequence[InputDecl]) -> dict[str, int]:
    """Inflated bytes an ``.npz`` array may have for each input of static shape: 16 bytes an
    element (the widest dtype that casts to the input's) and room for the ``.npy`` header."""
    return {
        d.name: 16 * int(np.prod(d.dims, dtype=object)) + 65536
        for d in decls
        if d.dims is not None and all(isinstance(x, int) for x in d.dims)
    }


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
            raise InputError(f"{f}: not a serialized onnx TensorProto ({first_line(e)})") from e
        name = t.name
        if not name and input_names is None:
            name = f.stem
        elif not name:
            if index >= len(input_names):
                raise InputError(f"{f}: tensor has no name and its position matches no model input")
            name = input_names[index]
        sample[name] = array
    return sample


def user_samples(inputs: InputsLike, decls: Sequence[InputDecl]) -> tuple[list[dict], str]:
    names = [d.name for d in decls]
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        samples, source = _load(p, names, _npz_limits(decls)), ("npz:" if p.is_file() else "pb-dir:") + str(p)
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


def _check_array(d: InputDecl, value: Any, where: str) -> np.ndarray:
    array, dtype = np.asarray(value), np_dtype(d.elem_type)
    if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InputError(f"{where}: input '{d.name}' is {array.dtype}, the model wants {dtype.name}")
        cast = array.astype(dtype)
        with np.errstate(all="ignore"):
            back = cast.astype(array.dtype)
        same = (back == array) | (np.isnan(back) & np.isnan(array) if array.dtype.kind in "fc" else False)
        if not np.all(same):
            changed = int(array.size - np.count_nonzero(same))
            raise InputError(
                f"{where}: input '{d.name}' is {array.dtype} and {changed} of its {array.size} values change "
                f"when cast to the model's {dtype.name}; pass {dtype.name} values"
            )
        array = cast
    if d.dims is not None and (
        len(d.dims) != array.ndim or any(isinstance(x, int) and x != s for x, s in zip(d.dims, array.shape))
    ):
        want = tuple(x if isinstance(x, int) else (x or "?") for x in d.dims)
        raise InputError(f"{where}: input '{d.name}' has shape {array.shape}, the model wants {want}")
    return array
