"""Where the CLI's words go: one-line errors and log records on stderr, the summary on stdout
(unless ``--quiet`` or JSON on stdout), progress on stderr only on a terminal.

rich is imported only when a :class:`Ui` is built, so parsing options and failing early stay cheap.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines included) folded into one space."""
    return " ".join(str(text).split())


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


@contextmanager
def logging_to_stderr(args: Sequence[str]) -> Iterator[None]:
    """bnfold's log records on stderr for this run: debug with --debug, info with -v, else warnings."""
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
    handler.setFormatter(logging.Formatter("bnfold: %(name)s: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class Ui:
    """The consoles of one command run: ``out`` (stdout) for the summary, ``err`` for progress."""

    def __init__(self, *, quiet: bool, verbose: bool, json_stdout: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.json_stdout = json_stdout
        self.out = Console(highlight=False, quiet=quiet or json_stdout)
        self.err = Console(stderr=True, highlight=False)
        if not self.out.is_terminal:  # logs and pipes: one line per item, never wrapped mid-sentence
            self.out.soft_wrap = True
            if "COLUMNS" not in os.environ:
                self.out.width = 120
        self.show_progress = self.err.is_terminal and not quiet and not json_stdout and not self.verbose
        self._start = time.perf_counter()
        self._status: Any = None

    def status(self) -> AbstractContextManager[Any]:
        """A spinner on stderr for a terminal; nothing otherwise."""
        if self.show_progress:
            self._status = self.err.status("starting", spinner="dots")
            return self._status
        return nullcontext()

    def progress(self, message: str) -> None:
        """A step: a timed line on stderr with --verbose, else the spinner's text."""
        if self.verbose:
            self.err.print(f"[dim]{time.perf_counter() - self._start:7.2f}s[/dim] {message}", highlight=False)
        elif self._status is not None:
            self._status.update(message)

    @contextmanager
    def counter(self, total: int) -> Iterator[Callable[[str], None]]:
        """A ``checking ━━━━ 3/10 0:00:04 name`` bar on stderr; yields ``advance(name)``."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("checking"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.err,
            transient=True,
        )
        with progress:
            task = progress.add_task("", total=total)
            yield lambda name: progress.update(task, advance=1, description=name)
