"""Sequential writes to a file descriptor: small writes buffered, payloads copied in the kernel."""

from __future__ import annotations

import errno
import functools
import mmap
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np

from bnfold.errors import InputError
from bnfold.fold_math import ScaledWeight, Undecided
from bnfold.fold_optimistic import rows_accepted
from bnfold.onnxlib import onnx

from .external import read_bytes, scaled_of
from .wire import release_pages

COPY_CHUNK = 1 << 30
WRITEBACK_EVERY = 32 << 20
WRITE_BUFFER = 1 << 20
SCALE_BLOCK = 4 << 20
"""Bytes of a deferred fold's source read, scaled and written at a time."""


class Sink:
    """Sequential writer on a raw file descriptor.

    Every :data:`WRITEBACK_EVERY` bytes it asks the kernel to start writing the finished range
    to disk (``sync_file_range``), so the final ``fsync`` has little left to wait for.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._buf = bytearray()
        self._synced = 0
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= WRITE_BUFFER:
            self.flush()
            write_all(self.fd, data)
            self.pos += len(data)
            self._writeback()
            return
        self._buf += data
        self.pos += len(data)
        if len(self._buf) >= WRITE_BUFFER:
            self.flush()

    def pad_to(self, offset: int) -> None:
        if offset > self.pos:
            self.write(b"\0" * (offset - self.pos))

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        self.flush()
        copy_range(src_fd, self.fd, offset, length)
        self.pos += length
        self._writeback()

    def scratch(self, nbytes: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Two buffers of ``nbytes`` for blocks being computed and written, kept for the whole
        save: touching fresh pages for every block costs more than the multiply."""
        if self._scratch is None or self._scratch[0].nbytes < nbytes:
            self._scratch = (np.empty(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8))
        first, second = self._scratch
        usable = nbytes - nbytes % dtype.itemsize
        return first[:usable].view(dtype), second[:usable].view(dtype)

    def write_overlapped(self, blocks: Iterator[memoryview]) -> None:
        """Write ``blocks`` in order while the next one is being made.

        A second thread writes block k while the caller's generator computes block k + 1 (numpy
        and ``os.write`` release the GIL, so the multiply and the kernel's copy run on two cores).
        At most two blocks are in flight: the generator may reuse the buffer of block k - 1 once
        it is asked for block k + 1, which is only after block k - 1 was written.
        """
        from concurrent.futures import Future, ThreadPoolExecutor  # only a fold's save needs it

        self.flush()
        with ThreadPoolExecutor(1, thread_name_prefix="bnfold-write") as pool:
            previous: Future[None] | None = None
            try:
                for block in blocks:
                    current = pool.submit(write_all, self.fd, block)
                    if previous is not None:
                        previous.result()
                    previous = current
                    self.pos += len(block)
                if previous is not None:
                    previous.result()
            except BaseException:
                if previous is not None:
                    previous.cancel()
                raise
        self._writeback()

    def flush(self) -> None:
        if self._buf:
            write_all(self.fd, self._buf)
            self._buf = bytearray()
            self._writeback()

    def _writeback(self) -> None:
        if self.pos - self._synced >= WRITEBACK_EVERY:
            start_writeback(self.fd, self._synced, self.pos - self._synced)
            self._synced = self.pos


@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from libc, or None (non-Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    sync_file_range_write = 2

    def start(fd: int, offset: int, length: int) -> None:
        func(fd, offset, length, sync_file_range_write)  # advisory: errors are ignored

    return start


def start_writeback(fd: int, offset: int, length: int) -> None:
    start = _load_sync_file_range()
    if start is not None:
        start(fd, offset, length)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:COPY_CHUNK])
        view = view[written:]


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``.

    ``os.copy_file_range`` keeps the bytes in the kernel; it falls back to pread/write where
    the file systems do not support it.
    """
    remaining = length
    copy_file_range = getattr(os, "copy_file_range", None)
    while remaining and copy_file_range is not None:
        try:
            n = copy_file_range(src_fd, dst_fd, min(remaining, COPY_CHUNK), offset)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                break
            raise
        if n == 0:
            raise InputError(f"source file ended {remaining} bytes early while copying at offset {offset}")
        offset += n
        remaining -= n
    while remaining:
        chunk = os.pread(src_fd, min(remaining, 64 << 20), offset)
        if not chunk:
            raise InputError(f"source file ended {remaining} bytes early while copying at offset {offset}")
        write_all(dst_fd, chunk)
        offset += len(chunk)
        remaining -= len(chunk)


def write_scaled(recipe: ScaledWeight, src_fd: int, offset: int, length: int, sink: Sink) -> None:
    """A deferred fold's values, computed from the source bytes a block of rows at a time.

    The source is mapped, not read: the multiply reads the page cache directly, and the pages
    of each finished block are unmapped again, so memory stays one block whatever the tensor.
    An undecided recipe's blocks are checked as they are made
    (:func:`bnfold.fold_optimistic.rows_accepted`): :class:`~bnfold.fold_math.Undecided` when
    one fails, and the save is abandoned like on any other error.
    """
    rows = recipe.shape[0]
    row_bytes = length // rows if rows else 0
    if not row_bytes:
        return
    step = max(1, SCALE_BLOCK // row_bytes)
    stored = recipe.dtype.newbyteorder("<")
    start_map = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(src_fd, offset + length - start_map, access=mmap.ACCESS_READ, offset=start_map)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot map the source of a folded tensor at offset {offset} ({err})") from None
    buffers = sink.scratch(step * row_bytes, recipe.dtype)

    def blocks() -> Iterator[memoryview]:
        released = 0
        for k, start in enumerate(range(0, rows, step)):
            n = min(step, rows - start)
            at = offset - start_map + start * row_bytes
            block = np.frombuffer(mm, dtype=stored, count=n * row_bytes // stored.itemsize, offset=at)
            out, accepted = _computed(recipe, block, start, n, buffers[k % 2])
            del block  # no view may outlive the mapping (a traceback keeps this frame's locals)
            if not accepted:
                raise Undecided(f"rows {start}..{start + n} of a fold computed before it was decided")
            yield memoryview(out).cast("B")
            released = release_pages(mm, released, at + n * row_bytes)

    try:
        sink.write_overlapped(blocks())
    finally:
        mm.close()


CHECK_BLOCK = 256 << 10
"""Bytes of an undecided fold's block computed and checked at a time: the check reads what the
multiply left in cache."""


def _computed(
    recipe: ScaledWeight, block: np.ndarray, start: int, n: int, buffer: np.ndarray
) -> tuple[np.ndarray, bool]:
    """Rows ``start : start + n`` of the result from their source ``block``, in ``buffer``, and
    whether they pass the check of an undecided recipe (True for a decided one)."""
    if recipe.decided:
        return recipe.rows(block, start, out=buffer), True
    per = block.size // n
    step = max(1, CHECK_BLOCK // max(1, per * block.itemsize))
    for at in range(0, n, step):
        part = block[at * per : (at + step) * per]
        if not rows_accepted(part, recipe.rows(part, start + at, out=buffer[at * per :])):
            return buffer, False
    return buffer[: block.size].reshape((n,) + recipe.shape[1:]), True


def scaled_bytes(tensor: onnx.TensorProto, path: str, offset: int, length: int) -> bytes:
    """The bytes of a stub or external tensor's values: a deferred fold computed, else as stored."""
    data = read_bytes(path, offset, length)
    recipe = scaled_of(tensor)
    if recipe is None:
        return data
    return recipe.apply(np.frombuffer(data, dtype=recipe.dtype.newbyteorder("<"))).tobytes()
