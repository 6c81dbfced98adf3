"""Where the CLI's words go: one-line errors and log records on stderr, the summary on stdout
(unless ``--quiet`` or JSON on stdout), progress on stderr only on a terminal.

rich is imported only when a :class:`Ui` is built, so parsing options and failing early stay cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO


def printable(text: str) -> str:
    """``text`` with control characters (ESC, BEL, newlines...) and other unprintable ones
    written as escapes (``\\x1b``), so a name cannot drive the terminal or break a line."""
    if str(text).isprintable():
        return str(text)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def one_line(text: str) -> str:
    """``text`` on one printable line: every run of white space (newlines included) folded
    into one space, control characters escaped."""
    return printable(" ".join(str(text).split()))


def print_error(message: str) -> None:
    """``bnfold: error: MESSAGE`` on stderr, on one line."""
    print(f"bnfold: error: {one_line(message)}", file=sys.stderr, flush=True)


def _options_part(args: Sequence[str]) -> Sequence[str]:
    """The arguments before ``--`` (after it, everything is a file name)."""
    return args[: list(args).index("--")] if "--" in args else args


def wants_debug(args: Sequence[str]) -> bool:
    """``--debug`` on the command line, or ``BNFOLD_DEBUG`` set to anything but 0."""
    return "--debug" in _options_part(args) or os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to whatever ``sys.stderr`` is now (test runners swap it between calls)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped (node names come from the model)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


@contextmanager
def logging_to_stderr(args: Sequence[str]) -> Iterator[None]:
    """bnfold's log records on stderr for this run: debug with --debug, info with -v, else
    warnings. Python warnings of the libraries (numpy's RuntimeWarnings, deprecations) are not
    bnfold's words: shown only with --debug."""
    head = _options_part(args)
    if wants_debug(args):
        level = logging.DEBUG
    elif "-v" in head or "--verbose" in head:
        level = logging.INFO
    elif "-q" in head or "--quiet" in head:
        level = logging.ERROR
    else:
        level = logging.WARNING
    logger = logging.getLogger("bnfold")
    handler = _StderrHandler()
    handler.setFormatter(_PrintableFormatter("bnfold: %(name)s: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            if not wants_debug(args):
                warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


_ASCII = str.maketrans({"→": "->", "…": "...", "—": "-", "─": "-", "━": "-", "✓": "ok"})
"""What the CLI's own words use beyond ASCII, and what a console that cannot encode them gets."""


class _AsciiFallback:
    """A text stream for a console whose encoding cannot write ``→`` (cp1252, ascii):
    our symbols become ASCII, any other unencodable character a backslash escape."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.encoding = stream.encoding

    def write(self, text: str) -> int:
        safe = text.translate(_ASCII).encode(self.encoding, "backslashreplace").decode(self.encoding)
        return self._stream.write(safe)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


def _stream_for(stream: TextIO | None) -> TextIO | _AsciiFallback | None:
    """``stream``, wrapped when its encoding cannot write the CLI's symbols."""
    encoding = getattr(stream, "encoding", None)
    if stream is None or not encoding:
        return stream
    try:
        "→…—".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _AsciiFallback(stream)
    return stream


def _isatty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError):
        return False


def _console(stream: TextIO | None, **options: Any) -> Any:
    """A rich console on ``stream``: plain lines, never wrapped, when it is not a terminal."""
    from rich.console import Console

    console = Console(file=_stream_for(stream), highlight=False, **options)  # type: ignore[arg-type]
    if not console.is_terminal:  # logs and pipes: one line per item, never wrapped
        console.soft_wrap = True
        if "COLUMNS" not in os.environ:
            console.width = 120
    return console


def silence_stdout() -> None:
    """Point file descriptor 1 at the null device after stdout failed (closed pipe, full disk),
    so the interpreter's final flush does not fail again and change the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)
    except (OSError, ValueError):
        pass


@contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """While ``enabled`` (``--json`` on stdout), send everything written to stdout, by Python
    code or at the file-descriptor level (onnxruntime's "EP Error" banner), to stderr, so
    stdout carries the JSON document and nothing else."""
    if not enabled:
        yield
        return
    import contextlib

    saved: int | None = None
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError, AttributeError):  # no real fd 1 (a test runner's buffer)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(saved, 1)
            os.close(saved)


class Ui:
    """The consoles of one command run: ``out`` (stdout) for the summary, ``err`` for progress.
    rich is imported when one of them is first used: a ``-q`` or ``--json`` run never does."""

    def __init__(self, *, quiet: bool, verbose: bool, json_stdout: bool) -> None:
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.json_stdout = json_stdout
        self.shows_summary = not quiet and not json_stdout
        self.show_progress = self.shows_summary and not self.verbose and _isatty(sys.stderr)
        self._start = time.perf_counter()
        self._status: Callable[[str], None] | None = None

    @functools.cached_property
    def out(self) -> Any:
        return _console(sys.stdout, quiet=not self.shows_summary)

    @functools.cached_property
    def err(self) -> Any:
        return _console(sys.stderr, stderr=True)

    def print(self, renderable: Any) -> None:
        """The summary on stdout. A stdout that cannot take it (full disk, closed) costs one
        warning line on stderr, not the run: the model was written, the exit code stands."""
        try:
            self.out.print(renderable)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:
            silence_stdout()
            reason = getattr(exc, "strerror", None) or str(exc)
            print(
                f"bnfold: warning: cannot write the summary to stdout ({reason})", file=sys.stderr, flush=True
            )

    @contextmanager
    def status(self) -> Iterator[None]:
        """On a terminal: ``⠇ verifying (3 samples)  0:00:12`` on stderr, the step and the time
        it has been running; nothing otherwise."""
        if not self.show_progress:
            yield
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        )
        with bar:
            task = bar.add_task("starting", total=None)
            self._status = lambda message: bar.update(task, description=message)
            try:
                yield
            finally:
                self._status = None

    def progress(self, message: str) -> None:
        """A step: a timed line on stderr with --verbose, else the spinner's text."""
        if self.verbose:
            from rich.text import Text

            self.err.print(
                Text.assemble((f"{time.perf_counter() - self._start:7.2f}s ", "dim"), printable(message))
            )
        elif self._status is not None:
            self._status(printable(message))

    @contextmanager
    def counter(self, total: int) -> Iterator[Callable[[str], None]]:
        """A ``checking ━━━━ 3/10 0:00:04 name`` bar on stderr; yields ``advance(name)``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("checking"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}", markup=False),
            console=self.err,
            transient=True,
        )
        with progress:
            task = progress.add_task("", total=total)
            yield lambda name: progress.update(task, advance=1, description=name)
