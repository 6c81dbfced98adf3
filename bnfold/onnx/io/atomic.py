"""Atomic writes, written once: a text file, a model file, or a model with its external data.

Every write goes to a temporary name in the destination's folder, is ``fsync``-ed, then
renamed over the destination, so a reader sees the old file or the complete new one. A model
with external data is a *pair*: its data is written under a name the old model does not use,
renamed into place first, then the model, and only then is the old model's data removed --
at every instant the model at the destination has the data it was written with.

Temporary files and staging folders are named ``.bnfold-<pid>-<machine>-<random>...``: a later
run on the same machine (host, boot, pid namespace) removes those whose process is gone (after
a SIGKILL). SIGTERM, what CI sends on cancel, is
turned into ``SystemExit(143)`` while bnfold writes, so the same cleanup runs as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Iterator, Sequence

from bnfold.errors import BnfoldError, InputError

PREFIX = ".bnfold-"
_OWNED = re.compile(r"^\.bnfold-(\d+)-([0-9a-f]{8})-[0-9a-f]+")
KILL_HOOK = "BNFOLD_TEST_KILL_AT"
"""Test hook: ``<point>`` or ``<point>#<n>`` (the n-th time it is reached; points are
``written``, ``data-renamed``, ``model-renamed``) at which the process sends itself the signal
named by ``BNFOLD_TEST_KILL_SIGNAL`` (``KILL`` by default)."""

_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """The test hook of :data:`KILL_HOOK`; nothing unless the environment asks for it."""
    wanted = os.environ.get(KILL_HOOK)
    if not wanted or not wanted.startswith(point):
        return
    _reached[point] = _reached.get(point, 0) + 1
    if wanted in (point, f"{point}#{_reached[point]}"):
        name = os.environ.get("BNFOLD_TEST_KILL_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


@functools.cache
def _machine() -> str:
    """Which pid namespace a pid belongs to: host name, boot and pid namespace, hashed. Another
    container or host writing to the same shared folder has other pids: never judged by ours."""
    import socket  # only staging names need it

    parts = [socket.gethostname()]
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha1("|".join(parts).encode(), usedforsecurity=False).hexdigest()[:8]


def owned_name(name: str = "", suffix: str = "") -> str:
    """A fresh hidden name that records this process:
    ``.bnfold-<pid>-<machine>-<random>[.name][suffix]``."""
    tail = f".{name}" if name else ""
    return f"{PREFIX}{os.getpid()}-{_machine()}-{os.urandom(4).hex()}{tail}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def remove_stale(directory: str) -> list[str]:
    """Remove the temporary files and staging folders left in ``directory`` by dead bnfold processes."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _OWNED.match(name)
        if match is None or match.group(2) != _machine():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(name)
    return removed


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` so ``finally`` blocks clean up.

    Only where SIGTERM has its default action (a caller's own handler is respected) and only in
    the main thread (where Python delivers signals).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        yield
        return
    if previous is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if _Term.renaming:
            _Term.pending = signum
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output(path: str, display: str) -> None:
    """Refuse an output path bnfold cannot or must not replace with a regular file."""
    out_dir = os.path.dirname(path)
    if display.endswith(("/", os.sep)):
        raise InputError(f"{display}: names a directory; give a file name for the output")
    if not os.path.isdir(out_dir):
        raise InputError(f"{display}: cannot write: directory {out_dir} does not exist")
    try:
        st = os.stat(path)  # follows a symbolic link: its target is what a reader would see
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise InputError(f"{display}: cannot write ({err.strerror})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InputError(f"{display}: is a directory; give a file name for the output model")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{display}: is a special file (device, FIFO or socket), not a regular file; refusing to replace it"
        )
    hop = path
    for _ in range(40):  # the kernel's own limit on links followed
        if not os.path.islink(hop):
            break
        hop = os.path.abspath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
        if hop.startswith(("/proc/", "/dev/")):  # /proc/self/fd/1 is whatever stdout is
            raise InputError(f"{display}: is a link to {hop}, a special file; refusing to replace it")
    if os.path.islink(path) and st is None:
        raise InputError(f"{display}: is a dangling symbolic link; refusing to replace it")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{display}: cannot write: permission denied in {out_dir}")


def create_temp(directory: str, name: str, display: str) -> tuple[int, str]:
    """Create and open a fresh temporary file for ``name`` in ``directory``."""
    for _ in range(100):
        tmp = os.path.join(directory, owned_name(name, ".tmp"))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise InputError(f"{display}: cannot write: permission denied in {directory}") from None
        except OSError as err:
            raise InputError(f"{display}: cannot write in {directory} ({err.strerror})") from None
        return fd, tmp
    raise BnfoldError(f"{display}: could not create a temporary file in {directory}")  # pragma: no cover


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def commit(moves: Sequence[tuple[str, str]], model: tuple[str, str], obsolete: Sequence[str] = ()) -> None:
    """Move finished files into place: ``moves`` (data files) first, then ``model``, then
    delete ``obsolete`` (the replaced model's data files). Each pair is ``(temporary, final)``;
    the temporaries are complete and ``fsync``-ed."""
    with _renames():
        _commit(moves, model, obsolete)


class _Term:
    """SIGTERM bookkeeping of :func:`terminate_as_exit`: held back inside :func:`_renames`."""

    renaming = 0
    pending = 0


@contextlib.contextmanager
def _renames() -> Iterator[None]:
    """Hold SIGTERM back until the renames are done: they finish as a whole, then it acts."""
    _Term.renaming += 1
    try:
        yield
    finally:
        _Term.renaming -= 1
        if not _Term.renaming and _Term.pending:
            signum, _Term.pending = _Term.pending, 0
            raise SystemExit(128 + signum)


def _commit(moves: Sequence[tuple[str, str]], model: tuple[str, str], obsolete: Sequence[str]) -> None:
    directories = {os.path.dirname(final) for _, final in (*moves, model)}
    moved: list[str] = []
    try:
        for tmp, final in moves:
            os.replace(tmp, final)
            moved.append(final)
        if moves:
            for directory in directories:
                fsync_dir(directory)
        kill_point("data-renamed")
        os.replace(*model)
    except BaseException:
        for final in moved:  # fresh names no model refers to yet
            with contextlib.suppress(OSError):
                os.unlink(final)
        raise
    for directory in directories:
        fsync_dir(directory)
    kill_point("model-renamed")
    for path in obsolete:
        with contextlib.suppress(OSError):
            os.unlink(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a
    rename: an interrupted run leaves the old file or the complete new one, never a partial one."""
    display = os.fspath(path)
    out = os.path.abspath(display)
    check_output(out, display)
    data = text.encode("utf-8", "surrogateescape")
    with terminate_as_exit():
        fd, tmp = create_temp(os.path.dirname(out), os.path.basename(out), display)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out)
            tmp = ""
        except OSError as err:
            raise InputError(f"{display}: cannot write ({err.strerror or err})") from err
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
