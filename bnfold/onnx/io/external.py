"""External data references: parsing them as onnxruntime does, resolving them safely, reading them.

A tensor stored outside the ``.onnx`` file has ``data_location = EXTERNAL`` and
``external_data`` entries ``location`` (relative to the model's folder), ``offset``,
``length`` and ``checksum``. bnfold accepts exactly what onnxruntime accepts: no other key, no
key twice, numbers written as plain decimal digits, and a location that stays inside the
model's folder -- lexically (no absolute path, no ``..``) and after symbolic links are
resolved.

Typed references
----------------
:func:`~bnfold.onnx.io.load.load_model` ``(lazy=True)`` points large embedded tensors into the
``.onnx`` file without reading them. Such a stub's ``location`` is a token that names a
:class:`Source` kept here, in a side table (one entry per load, not per tensor); its
``offset`` and ``length`` are ordinary entries. :func:`stub_of` gives the typed view, a
:class:`Stub`. The token is meaningless to anyone else: a file that carries one (a lazily
loaded model written with ``onnx.save``) is refused on load. Tensors in external data files
stay plain references; the lazily loaded model names its folder in one model-level
``metadata_props`` entry (:data:`MODEL_KEY`, the same token) that :func:`source_dir_of` reads
and every save strips.

Deferred folds
--------------
A fold into such a tensor is decided by the pass and computed only where the tensor is
written or read: :func:`defer_scaled` renames the tensor, keeps its reference to the unfolded
bytes and adds one entry, :data:`SCALED_KEY`, whose token names the recipe (a
:class:`bnfold.fold_math.ScaledWeight`) in a second side table. ``save_model`` computes the
values in blocks, ``read_array`` and ``materialize`` whole; a file that carries the key is
refused on load like a stub's token. A recipe left undecided (:mod:`bnfold.fold_optimistic`) is
checked by whichever of them computes it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bnfold.errors import InputError
from bnfold.fold_math import ScaledWeight
from bnfold.onnx import protos
from bnfold.onnxlib import onnx

EXTERNAL = onnx.TensorProto.EXTERNAL
TOKEN_PREFIX = "bnfold-lazy:"
"""``location`` of a typed reference: the prefix, then the key of its :class:`Source`."""
OLD_RESERVED_PREFIX = "bnfold."
"""Keys older versions of bnfold put into stubs; a file that carries them is refused."""
KNOWN_KEYS = frozenset({"location", "offset", "length", "checksum"})
SCALED_KEY = "bnfold-scaled"
"""``external_data`` key of a deferred fold (:func:`defer_scaled`): a token naming its recipe."""
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Source:
    """The ``.onnx`` file a lazy load left stubs in, as it was when it was loaded: each stub's
    payload is a ``raw_data`` field inside it."""

    path: str
    """Absolute path of the file."""
    location: str
    """The file's base name (what error messages show)."""
    stamp: str
    """``size:mtime_ns:inode`` at load time; a read refuses a file that changed since."""


@dataclass(frozen=True)
class Stub:
    """Where a lazily loaded tensor's bytes lie."""

    source: Source
    offset: int
    length: int


_SOURCES: dict[str, Source] = {}

MODEL_KEY = "bnfold.lazy"
"""``ModelProto.metadata_props`` key of a lazily loaded model: its :class:`Source` token."""


def mark_model(model: onnx.ModelProto, token: str) -> None:
    """Record in ``model`` the load it came from (replacing any mark the file carried)."""
    unmark_model(model)
    entry = model.metadata_props.add()
    entry.key = MODEL_KEY
    entry.value = token


def unmark_model(model: onnx.ModelProto) -> None:
    keep = [(e.key, e.value) for e in model.metadata_props if e.key != MODEL_KEY]
    if len(keep) != len(model.metadata_props):
        del model.metadata_props[:]
        for key, value in keep:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def source_dir_of(model: onnx.ModelProto) -> str | None:
    """The folder of the file a lazily loaded ``model`` came from (None for other models)."""
    for entry in model.metadata_props:
        if entry.key == MODEL_KEY:
            source = _SOURCES.get(entry.value)
            return os.path.dirname(source.path) if source is not None else None
    return None


def register_source(source: Source) -> str:
    """The location token that stands for ``source`` in the tensors of one load."""
    token = f"{TOKEN_PREFIX}{os.urandom(8).hex()}"
    _SOURCES[token] = source
    return token


@dataclass(frozen=True)
class ExternalRef:
    """The parsed ``external_data`` entries of one tensor."""

    location: str
    offset: int
    length: int | None
    source: Source | None
    """Set for a typed reference made by a lazy load."""
    scaled: ScaledWeight | None = None
    """Set for a deferred fold: the values are this recipe applied to the bytes referenced."""


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == EXTERNAL


def _number(raw: str, key: str, tensor_name: str, where: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) > INT64_MAX:
        raise InputError(
            f"{where}: tensor '{tensor_name}' has an invalid external data {key} {raw!r} "
            "(onnxruntime accepts only decimal digits)"
        )
    return int(raw)


def external_ref(tensor: onnx.TensorProto, where: str) -> ExternalRef:
    """Parse ``tensor``'s external data entries the way onnxruntime does; InputError otherwise."""
    values: dict[str, str] = {}
    scaled = None
    for entry in tensor.external_data:
        key = entry.key
        if type(key) is bytes or type(entry.value) is bytes:  # proto2 strings are not checked
            raise InputError(
                f"{where}: tensor '{tensor.name}' has an external data entry that is not valid UTF-8"
            )
        if key.startswith(OLD_RESERVED_PREFIX):
            raise reserved_error(tensor, where, f"key {key!r}")
        if key == SCALED_KEY:
            if scaled is not None or entry.value not in _SCALED:
                raise reserved_error(tensor, where, f"key {key!r}")
            scaled = _SCALED[entry.value]
            continue
        if key not in KNOWN_KEYS:
            raise InputError(
                f"{where}: tensor '{tensor.name}' has an unknown external data key {key!r} "
                "(onnxruntime refuses it)"
            )
        if key in values:
            raise InputError(f"{where}: tensor '{tensor.name}' has external data key {key!r} twice")
        values[key] = entry.value
    location = values.get("location", "")
    if not location:
        raise InputError(f"{where}: tensor '{tensor.name}' is marked external but has no location")
    offset = values.get("offset")
    length = values.get("length")
    source = None
    if location.startswith(TOKEN_PREFIX):
        source = _SOURCES.get(location)
        if source is None:
            raise reserved_error(tensor, where, f"location {location!r}")
    return ExternalRef(
        location=location,
        offset=0 if offset is None else _number(offset, "offset", tensor.name, where),
        length=None if length is None else _number(length, "length", tensor.name, where),
        source=source,
        scaled=scaled,
    )


def reserved_error(tensor: onnx.TensorProto, where: str, what: str) -> InputError:
    return InputError(
        f"{where}: tensor '{tensor.name}' carries bnfold's internal external-data {what} "
        "(a lazily loaded model saved with onnx.save?); save it with bnfold.onnx.io.save_model instead"
    )


def stub_of(tensor: onnx.TensorProto) -> Stub | None:
    """The typed reference of a tensor that a lazy load left in the model file (not of a
    deferred fold: its bytes there are not its values)."""
    if not is_external(tensor) or tensor.HasField("raw_data") or scaled_of(tensor) is not None:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            source = _SOURCES.get(entry.value)
            if source is None:
                return None
            ref = external_ref(tensor, f"tensor '{tensor.name}'")
            length = ref.length if ref.length is not None else -1
            return Stub(source=source, offset=ref.offset, length=length)
    return None


_SCALED: dict[str, ScaledWeight] = {}


def scaled_of(tensor: onnx.TensorProto) -> ScaledWeight | None:
    """The recipe of a deferred fold (:func:`defer_scaled`), or None."""
    for entry in tensor.external_data:
        if entry.key == SCALED_KEY:
            return _SCALED.get(entry.value)
    return None


def defer_scaled(tensor: onnx.TensorProto, recipe: ScaledWeight, name: str) -> onnx.TensorProto | None:
    """A tensor named ``name`` whose values are ``recipe`` applied to ``tensor``'s bytes (a stub
    or external reference), computed when it is saved (in blocks) or read; None when that does
    not apply (a tensor folded twice, a type the recipe does not keep, a big-endian host).

    It holds what ``numpy_helper.from_array`` would write (name, dims, data type) and the
    reference, plus one ``external_data`` entry whose token names the recipe here, in a side
    table, like a stub's :class:`Source`: a file that carries it is refused on load.
    """
    if (
        not np.little_endian
        or scaled_of(tensor) is not None
        or protos.np_dtype(tensor.data_type) != recipe.dtype
        or tuple(tensor.dims) != recipe.shape
    ):
        return None
    out = onnx.TensorProto()
    out.dims.extend(tensor.dims)
    out.data_type = tensor.data_type
    out.name = name
    out.external_data.extend(tensor.external_data)
    out.data_location = EXTERNAL
    token = f"{TOKEN_PREFIX}{os.urandom(8).hex()}"
    _SCALED[token] = recipe
    add_entry(out, SCALED_KEY, token)
    if recipe.ticket is not None:  # undecided: checked where it is written (or read)
        recipe.ticket.deferred()
    return out


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is a stub into its own ``.onnx`` file made by ``load_model(lazy=True)``."""
    return stub_of(tensor) is not None


def data_files(model: onnx.ModelProto) -> tuple[str, ...]:
    """The external data files the main graph's initializers name, in order, each once.

    Lazy stubs into the model file itself do not count: they are the model's own bytes.
    """
    out: dict[str, None] = {}
    for tensor in model.graph.initializer:
        if is_external(tensor) and not tensor.HasField("raw_data"):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in _SOURCES:
                    out[entry.value] = None
    return tuple(out)


def file_stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def is_inside(location: str) -> bool:
    """Whether a relative location lexically stays inside its base directory."""
    parts = location.replace("\\", "/").split("/")
    return not (
        not location
        or os.path.isabs(location)
        or location.startswith(("/", "\\"))
        or (len(location) > 1 and location[1] == ":")
        or ".." in parts
        or "\x00" in location
        or all(p in ("", ".") for p in parts)
    )


def resolve_location(base_dir: str, location: str, tensor_name: str, where: str) -> str:
    """The path of an external data file, refused unless it stays inside ``base_dir``.

    Absolute paths and ``..`` are refused; a symbolic link is followed only when its target
    stays inside the folder too, as onnxruntime requires.
    """
    outside = InputError(
        f"{where}: tensor '{tensor_name}' points outside the model's directory "
        f"(external data location {location!r}); only relative paths inside it are allowed"
    )
    if not is_inside(location):
        raise outside
    parts = location.replace("\\", "/").split("/")
    path = os.path.join(base_dir, *[p for p in parts if p not in ("", ".")])
    real_base = os.path.realpath(base_dir)
    if os.path.commonpath([real_base, os.path.realpath(path)]) != real_base:
        raise outside
    return path


class Files:
    """What one load or save learnt about the files it reads: resolved locations and their stats.

    Models name one data file from thousands of tensors; each is resolved (a symbolic-link
    walk) and ``stat``-ed once per operation, not once per tensor.
    """

    def __init__(self) -> None:
        self.paths: dict[tuple[str, str], str] = {}
        self.stats: dict[str, os.stat_result] = {}


def payload_span(
    tensor: onnx.TensorProto, base_dir: str | None, where: str, files: Files | None = None
) -> tuple[str, int, int, ExternalRef]:
    """``(path, offset, length, ref)`` of an external or stub tensor's bytes, checked against the file."""
    files = files or Files()
    ref = external_ref(tensor, where)
    if ref.source is not None:
        path = ref.source.path
    elif base_dir is None:
        raise InputError(
            f"{where}: tensor '{tensor.name}' stores its data in {ref.location!r}; "
            "pass the directory of the model it came from (base_dir / source_dir)"
        )
    else:
        path = files.paths.get((base_dir, ref.location), "")
        if not path:
            path = resolve_location(base_dir, ref.location, tensor.name, where)
            files.paths[(base_dir, ref.location)] = path
    location = ref.source.location if ref.source is not None else ref.location
    try:
        st = files.stats.get(path) or os.stat(path)
        files.stats[path] = st
    except FileNotFoundError:
        raise InputError(
            f"{where}: external data file {location!r} for tensor '{tensor.name}' is missing "
            f"(looked in {os.path.dirname(path)}); copy it next to the model"
        ) from None
    except PermissionError:
        raise InputError(
            f"{where}: permission denied reading external data file {location!r} for tensor '{tensor.name}'"
        ) from None
    except OSError as err:
        raise InputError(
            f"{where}: cannot read external data file {location!r} for tensor '{tensor.name}' ({err.strerror})"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{where}: external data location {location!r} of tensor '{tensor.name}' is not a file"
        )
    if ref.source is not None and ref.source.stamp != file_stamp(st):
        raise InputError(
            f"{path}: changed on disk since it was loaded lazily (tensor '{tensor.name}'); load it again"
        )
    length = ref.length if ref.length is not None else st.st_size - ref.offset
    if ref.offset + length > st.st_size or length < 0:
        raise InputError(
            f"{where}: external data file {location!r} is too short for tensor '{tensor.name}' "
            f"(needs bytes {ref.offset}..{ref.offset + length}, the file has {st.st_size}); "
            "it is truncated or belongs to another model"
        )
    return path, ref.offset, length, ref


def read_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InputError(f"{path}: ended after {len(data)} of {length} bytes at offset {offset}")
    return data


def set_embedded(tensor: onnx.TensorProto, data: bytes) -> None:
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def add_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    entry = tensor.external_data.add()
    entry.key = key
    entry.value = value


# -- every TensorProto of a model ------------------------------------------------------------


def graph_tensors(graph: onnx.GraphProto, *, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from node_tensors(node)


def node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from graph_tensors(sub)


def model_tensors(model: onnx.ModelProto, *, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: graph, subgraphs, node attributes, functions, training info."""
    if model.HasField("graph"):
        yield from graph_tensors(model.graph, initializers=main_initializers)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)
    for info in model.training_info:
        for g in (info.initialization, info.algorithm):
            yield from graph_tensors(g)
