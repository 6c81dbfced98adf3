"""The ``bnfold`` typer app: routes ``bnfold MODEL`` to the fold command and maps every failure
to one line on stderr and a documented exit code.

    bnfold MODEL [-o OUT] [options]        fold (``bnfold fold MODEL ...`` is the same)
    bnfold check MODEL|DIR|GLOB ...        report foldable BN, verify equivalence; writes nothing

Exit codes: 0 success, 1 findings (verification failed, foldable BN left in ``check``,
``--strict`` with BN left), 2 usage or input error, 3 internal error (a bug in bnfold),
130 interrupted. Errors are one line on stderr, ``bnfold: error: ...``; ``--debug`` adds the
traceback. Heavy modules (onnxruntime, torch) are imported only when a command needs them.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from bnfold.cli import check, fold
from bnfold.cli.console import logging_to_stderr, print_error, wants_debug
from bnfold.cli.options import VersionOption, click_exceptions, normalize_json_args
from bnfold.cli.results import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Interrupted,
)
from bnfold.errors import BnfoldError

_ROOT_OPTIONS = ("--help", "-h", "--version")


class BnfoldCommand(TyperCommand):
    """Help in the command line's words: arguments without Python types (``MODEL``, not
    ``MODEL <str>``), and the examples of the epilog as written, under ``Examples:``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(
                    f"{param.metavar or param.human_readable_name}{'...' if param.nargs != 1 else ''}"
                )
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(
                    (param.metavar or param.human_readable_name, getattr(param, "help", "") or "")
                )
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        if self.epilog:
            with formatter.section("Examples"):
                for line in self.epilog.splitlines():
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


class BnfoldGroup(TyperGroup):
    """Routes ``bnfold MODEL ...`` to the ``fold`` command and turns every failure into one
    line on stderr and a documented exit code (also under typer's ``CliRunner``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = normalize_json_args(args)
        if args and args[0] not in self.commands and args[0] not in _ROOT_OPTIONS:
            first = args[0]
            close = difflib.get_close_matches(first, list(self.commands), n=1)
            if close and not os.path.exists(first) and not any(c in first for c in "./\\"):
                raise click_exceptions.UsageError(
                    f"no such command or file '{first}'; did you mean '{close[0]}'?"
                )
            args = ["fold", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; Ctrl-C becomes :class:`Interrupted` (typer would turn it into a silent
        exit 130)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted("") from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """``bnfold --help`` is the fold's help (what most people run), then the commands."""
        fold = self.commands["fold"]
        formatter.write_usage("bnfold", "MODEL [OUT] [OPTIONS]")
        formatter.write_usage("bnfold check", "MODEL... [OPTIONS]", prefix="       ")
        self.format_help_text(ctx, formatter)
        fold.format_options(type(ctx)(fold, info_name="bnfold", parent=ctx), formatter)
        self.format_commands(ctx, formatter)
        fold.format_epilog(ctx, formatter)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        try:
            with logging_to_stderr(args), _sigterm_as_exit():
                rv = super().main(
                    args=args,
                    prog_name=prog_name or "bnfold",
                    complete_var=complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
            code = rv if isinstance(rv, int) else EXIT_OK
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a line and an exit code
            code = _exit_code_of(exc, debug=wants_debug(args))
        if standalone_mode:
            sys.exit(code)
        return code


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (what CI sends on cancel) unwinds like Ctrl-C: ``finally`` blocks remove the
    staging files, then one line and exit 143. Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_code_of(exc: BaseException, *, debug: bool) -> int:
    """Say what went wrong in one line on stderr (a traceback first with ``--debug``) and
    return the documented exit code; re-raise what is not ours to handle (SystemExit)."""
    if isinstance(exc, click_exceptions.NoArgsIsHelpError):
        print(exc.ctx.get_help() if exc.ctx else "usage: bnfold MODEL [OUT]", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, click_exceptions.UsageError):
        command = exc.ctx.command_path if exc.ctx is not None else "bnfold"
        print_error(f"{exc.format_message()} (see '{command} --help')")
        return EXIT_USAGE
    if isinstance(exc, click_exceptions.ClickException):
        print_error(exc.format_message())
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, typer.Abort, Interrupted)):
        said = str(exc) if isinstance(exc, Interrupted) else ""
        print(f"bnfold: {said or 'interrupted; nothing was written'}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if isinstance(exc, BnfoldError):
        if debug:
            traceback.print_exc()
        print_error(exc.cli_message or str(exc))
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):  # `bnfold check ... | head`: the reader left before the end
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return EXIT_BROKEN_PIPE
    if _terminated(exc):  # SIGTERM: cleaned up on the way out
        print("bnfold: terminated; nothing was written", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    if not isinstance(exc, Exception):  # SystemExit, GeneratorExit: not a failure of ours
        raise exc
    if debug:  # a bug: one line (exit 3) rather than a bare traceback
        traceback.print_exc()
    hint = "" if debug else " (run with --debug for the traceback)"
    print_error(f"internal error: {type(exc).__name__}: {exc}{hint}")
    return EXIT_INTERNAL


def _terminated(exc: BaseException) -> bool:
    """Whether ``exc`` is SIGTERM's ``SystemExit(143)``, or what a C extension made of it: one
    arriving while onnxruntime's module initializes comes back as an ImportError raised from it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, SystemExit) and current.code == EXIT_TERMINATED:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


app = typer.Typer(
    cls=BnfoldGroup,
    rich_markup_mode=None,
    name="bnfold",
    help=(
        "Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul, verified with "
        "onnxruntime.\n\n"
        "bnfold MODEL [OUT] folds, verifies and writes (short for bnfold fold); "
        "bnfold check MODEL... reports what could still be folded.\n\n"
        "Exit codes: 0 success, 1 findings, 2 usage or input error, 3 internal error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(version: VersionOption = False) -> None:
    """Fold BatchNormalization, verified with onnxruntime."""


app.command("fold", cls=BnfoldCommand, help=fold.HELP, short_help=fold.SHORT_HELP, epilog=fold.EXAMPLES)(
    fold.fold_command
)
app.command("check", cls=BnfoldCommand, help=check.HELP, short_help=check.SHORT_HELP, epilog=check.EXAMPLES)(
    check.check_command
)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``bnfold`` script and ``python -m bnfold``."""
    app(args=None if argv is None else list(argv), prog_name="bnfold")
