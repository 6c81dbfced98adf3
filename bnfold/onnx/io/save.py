"""Save ONNX models: streaming, atomic, and never one protobuf message over 2 GB.

:func:`save_model` writes the ``ModelProto`` wire format itself, so that it never builds one
message over 2 GB and never holds a stub's payload in Python memory: the model minus its graph
and the graph minus its initializers are serialized normally (small), the graph's length is
computed up front from the parts, and each initializer is emitted in order -- in-memory
tensors serialized one at a time, stub and external payloads copied from their source file
with ``os.copy_file_range``, and a deferred fold (:func:`~bnfold.onnx.io.external.defer_scaled`)
computed from its source bytes a block at a time. Fields come out in field-number order, so an
embedded save is byte-for-byte what ``model.SerializeToString()`` gives.

:func:`materialize` is the in-memory counterpart: every stub and external tensor embedded.

The write is atomic (see :mod:`bnfold.onnx.io.atomic`). External data goes to
``<output file name>.data`` next to the output, or ``<output file name>.<n>.data`` when that
name is a file the source model reads from or the model being replaced uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from bnfold.errors import BnfoldError, InputError
from bnfold.fold_math import ScaledWeight
from bnfold.onnxlib import onnx

from .atomic import check_output, commit, create_temp, kill_point, remove_stale, terminate_as_exit
from .datanames import choose_data_name, obsolete_data_files, old_data_files
from .external import (
    EXTERNAL,
    Files,
    add_entry,
    graph_tensors,
    is_external,
    model_tensors,
    payload_span,
    scaled_of,
    set_embedded,
    source_dir_of,
    unmark_model,
)
from .sink import Sink, scaled_bytes, write_scaled
from .wire import (
    F_GRAPH_INITIALIZER,
    F_MODEL_GRAPH,
    F_TENSOR_RAW_DATA,
    WT_LEN,
    copy_except,
    copy_field,
    is_repeated,
    split_fields,
    tag,
    varint,
    varint_len,
)

logger = logging.getLogger(__name__)

EXTERNAL_THRESHOLD = 1024
"""Tensors of at least this many bytes go to the external data file when one is written."""

PROTOBUF_LIMIT = 2**31 - 1
"""protobuf refuses to parse a message of 2 GB or more."""

ALIGN = 4096
"""External payloads of at least this size start on a page boundary (onnxruntime can mmap them)."""

_MEMORY = "memory"
"""An in-memory tensor written with its own SerializeToString."""
_MEMORY_RAW = "memory-raw"
"""An in-memory tensor still marked external (onnx's half-converted state): raw_data + head."""
_RAW = "raw"
"""An in-memory tensor with a large raw payload: written as head fields + the payload."""
_SOURCE = "source"
"""A stub or external tensor: the payload is copied from a file."""


@dataclass
class _Item:
    """How one main-graph initializer is written."""

    tensor: onnx.TensorProto
    kind: str
    payload_len: int = 0
    """Length of the raw payload (file span or raw_data); 0 for typed-field tensors."""
    memory_size: int = 0
    """Serialized size of a _MEMORY tensor."""
    source: tuple[str, int, int] | None = None
    """(path, offset, length) of a _SOURCE payload."""
    stub: bool = False
    scaled: ScaledWeight | None = None
    """A deferred fold: the payload is this recipe applied to the source bytes, in blocks."""
    head: bytes = b""
    """The tensor without raw_data / external fields, serialized (not for typed-field tensors)."""
    external: bool = False
    data_offset: int = 0
    before: bytes = b""
    """External output: the emitted TensorProto. Embedded raw payload: the fields before raw_data."""
    after: bytes = b""
    """Embedded raw payload: the fields after raw_data."""
    size: int = 0
    """Size of the emitted TensorProto."""


def tensor_head(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of ``tensor`` without raw_data, external_data and data_location (cheap: the payload
    is never touched -- reading ``raw_data`` would copy it)."""
    out = onnx.TensorProto()
    for fd in onnx.TensorProto.DESCRIPTOR.fields:
        name = fd.name
        if name in ("raw_data", "external_data", "data_location"):
            continue
        if is_repeated(fd):
            values = getattr(tensor, name)
            if len(values):
                copy_field(out, fd, values)
        elif tensor.HasField(name):
            copy_field(out, fd, getattr(tensor, name))
    return out


def _likely_large(tensor: onnx.TensorProto) -> bool:
    """Whether the dims promise at least 64 KiB of payload (decided without touching raw_data)."""
    count = 1
    for d in tensor.dims:
        count *= max(d, 0)
    return count * 2 >= 1 << 16  # any type of two bytes or more; 4-bit types are rare here


def payload_len_from_sizes(total: int, head: int) -> int:
    """Solve ``total = head + 1 + varint_len(L) + L`` for the raw_data length ``L``."""
    body = total - head - len(tag(F_TENSOR_RAW_DATA, WT_LEN))
    for width in range(1, 11):
        candidate = body - width
        if candidate >= 0 and varint_len(candidate) == width:
            return candidate
    raise RuntimeError("inconsistent tensor size")  # pragma: no cover - protobuf invariant


def _align(offset: int, length: int) -> int:
    if length >= ALIGN and offset % ALIGN:
        return offset + ALIGN - offset % ALIGN
    return offset


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source_dir: str | None = None,
    external_data: bool | None = None,
    location: str | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically, streaming payloads from their source files.

    ``external_data``: ``None`` keeps the input's layout (external tensors stay external, in
    ``<file name>.data`` next to the output; new tensors of at least :data:`EXTERNAL_THRESHOLD`
    bytes join them when the model uses external data; everything else is embedded), and
    switches to external data if the file would otherwise exceed protobuf's 2 GB limit.
    ``True``: every tensor with raw data of at least the threshold goes to the data file.
    ``False``: everything is embedded; a model that would pass 2 GB raises BnfoldError.
    ``location``: the data file's name, relative to the output's directory.
    ``source_dir``: the directory external locations of ``model`` are relative to (tensors
    from a lazy :func:`~bnfold.onnx.io.load.load_model` name their files themselves).

    ``path`` may be the file the model was loaded from (an in-place save); it may not be a file
    the model reads tensor data from, a directory or a special file.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"save_model expects an onnx.ModelProto, got {type(model).__name__}")
    display = os.fspath(path)
    out_path = os.path.abspath(display)
    check_output(out_path, display)
    if source_dir is None:
        source_dir = source_dir_of(model)
    with terminate_as_exit():
        remove_stale(os.path.dirname(out_path))
        _Writer(model, out_path, display, source_dir, external_data, location).run()


def materialize(model: onnx.ModelProto, *, base_dir: str | None = None) -> None:
    """Load every stub and external tensor of ``model`` into memory, in place.

    Afterwards the model is an ordinary in-memory ModelProto that onnxruntime and ``onnx.save``
    accept (subject to the 2 GB protobuf limit).
    """
    if base_dir is None:
        base_dir = source_dir_of(model)
    unmark_model(model)
    for tensor in model_tensors(model):
        if is_external(tensor) and not tensor.HasField("raw_data"):
            path, offset, length, _ = payload_span(tensor, base_dir, f"tensor '{tensor.name}'")
            set_embedded(tensor, scaled_bytes(tensor, path, offset, length))
        elif is_external(tensor):
            del tensor.external_data[:]
            tensor.ClearField("data_location")


class _Writer:
    def __init__(
        self,
        model: onnx.ModelProto,
        out_path: str,
        display: str,
        source_dir: str | None,
        external_data: bool | None,
        location: str | None,
    ) -> None:
        self.model = model
        self.out_path = out_path
        self.out_dir = os.path.dirname(out_path)
        self.display = display
        self.source_dir = source_dir
        self.mode = external_data
        self.location = location
        self.data_name = ""
        self._fds: dict[str, int] = {}
        self._data_sources: set[str] = set()
        self._files = Files()
        self._real: dict[str, str] = {}

    # -- sources ---------------------------------------------------------------------------

    def _source_fd(self, path: str) -> int:
        key = self._real.get(path) or self._real.setdefault(path, os.path.realpath(path))
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise InputError(f"{path}: cannot read ({err.strerror})") from None
            self._fds[key] = fd
        return fd

    def _span(self, tensor: onnx.TensorProto) -> tuple[tuple[str, int, int], bool]:
        """The payload's ``(path, offset, length)`` and whether it is a stub into a model file."""
        path, offset, length, ref = payload_span(
            tensor, self.source_dir, f"tensor '{tensor.name}'", self._files
        )
        self._source_fd(path)  # opened now: an in-place save replaces the source only at the end
        stub = ref.source is not None
        if not stub:
            self._data_sources.add(self._real[path])
        return (path, offset, length), stub

    # -- plan --------------------------------------------------------------------------------

    def _embed_rest(self, message: onnx.ModelProto | onnx.GraphProto) -> bool:
        """Embed external tensors outside the main initializers; True if there were any."""
        found = False
        tensors = (
            model_tensors(message, main_initializers=False)
            if isinstance(message, onnx.ModelProto)
            else graph_tensors(message, initializers=False)
        )
        for tensor in tensors:
            if not is_external(tensor):
                continue
            if tensor.HasField("raw_data"):
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                continue
            (path, offset, length), stub = self._span(tensor)
            found = found or not stub
            set_embedded(tensor, scaled_bytes(tensor, path, offset, length))
        return found

    def _plan_items(self) -> tuple[list[_Item], bool]:
        items: list[_Item] = []
        uses_external = False
        for tensor in self.model.graph.initializer:
            external = is_external(tensor)
            if external and not tensor.HasField("raw_data"):
                source, stub = self._span(tensor)
                uses_external = uses_external or not stub
                head = tensor_head(tensor).SerializeToString()
                item = _Item(tensor, _SOURCE, source[2], source=source, stub=stub, head=head)
                item.scaled = scaled_of(tensor)
                items.append(item)
            elif external:  # onnx's half-converted state: marked external, data still in memory
                uses_external = True
                head = tensor_head(tensor).SerializeToString()
                items.append(_Item(tensor, _MEMORY_RAW, len(tensor.raw_data), head=head))
            elif tensor.HasField("raw_data") and _likely_large(tensor):
                # ByteSize would encode the whole tensor (and SerializeToString again): take the
                # payload's length and later write the payload itself between the head's fields
                head = tensor_head(tensor).SerializeToString()
                items.append(_Item(tensor, _RAW, len(tensor.raw_data), head=head))
            else:
                size = tensor.ByteSize()
                item = _Item(tensor, _MEMORY, memory_size=size)
                if tensor.HasField("raw_data"):
                    item.head = tensor_head(tensor).SerializeToString()
                    item.payload_len = payload_len_from_sizes(size, len(item.head))
                items.append(item)
        return items, uses_external

    def _decide(self, items: list[_Item], mode: bool | None, uses_external: bool) -> int:
        """Mark each item external or embedded and assign data offsets; return the initializers' bytes."""
        total = 0
        data_pos = 0
        for item in items:
            has_raw = item.kind != _MEMORY or item.tensor.HasField("raw_data")
            large = has_raw and item.payload_len >= EXTERNAL_THRESHOLD
            if mode is False:
                item.external = False
            elif mode is True:
                item.external = large
            elif item.kind == _SOURCE and item.scaled is None:
                item.external = not item.stub
            elif item.kind == _SOURCE:  # a deferred fold is placed as the array it stands for
                item.external = large and uses_external
            elif item.kind == _MEMORY_RAW:
                item.external = True
            else:  # _MEMORY, _RAW: in memory, embedded in the source model
                item.external = large and uses_external
            if item.tensor.data_type == onnx.TensorProto.STRING:
                item.external = False
            if item.external:
                data_pos = _align(data_pos, item.payload_len)
                item.data_offset = data_pos
                data_pos += item.payload_len
                emitted = onnx.TensorProto()
                emitted.ParseFromString(item.head)
                add_entry(emitted, "location", self.data_name)
                add_entry(emitted, "offset", str(item.data_offset))
                add_entry(emitted, "length", str(item.payload_len))
                emitted.data_location = EXTERNAL
                item.before, item.after = emitted.SerializeToString(), b""
                item.size = len(item.before)
            elif item.kind == _MEMORY:
                item.size = item.memory_size
            else:
                item.before, item.after = split_fields(item.head, F_TENSOR_RAW_DATA)
                item.size = len(item.head) + 1 + varint_len(item.payload_len) + item.payload_len
            total += 1 + varint_len(item.size) + item.size
        return total

    def _payload(self, item: _Item, sink: Sink) -> None:
        if item.source is not None:
            path, offset, length = item.source
            if item.scaled is not None:
                write_scaled(item.scaled, self._source_fd(path), offset, length, sink)
            else:
                sink.copy_from(self._source_fd(path), offset, length)
            return
        payload = item.tensor.raw_data
        _check_len(len(payload), item.payload_len, item.tensor.name)
        sink.write(payload)

    # -- write -------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _run(self) -> None:
        model = self.model
        if not model.HasField("graph"):
            rest = copy_except(model, "")
            unmark_model(rest)
            self._embed_rest(rest)
            self._commit([rest.SerializeToString()], [], None, set())
            return
        rest_model = copy_except(model, "graph")
        unmark_model(rest_model)
        rest_graph = copy_except(model.graph, "initializer")
        uses_external = self._embed_rest(rest_model)
        uses_external = self._embed_rest(rest_graph) or uses_external
        items, init_external = self._plan_items()
        uses_external = uses_external or init_external
        if os.path.realpath(self.out_path) in self._data_sources:
            raise InputError(
                f"{self.display}: is an external data file the model reads its weights from; "
                "refusing to overwrite it"
            )
        old_data = old_data_files(self.out_path)
        self.data_name = choose_data_name(
            self.out_path, self.display, self.location, set(self._fds) | old_data
        )

        model_before, model_after = split_fields(rest_model.SerializeToString(), F_MODEL_GRAPH)
        graph_before, graph_after = split_fields(rest_graph.SerializeToString(), F_GRAPH_INITIALIZER)

        def model_size(init_bytes: int) -> int:
            graph_size = len(graph_before) + init_bytes + len(graph_after)
            return len(model_before) + len(model_after) + 1 + varint_len(graph_size) + graph_size

        mode = self.mode
        init_bytes = self._decide(items, mode, uses_external)
        if model_size(init_bytes) > PROTOBUF_LIMIT:
            if mode is False:
                raise BnfoldError(
                    f"{self.display}: the model would be {model_size(init_bytes) / 1e9:.2f} GB, over "
                    "protobuf's 2 GB limit for one file; save it with external data"
                )
            if mode is None:
                logger.debug("%s: over 2 GB embedded, switching to external data", self.display)
                init_bytes = self._decide(items, True, True)
            if model_size(init_bytes) > PROTOBUF_LIMIT:
                raise BnfoldError(
                    f"{self.display}: the model is over protobuf's 2 GB limit even with its "
                    "initializers in external data (large tensors in node attributes or subgraphs)"
                )
        graph_size = len(graph_before) + init_bytes + len(graph_after)
        header = [model_before, tag(F_MODEL_GRAPH, WT_LEN) + varint(graph_size), graph_before]
        self._commit(header, items, graph_after + model_after, old_data)

    def _commit(
        self, header: list[bytes], items: list[_Item], trailer: bytes | None, old_data: set[str]
    ) -> None:
        base = os.path.basename(self.out_path)
        any_external = any(item.external for item in items)
        temps: list[str] = []
        fds: list[int] = []
        try:
            model_fd, model_tmp = create_temp(self.out_dir, base, self.display)
            temps.append(model_tmp)
            fds.append(model_fd)
            data_fd = None
            moves: list[tuple[str, str]] = []
            data_path = None
            if any_external:
                data_path = os.path.join(self.out_dir, self.data_name)
                data_fd, data_tmp = create_temp(
                    os.path.dirname(data_path), os.path.basename(data_path), self.display
                )
                temps.append(data_tmp)
                fds.append(data_fd)
                moves.append((data_tmp, data_path))
            try:
                self._write(model_fd, data_fd, header, items, trailer)
                kill_point("written")
                for fd in fds:
                    os.fsync(fd)
            except OSError as err:
                raise BnfoldError(f"{self.display}: writing failed ({err.strerror or err})") from err
            for fd in fds:
                os.close(fd)
            fds.clear()
            keep = self._data_sources | ({os.path.realpath(data_path)} if data_path else set())
            commit(moves, (model_tmp, self.out_path), obsolete_data_files(self.out_path, old_data, keep))
            temps.clear()
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for tmp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise

    def _write(
        self,
        model_fd: int,
        data_fd: int | None,
        header: list[bytes],
        items: list[_Item],
        trailer: bytes | None,
    ) -> None:
        sink = Sink(model_fd)
        data = Sink(data_fd) if data_fd is not None else None
        for part in header:
            sink.write(part)
        field_tag = tag(F_GRAPH_INITIALIZER, WT_LEN)
        raw_tag = tag(F_TENSOR_RAW_DATA, WT_LEN)
        expected = sum(len(p) for p in header)
        for item in items:
            sink.write(field_tag + varint(item.size))
            if item.external:
                if data is None:  # pragma: no cover - planned above
                    raise RuntimeError("external tensor without a data file")
                sink.write(item.before)
                data.pad_to(item.data_offset)
                self._payload(item, data)
            elif item.kind == _MEMORY:
                blob = item.tensor.SerializeToString()
                _check_len(len(blob), item.size, item.tensor.name)
                sink.write(blob)
                del blob
            else:
                sink.write(item.before + raw_tag + varint(item.payload_len))
                self._payload(item, sink)
                sink.write(item.after)
            expected += 1 + varint_len(item.size) + item.size
        if trailer:
            sink.write(trailer)
            expected += len(trailer)
        sink.flush()
        if data is not None:
            data.flush()
        if sink.pos != expected:  # pragma: no cover - a bug, not bad input
            raise RuntimeError(f"bnfold.onnx.io wrote {sink.pos} bytes, planned {expected}")


def _check_len(actual: int, planned: int, name: str) -> None:
    if actual != planned:  # pragma: no cover - the model changed while it was being saved
        raise RuntimeError(f"tensor '{name}' changed size while it was being saved ({planned} -> {actual})")
