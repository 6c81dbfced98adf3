"""Load ONNX models: one actionable InputError line for every problem with the file, and lazily.

With ``lazy=True`` the large initializer payloads are not parsed at all: the file is
``mmap``-ed and scanned at the protobuf wire level (``ModelProto.graph``,
``GraphProto.initializer``, ``TensorProto.raw_data``; numbers from onnx's descriptors). Each
main-graph initializer whose ``raw_data`` is at least :data:`LAZY_THRESHOLD` bytes becomes a
*stub*: a ``TensorProto`` with name, dims, data type and doc string and a typed reference to
its bytes in the ``.onnx`` file (see :mod:`bnfold.onnx.io.external`). Main-graph tensors that
live in external data files stay plain references (checked, not read); the model remembers its
folder (:func:`~bnfold.onnx.io.external.source_dir_of`) for ``save_model``.
Initializers inside subgraphs, sparse initializers and tensors in node attributes are parsed
normally (and their external data loaded), so they are correct but not lazy.

A stub is not a model onnxruntime or ``onnx.save`` understand: read values with
:func:`~bnfold.onnx.io.tensors.read_array`, write the model with
:func:`~bnfold.onnx.io.save.save_model`, or embed everything with
:func:`~bnfold.onnx.io.save.materialize`.
"""

from __future__ import annotations

import mmap
import os
import stat

from google.protobuf.message import DecodeError

from bnfold.errors import InputError
from bnfold.onnxlib import onnx

from .diagnose import check_model_fields, diagnose
from .external import (
    EXTERNAL,
    ExternalRef,
    Files,
    Source,
    external_ref,
    file_stamp,
    mark_model,
    model_tensors,
    payload_span,
    read_bytes,
    register_source,
    reserved_error,
    set_embedded,
    unmark_model,
)
from .tensors import check_tensor
from .validate import check_names
from .wire import (
    F_GRAPH_INITIALIZER,
    F_MODEL_GRAPH,
    F_TENSOR_DATA_LOCATION,
    F_TENSOR_RAW_DATA,
    WT_LEN,
    WT_VARINT,
    WireError,
    entry_bytes,
    iter_fields,
    read_varint,
    release_pages,
    tag,
    varint,
)

LAZY_THRESHOLD = 64 * 1024
"""Payloads of at least this many bytes become stubs in :func:`load_model` ``(lazy=True)``.

Reading a stub costs a file open and read (~30 us, against ~3 us for an embedded tensor), so
small tensors such as BatchNormalization parameters stay in memory; they weigh little."""


def open_model_file(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, with one-line errors for the usual problems."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        where = "" if os.path.isdir(parent) else f" (directory {parent} does not exist either)"
        raise InputError(f"{path}: no such file{where}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            inside = sorted(n for n in os.listdir(path) if n.endswith(".onnx"))
        except OSError:
            inside = []
        hint = f"; did you mean {os.path.join(path, inside[0])}?" if len(inside) == 1 else ""
        raise InputError(f"{path}: is a directory, not an ONNX model file{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not an ONNX model")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise InputError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    return fd, st


def load_model(
    path: str | os.PathLike[str], *, lazy: bool = False, load_external_data: bool = True
) -> onnx.ModelProto:
    """Load an ONNX model, raising :class:`InputError` with one actionable line on bad input.

    ``lazy=True``: large main-graph initializers become stubs that point into the file (see
    the module docstring); tensors in external data files stay references (the model remembers
    its folder for :func:`~bnfold.onnx.io.save.save_model`); nothing large is read. ``lazy=False``: the whole model is parsed and, with
    ``load_external_data=True``, all external data is loaded into memory (like ``onnx.load``).
    With ``load_external_data=False`` external tensors stay plain references: pass
    ``base_dir``/``source_dir`` when you read or save them. Either way every external reference
    is checked (form, location inside the model's folder, file size) and every tensor's type
    and shape.
    """
    path = os.fspath(path)
    fd, st = open_model_file(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        model, token = _load_lazy(fd, st, path) if lazy else (_load_eager(fd, path), "")
    finally:
        os.close(fd)
    check_model_fields(model, path)
    check_names(model, path)
    _check_tensors(model, path, base_dir, token, lazy=lazy, load=load_external_data and not lazy)
    if lazy:
        mark_model(model, token)
    else:
        unmark_model(model)
    return model


def _load_eager(fd: int, path: str) -> onnx.ModelProto:
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            data = f.read()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror})") from None
    return _parse(data, path, data, len(data))


def _parse(data: bytes | bytearray, path: str, original: bytes | mmap.mmap, size: int) -> onnx.ModelProto:
    """``data`` parsed as a ModelProto; InputError saying what is wrong with ``original`` if not."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{path}: {diagnose(original, size)}") from None
    return model


def _load_lazy(fd: int, st: os.stat_result, path: str) -> tuple[onnx.ModelProto, str]:
    """The model with its large payloads as stubs, and the location token of those stubs."""
    size = st.st_size
    try:
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot map the file ({err})") from None
    try:
        source = Source(path=os.path.abspath(path), location=os.path.basename(path), stamp=file_stamp(st))
        token = register_source(source)
        try:
            data = _lazy_bytes(mm, size, token)
        except WireError:
            raise InputError(f"{path}: {diagnose(mm, size)}") from None
        model = _parse(data, path, mm, size)
    finally:
        mm.close()
    return model, token


def _lazy_bytes(mm: mmap.mmap, size: int, token: str) -> bytearray:
    """The model's bytes with each large main-graph ``raw_data`` replaced by a stub reference.

    Built in one buffer (each graph once more while its length is not known yet): a model of
    many small tensors is copied twice, not four times.
    """
    out = bytearray()
    graph_parts: list[bytearray] = []
    for number, wire_type, field_start, value_start, value_end in iter_fields(mm, 0, size):
        if number == F_MODEL_GRAPH and wire_type == WT_LEN:
            graph_parts.append(_lazy_graph(mm, value_start, value_end, token))
        else:
            out += mm[field_start:value_end]
    while graph_parts:  # merged by protobuf: one graph field per chunk is equivalent
        chunk = graph_parts.pop(0)
        out += tag(F_MODEL_GRAPH, WT_LEN) + varint(len(chunk))
        out += chunk
        del chunk
    return out


def _lazy_graph(mm: mmap.mmap, start: int, end: int, token: str) -> bytearray:
    pieces = bytearray()
    run_start: int | None = None  # a run of fields copied verbatim
    location = entry_bytes("location", token)
    released = start
    for number, wire_type, field_start, value_start, value_end in iter_fields(mm, start, end):
        if number != F_GRAPH_INITIALIZER or wire_type != WT_LEN:
            if run_start is None:
                run_start = field_start
            continue
        if run_start is not None:
            pieces += mm[run_start:field_start]
            run_start = None
        tensor = _lazy_tensor(mm, value_start, value_end, location)
        pieces += tag(F_GRAPH_INITIALIZER, WT_LEN) + varint(len(tensor))
        pieces += tensor
        released = release_pages(mm, released, value_end)
    if run_start is not None:
        pieces += mm[run_start:end]
    return pieces


def _lazy_tensor(mm: mmap.mmap, start: int, end: int, location: bytes) -> bytes:
    if end - start < LAZY_THRESHOLD:  # too small to hold a payload worth a stub: kept as it is
        return mm[start:end]
    raw_spans: list[tuple[int, int, int]] = []
    external = False
    for number, wire_type, field_start, value_start, value_end in iter_fields(mm, start, end):
        if number == F_TENSOR_RAW_DATA and wire_type == WT_LEN:
            raw_spans.append((field_start, value_start, value_end))
        elif number == F_TENSOR_DATA_LOCATION and wire_type == WT_VARINT:
            external = read_varint(mm, value_start, value_end)[0] == EXTERNAL
    if external or not raw_spans or raw_spans[-1][2] - raw_spans[-1][1] < LAZY_THRESHOLD:
        return mm[start:end]
    # drop every raw_data field (the last one wins in protobuf) and point at the last payload
    kept: list[bytes] = []
    pos = start
    for field_start, _, value_end in raw_spans:
        kept.append(mm[pos:field_start])
        pos = value_end
    kept.append(mm[pos:end])
    _, payload_start, payload_end = raw_spans[-1]
    kept.append(location)
    kept.append(entry_bytes("offset", str(payload_start)))
    kept.append(entry_bytes("length", str(payload_end - payload_start)))
    kept.append(tag(F_TENSOR_DATA_LOCATION, WT_VARINT) + varint(EXTERNAL))
    return b"".join(kept)


def _check_tensors(
    model: onnx.ModelProto, path: str, base_dir: str, token: str, *, lazy: bool, load: bool
) -> None:
    """Check every tensor's type, shape and external reference; load the ones that belong in memory.

    ``token`` is the location of this load's own stubs: any other typed reference came from
    the file (a lazily loaded model written with ``onnx.save``) and is refused.
    """

    files = Files()

    def span(tensor: onnx.TensorProto) -> tuple[str, int, int, ExternalRef]:
        found = payload_span(tensor, base_dir, path, files)
        if found[3].source is not None and found[3].location != token:
            raise reserved_error(tensor, path, f"location {found[3].location!r}")
        if found[3].scaled is not None:  # a deferred fold written with onnx.save
            raise reserved_error(tensor, path, "key 'bnfold-scaled'")
        return found

    if lazy:  # main-graph initializers: stubs and external references stay; small ones are cheap
        for tensor in model.graph.initializer:
            if tensor.data_location != EXTERNAL:
                check_tensor(tensor, path)
                continue
            _, _, length, ref = span(tensor)
            check_tensor(tensor, path, length, "its external data" if ref.source is None else "its data")
    for tensor in model_tensors(model, main_initializers=not lazy):
        if tensor.data_location != EXTERNAL:
            check_tensor(tensor, path)
            continue
        if tensor.HasField("raw_data"):  # onnx's half-converted state: the data is still here
            check_tensor(tensor, path)
            if external_ref(tensor, path).source is not None:
                raise reserved_error(tensor, path, "location")
            continue
        file_path, offset, length, _ = span(tensor)
        check_tensor(tensor, path, length, "its external data")
        if load or lazy:  # lazy: everything outside the main graph's initializers is embedded
            set_embedded(tensor, read_bytes(file_path, offset, length))
