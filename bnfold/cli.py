"""The ``bnfold`` command: a thin typer layer that parses options, calls the library, renders
the result and maps it to an exit code.

    bnfold MODEL [-o OUT] [options]        fold (``bnfold fold MODEL ...`` is the same)
    bnfold check MODEL|DIR|GLOB ...        report foldable BN, verify equivalence; writes nothing

Exit codes: 0 success, 1 findings (verification failed, foldable BN left in ``check``,
``--strict`` with BN left), 2 usage or input error, 3 internal error (a bug in bnfold),
130 interrupted. Errors are one line on stderr, ``bnfold: error: ...``; ``--debug`` adds the
traceback. Heavy modules (onnxruntime, torch) are imported only when a command needs them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from bnfold.errors import BnfoldError, InputError, VerificationError
from bnfold.report import VerifyStatus

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".ts")
"""Inputs handled by the PyTorch path: ``torch.export`` archives (.pt2) and TorchScript."""

_ROOT_OPTIONS = ("--help", "-h", "--version")
_SHAPE_RE = re.compile(r"^\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)*$")


# --------------------------------------------------------------------------------------------
# The group: `bnfold MODEL` means `bnfold fold MODEL`; errors become one line.


def normalize_json_args(args: Sequence[str]) -> list[str]:
    """``--json`` optionally takes a path; click options cannot, so rewrite before parsing:

    ``--json`` alone → stdout;  ``--json -`` / ``--json=-`` → stdout;
    ``--json=PATH`` and ``--json PATH.json`` → ``--json-file PATH``.
    A bare ``--json`` followed by anything else stays a flag, so ``--json a.onnx`` never
    overwrites a model.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--json="):
            value = arg[len("--json=") :]
            out.extend(["--json"] if value in ("", "-") else ["--json-file", value])
        elif (
            arg == "--json"
            and i + 1 < len(args)
            and (args[i + 1] == "-" or args[i + 1].lower().endswith(".json"))
        ):
            out.extend(["--json"] if args[i + 1] == "-" else ["--json-file", args[i + 1]])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _wants_debug(args: Sequence[str]) -> bool:
    head = args[: list(args).index("--")] if "--" in args else args
    return "--debug" in head or os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    print(f"bnfold: error: {_one_line(message)}", file=sys.stderr, flush=True)


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
        debug = _wants_debug(args)
        try:
            with _logging_to_stderr(args):
                rv = super().main(
                    args=args,
                    prog_name=prog_name or "bnfold",
                    complete_var=complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
            code = rv if isinstance(rv, int) else EXIT_OK
        except click_exceptions.NoArgsIsHelpError as exc:
            print(exc.ctx.get_help() if exc.ctx else "usage: bnfold MODEL -o OUT", file=sys.stderr)
            code = EXIT_USAGE
        except click_exceptions.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "bnfold"
            _error(f"{exc.format_message()} (see '{command} --help')")
            code = EXIT_USAGE
        except click_exceptions.ClickException as exc:
            _error(exc.format_message())
            code = exc.exit_code
        except (KeyboardInterrupt, typer.Abort):
            print("bnfold: interrupted", file=sys.stderr, flush=True)
            code = EXIT_INTERRUPTED
        except BnfoldError as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
            code = exc.exit_code
        except BrokenPipeError:  # `bnfold check ... | head`: the reader left before the end
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
            code = EXIT_BROKEN_PIPE
        except Exception as exc:  # noqa: BLE001 - a bug: one line (exit 3) rather than a bare traceback
            if debug:
                traceback.print_exc()
            hint = "" if debug else " (run with --debug for the traceback)"
            _error(f"internal error: {type(exc).__name__}: {exc}{hint}")
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=BnfoldGroup,
    rich_markup_mode=None,
    name="bnfold",
    help=(
        "Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul, verified with "
        "onnxruntime.\n\n"
        "bnfold MODEL -o OUT folds (short for bnfold fold); "
        "bnfold check MODEL... reports what could still be folded.\n\n"
        "Exit codes: 0 success, 1 findings, 2 usage or input error, 3 internal error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        from bnfold.render import versions_line

        print(versions_line())
        raise typer.Exit(EXIT_OK)


VersionOption = Annotated[
    bool,
    typer.Option("--version", callback=_version_callback, is_eager=True, help="Print versions and exit."),
]


@app.callback()
def _root(version: VersionOption = False) -> None:
    """Fold BatchNormalization, verified with onnxruntime."""


# --------------------------------------------------------------------------------------------
# Shared options


def parse_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1x3x224x224`` (or ``NAME=1,3,224,224``) → ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = spec.rpartition("=")
    if not sep or not name:
        raise typer.BadParameter(f"'{spec}' is not NAME=DIMS, e.g. input=1x3x224x224", param_hint="--shape")
    if not _SHAPE_RE.match(dims):
        raise typer.BadParameter(
            f"'{spec}': dimensions must be positive integers joined by 'x', e.g. {name}=1x3x224x224",
            param_hint="--shape",
        )
    shape = tuple(int(d) for d in re.split(r"[x,]", dims.replace(" ", "")))
    if any(d <= 0 for d in shape):
        raise typer.BadParameter(f"'{spec}': dimensions must be positive", param_hint="--shape")
    return name, shape


def _shape_callback(values: list[str] | None) -> list[str] | None:
    shapes = {}
    for spec in values or []:
        name, shape = parse_shape(spec)
        if name in shapes:
            raise typer.BadParameter(f"input '{name}' is given twice", param_hint="--shape")
        shapes[name] = shape
    return values


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    return dict(parse_shape(v) for v in values) if values else None


ShapeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        metavar="NAME=DIMS",
        callback=_shape_callback,
        help="Shape of an input for verification/export, e.g. input=1x3x224x224. Repeatable.",
        show_default=False,
    ),
]
InputsOption = Annotated[
    str | None,
    typer.Option(
        "--inputs",
        metavar="NPZ|DIR",
        help="Verify on these inputs: an .npz (keys = input names) or a folder of TensorProto .pb files.",
        show_default=False,
    ),
]
SeedOption = Annotated[
    int, typer.Option("--seed", metavar="N", help="Seed of the generated verification inputs.")
]
SamplesOption = Annotated[
    int, typer.Option("--samples", min=1, metavar="N", help="Number of generated input samples to verify on.")
]
AtolOption = Annotated[
    float | None,
    typer.Option(
        "--atol",
        min=0.0,
        metavar="FLOAT",
        help="Absolute tolerance (default: 0, per dtype).",
        show_default=False,
    ),
]
RtolOption = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        min=0.0,
        metavar="FLOAT",
        help="Relative tolerance, of the tensor's magnitude (default: per dtype; 1e-4 for float32).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the full report as JSON on stdout, and nothing else there. "
        "--json=PATH or --json PATH.json writes it to a file instead.",
    ),
]
JsonFileOption = Annotated[
    str | None,
    typer.Option("--json-file", metavar="PATH", help="Write the JSON report to PATH.", show_default=False),
]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Exit 1 if any BatchNormalization remains, for any reason.")
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print only errors.")]
VerboseOption = Annotated[
    bool, typer.Option("-v", "--verbose", help="List every BN and compared tensor; log each step on stderr.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to whatever ``sys.stderr`` is now (test runners swap it between calls)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextmanager
def _logging_to_stderr(args: Sequence[str]) -> Iterator[None]:
    """bnfold's log records on stderr for this run: debug with --debug, info with -v, else warnings."""
    head = args[: list(args).index("--")] if "--" in args else args
    if _wants_debug(args):
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


class _Ui:
    """Where output goes: the summary to stdout (unless --quiet or JSON on stdout), progress and
    logs to stderr (only on a terminal, or with --verbose)."""

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
        if self.show_progress:
            self._status = self.err.status("starting", spinner="dots")
            return self._status
        return nullcontext()

    def progress(self, message: str) -> None:
        if self.verbose:
            self.err.print(f"[dim]{time.perf_counter() - self._start:7.2f}s[/dim] {message}", highlight=False)
        elif self._status is not None:
            self._status.update(message)


def _emit_json(document: dict[str, Any], *, to_stdout: bool, path: str | None) -> None:
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    if path is not None:
        from bnfold.check import write_text_atomic

        write_text_atomic(path, text)
    if to_stdout:
        sys.stdout.write(text)
        sys.stdout.flush()


def _check_writable(path: str | None, option: str) -> None:
    """Refuse a report path whose folder does not exist before doing any work."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise typer.BadParameter(f"{path} is a directory", param_hint=option)
    if not os.path.isdir(folder):
        raise typer.BadParameter(f"{path}: folder {folder} does not exist", param_hint=option)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _default_output(source: str) -> str:
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(source), f"{stem}.folded.onnx")


# --------------------------------------------------------------------------------------------
# fold


@app.command(
    "fold",
    help=(
        "Fold BatchNormalization in MODEL, verify the result against MODEL with onnxruntime and write "
        "it (default: <stem>.folded.onnx beside MODEL). bnfold MODEL is short for "
        "bnfold fold MODEL. MODEL may also be a torch.export .pt2 or TorchScript .pt file, "
        "or use --factory."
    ),
)
def fold_command(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL", help="model.onnx (or .pt2/.pt with torch installed).", show_default=False
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o", "--output", metavar="OUT", help="Where to write the folded model.", show_default=False
        ),
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Overwrite MODEL (only after verification).")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify/--no-verify", help="Verify with onnxruntime; roll back folds that diverge."),
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Write the output even if verification fails (exit code stays 1).")
    ] = False,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    samples: SamplesOption = 3,
    seed: SeedOption = 0,
    shape: ShapeOption = None,
    inputs: InputsOption = None,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Write weights to a separate .data file (needed past 2 GB) or inline. Default: as MODEL.",
            show_default=False,
        ),
    ] = None,
    factory: Annotated[
        str | None,
        typer.Option(
            "--factory",
            metavar="MODULE:FUNC",
            help="PyTorch: build the model by calling MODULE:FUNC() (with --weights, a state_dict file).",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="PATH",
            help="PyTorch: state_dict to load into the --factory model.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="TENSOR",
            help="Leave the BN writing this tensor name unfolded (ONNX). Repeatable.",
            show_default=False,
        ),
    ] = None,
    json_stdout: JsonOption = False,
    json_file: JsonFileOption = None,
    strict: StrictOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    version: VersionOption = False,
) -> None:
    """Wire the options to :func:`bnfold.pipeline.fold_path` (ONNX) or :func:`bnfold.torch_fold.export`
    (PyTorch). ``--debug`` is read by :class:`BnfoldGroup` and ``--version`` by its eager callback."""
    ui = _Ui(quiet=quiet, verbose=verbose, json_stdout=json_stdout)
    _check_writable(json_file, "--json-file")
    source, out = _resolve_paths(model, output, in_place=in_place, factory=factory)
    if weights and not factory:
        raise typer.BadParameter("--weights needs --factory", param_hint="--weights")
    request = _FoldRequest(
        source=source,
        output=out,
        verify=verify,
        force=force,
        shapes=_shapes(shape),
        inputs=inputs,
        seed=seed,
        samples=samples,
        atol=atol,
        rtol=rtol,
        external_data=external_data,
        exclude=tuple(exclude or ()),
        strict=strict,
        factory=factory,
        weights=weights,
    )
    if request.is_torch and exclude:
        raise typer.BadParameter("--exclude applies to ONNX models", param_hint="--exclude")
    with ui.status():
        outcome = (_fold_torch if request.is_torch else _fold_onnx)(request, progress=ui.progress)
    from bnfold.render import fold_summary

    ui.out.print(fold_summary(outcome, verbose=ui.verbose))
    if json_stdout or json_file:
        _emit_json(outcome.to_dict(), to_stdout=json_stdout, path=json_file)
    if outcome.exit_code:
        if outcome.error and (ui.quiet or json_stdout):
            print(f"bnfold: {_one_line(outcome.error)}", file=sys.stderr, flush=True)
        raise typer.Exit(outcome.exit_code)


def _resolve_paths(
    model: str | None, output: str | None, *, in_place: bool, factory: str | None
) -> tuple[str, str]:
    """The source and the output path, refusing to overwrite the input without --in-place."""
    if factory is not None:
        if model is not None:
            raise typer.BadParameter("give either MODEL or --factory, not both", param_hint="MODEL")
        if output is None:
            raise typer.BadParameter("--factory needs -o/--output", param_hint="-o/--output")
        return f"{factory}", output
    if model is None:
        raise click_exceptions.UsageError("missing MODEL (bnfold MODEL -o OUT)")
    if os.path.isdir(model):
        raise InputError(f"{model}: is a directory, not a model (bnfold check takes directories)")
    if not os.path.exists(model):
        raise InputError(f"{model}: no such file")
    if in_place:
        if output is not None and not _same_file(output, model):
            raise typer.BadParameter(
                "--in-place writes over MODEL; drop -o or --in-place", param_hint="--in-place"
            )
        if model.lower().endswith(TORCH_SUFFIXES):
            raise typer.BadParameter("--in-place needs an ONNX model", param_hint="--in-place")
        return model, model
    if output is None:
        output = _default_output(model)
    elif os.path.isdir(output):
        output = os.path.join(output, os.path.basename(_default_output(model)))
    if _same_file(output, model):
        raise typer.BadParameter(
            f"{output} is the input model; pass --in-place to overwrite it", param_hint="-o/--output"
        )
    return model, output


@dataclasses.dataclass(frozen=True)
class _FoldRequest:
    """The fold command's options, checked: what to read, where to write, how to verify."""

    source: str
    """A model path, or the ``--factory`` spec."""
    output: str
    verify: bool
    force: bool
    shapes: dict[str, tuple[int, ...]] | None
    inputs: str | None
    seed: int
    samples: int
    atol: float | None
    rtol: float | None
    external_data: bool | None
    exclude: tuple[str, ...]
    strict: bool
    factory: str | None
    weights: str | None

    @property
    def is_torch(self) -> bool:
        return self.factory is not None or self.source.lower().endswith(TORCH_SUFFIXES)


def _fold_onnx(req: _FoldRequest, *, progress: Callable[[str], None]) -> Any:
    from bnfold.check import stats_for_path
    from bnfold.pipeline import fold_path

    start = time.perf_counter()
    progress(f"reading {req.source}")
    before = stats_for_path(req.source)
    fold = _fold_in_place if _same_file(req.source, req.output) else fold_path
    try:
        result = fold(
            req.source,
            req.output,
            verify=req.verify,
            force=req.force,
            inputs=req.inputs,
            shapes=req.shapes,
            seed=req.seed,
            samples=req.samples,
            atol=req.atol,
            rtol=req.rtol,
            external_data=req.external_data,
            exclude=req.exclude,
            progress=progress,
        )
    except VerificationError as exc:
        return _not_written(req, exc, start=start, before=before, report=getattr(exc.result, "report", None))
    except BnfoldError as exc:
        raise _naming(exc, req.source) from exc
    return _written(
        req,
        report=result.report,
        verification=result.verification,
        before=before,
        after=stats_for_path(req.output),
        start=start,
    )


def _naming(exc: BnfoldError, path: str) -> BnfoldError:
    """The same error, its message prefixed with ``path`` unless it names a file already."""
    message = str(exc)
    if path in message or os.path.basename(path) in message or isinstance(exc, VerificationError):
        return exc
    return type(exc)(f"{path}: {message}")


def _fold_in_place(source: str, out: str, **options: Any) -> Any:
    """``fold_path`` for ``out == source`` (--in-place): fold into a staging folder beside
    ``source``, then move the files over it (external data first, the model last), so a failed
    or interrupted run leaves ``source`` as it was."""
    import shutil
    import tempfile

    from bnfold.pipeline import fold_path

    directory = os.path.dirname(os.path.abspath(source))
    staging = tempfile.mkdtemp(prefix=".bnfold-in-place-", dir=directory)
    try:
        name = os.path.basename(source)
        result = fold_path(source, os.path.join(staging, name), **options)
        for entry in sorted(os.listdir(staging), key=lambda n: n == name):
            os.replace(os.path.join(staging, entry), os.path.join(directory, entry))
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _written(req: _FoldRequest, *, report: Any, verification: Any, start: float, **fields: Any) -> Any:
    """The outcome of a fold that wrote ``req.output``: exit 1 when verification failed
    (``--force``) or, with ``--strict``, when a BN is left."""
    from bnfold.render import FoldOutcome

    error = None
    if verification is not None and not verification.passed:
        error = f"verification {verification.status.value}; written because of --force"
    elif req.strict and report is not None and report.skipped:
        n = len(report.skipped)
        error = f"--strict: {n} BatchNormalization node{'s' if n != 1 else ''} left"
    return FoldOutcome(
        source=req.source,
        output=req.output,
        written=True,
        exit_code=EXIT_FINDINGS if error else EXIT_OK,
        report=report,
        verification=verification,
        seconds=time.perf_counter() - start,
        error=error,
        strict=req.strict,
        **fields,
    )


def _not_written(req: _FoldRequest, exc: VerificationError, *, start: float, **fields: Any) -> Any:
    """The outcome of a fold whose verification did not pass: nothing written, exit 1."""
    from bnfold.render import FoldOutcome

    verification = exc.report if exc.report is not None else getattr(exc.result, "verification", None)
    not_run = verification is not None and verification.status is VerifyStatus.NOT_RUN
    hint = "--force writes it anyway" + (", --no-verify skips verification" if not_run else "")
    return FoldOutcome(
        source=req.source,
        output=req.output,
        written=False,
        exit_code=EXIT_FINDINGS,
        verification=verification,
        seconds=time.perf_counter() - start,
        error=f"{_one_line(str(exc))} ({hint})",
        strict=req.strict,
        **fields,
    )


def _fold_torch(req: _FoldRequest, *, progress: Callable[[str], None]) -> Any:
    from bnfold import torch_io
    from bnfold.check import stats_for_path

    torch_io.require_torch()
    start = time.perf_counter()
    if req.factory is not None:
        progress(f"building {req.factory}()")
        module, example = torch_io.load_factory(req.factory, req.weights), None
    else:
        progress(f"loading {req.source}")
        module, example = torch_io.load_torch_artifact(req.source)
    if req.shapes or req.inputs:
        example = _torch_example_inputs(req.shapes, req.inputs, seed=req.seed)
    if example is None:
        raise InputError(
            f"{req.source}: no example inputs to export with; pass --shape NAME=1x3x224x224 "
            "(one per input, in order) or --inputs data.npz"
        )
    from bnfold.torch_fold import export

    progress("folding and exporting to ONNX")
    try:
        result = export(
            module,
            example,
            req.output,
            verify=req.verify,
            force=req.force,
            seed=req.seed,
            samples=req.samples,
            atol=req.atol,
            rtol=req.rtol,
            external_data=req.external_data,
            input_names=list(req.shapes) if req.shapes and not req.inputs else None,
        )
    except VerificationError as exc:
        partial = exc.result
        return _not_written(
            req,
            exc,
            start=start,
            report=getattr(partial, "onnx_report", None),
            module_report=getattr(partial, "module_report", None),
            export=getattr(partial, "extra", None),
        )
    return _written(
        req,
        report=result.onnx_report,
        verification=result.verification,
        start=start,
        module_report=result.module_report,
        after=stats_for_path(req.output),
        export=dict(result.extra),
    )


def _torch_example_inputs(
    shapes: dict[str, tuple[int, ...]] | None, inputs: str | None, *, seed: int
) -> tuple[Any, ...]:
    """Positional example inputs: the arrays of --inputs in file order, or seeded float32 normal
    samples of each --shape in the order given."""
    import numpy as np
    import torch

    if inputs is not None:
        from bnfold.verify import load_inputs

        sample = load_inputs(inputs)[0]
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in sample.values())
    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in (shapes or {}).values())


# --------------------------------------------------------------------------------------------
# check


@app.command(
    "check",
    help=(
        "Report BatchNormalization that could still be folded, and BN left with reasons, in each MODEL "
        "(files, directories searched for *.onnx, glob patterns). Folds nothing, writes nothing. "
        "Exit 0 clean, 1 findings, 2 unreadable input."
    ),
)
def check_command(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL",
            help=".onnx files, folders (searched for *.onnx) or glob patterns.",
            show_default=False,
        ),
    ],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            metavar="OTHER.onnx",
            help="Also verify MODEL computes what OTHER computes (one MODEL only).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "-j", "--jobs", min=0, metavar="N", help="Check this many models in parallel (0: one per CPU)."
        ),
    ] = 1,
    junit_xml: Annotated[
        str | None,
        typer.Option(
            "--junit-xml",
            metavar="PATH",
            help="Write a JUnit XML report (one testcase per model).",
            show_default=False,
        ),
    ] = None,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    samples: SamplesOption = 3,
    seed: SeedOption = 0,
    shape: ShapeOption = None,
    inputs: InputsOption = None,
    json_stdout: JsonOption = False,
    json_file: JsonFileOption = None,
    strict: StrictOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    version: VersionOption = False,
) -> None:
    """Wire the options to :func:`bnfold.check.check_models`; render, write the reports, exit."""
    from bnfold.check import CheckOptions, CheckStatus, check_models, discover_models, write_text_atomic
    from bnfold.check import junit_xml as to_junit
    from bnfold.render import check_document, check_summary

    ui = _Ui(quiet=quiet, verbose=verbose, json_stdout=json_stdout)
    _check_writable(json_file, "--json-file")
    _check_writable(junit_xml, "--junit-xml")
    paths = discover_models(models)
    if against is not None:
        if len(paths) != 1:
            raise typer.BadParameter(
                f"--against compares one model; got {len(paths)}", param_hint="--against"
            )
        if not os.path.isfile(against):
            raise InputError(f"{against}: {'is a directory' if os.path.isdir(against) else 'no such file'}")
    options = CheckOptions(
        against=against,
        strict=strict,
        shapes=_shapes(shape),
        inputs=inputs,
        seed=seed,
        samples=samples,
        atol=atol,
        rtol=rtol,
    )
    workers = jobs or os.cpu_count() or 1
    show_bar = ui.show_progress and len(paths) > 1
    if show_bar:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("checking"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=ui.err,
            transient=True,
        )
        with progress:
            task = progress.add_task("", total=len(paths))

            def advance(m: Any) -> None:
                progress.update(task, advance=1, description=os.path.basename(m.path))

            result = check_models(paths, options=options, jobs=workers, on_result=advance)
    else:
        cm = ui.status() if len(paths) == 1 else nullcontext()
        with cm:
            ui.progress(f"checking {len(paths)} model{'s' if len(paths) != 1 else ''}")
            result = check_models(
                paths,
                options=options,
                jobs=workers,
                on_result=(lambda m: ui.progress(f"{m.path}: {m.status.value}")) if ui.verbose else None,
            )

    for m in result.models:
        if m.status is CheckStatus.ERROR:
            if debug and m.traceback:
                print(m.traceback, file=sys.stderr, end="")
            _error(m.error or f"{m.path}: cannot be checked")
        elif m.status is CheckStatus.FINDINGS and (ui.quiet or json_stdout):
            n = len(m.findings)
            listed = "; ".join(m.findings[:3]) + (f"; and {n - 3} more" if n > 3 else "")
            print(
                f"bnfold: {m.path}: {n} finding{'s' if n != 1 else ''}: {_one_line(listed)}", file=sys.stderr
            )
    if any(m.status is not CheckStatus.ERROR for m in result.models):
        ui.out.print(check_summary(result, verbose=ui.verbose))
    if json_stdout or json_file:
        _emit_json(check_document(result), to_stdout=json_stdout, path=json_file)
    if junit_xml:
        write_text_atomic(junit_xml, to_junit(result))
    raise typer.Exit(result.exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``bnfold`` script and ``python -m bnfold``."""
    app(args=None if argv is None else list(argv), prog_name="bnfold")


if __name__ == "__main__":  # pragma: no cover
    main()
