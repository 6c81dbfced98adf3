"""``bnfold MODEL [-o OUT]`` (also ``bnfold fold MODEL``): fold, verify against MODEL with
onnxruntime, write only what passed. The command function wires options to a
:class:`~bnfold.cli.request.FoldRequest`; :func:`fold_onnx_request` runs an ONNX request,
:func:`bnfold.cli.fold_torch.fold_torch` a PyTorch one."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer

from bnfold.cli.console import Ui, one_line, stdout_to_stderr
from bnfold.cli.names import check_shape_names, exclude_outputs
from bnfold.cli.npz_casts import npz_casts
from bnfold.cli.options import (
    AtolOption,
    DebugOption,
    InputsOption,
    JsonFileOption,
    JsonOption,
    QuietOption,
    RtolOption,
    SamplesOption,
    SeedOption,
    ShapeOption,
    StrictOption,
    VerboseOption,
    VersionOption,
    shapes_of,
)
from bnfold.cli.paths import (
    Target,
    check_writable,
    make_folders,
    refuse_report_over,
    refuse_writing_over_data,
    remove_empty_folders,
    resolve_paths,
    same_file,
)
from bnfold.cli.reports import emit_json
from bnfold.cli.request import FoldRequest, not_written, written
from bnfold.cli.results import FoldOutcome, Interrupted
from bnfold.cli.stats import model_stats, stats_for_path
from bnfold.errors import BnfoldError, VerificationError
from bnfold.onnx.io import load_model

HELP = (
    "Fold BatchNormalization in MODEL, verify the result against MODEL with onnxruntime and write "
    "it to OUT (default: <stem>.folded.onnx beside MODEL). bnfold MODEL is short for "
    "bnfold fold MODEL. MODEL may also be a torch.export .pt2 or TorchScript .pt file, "
    "or use --factory."
)

SHORT_HELP = "Fold BN in MODEL, verify, write OUT (the default command)."
EXAMPLES = """\
bnfold model.onnx                           # writes model.folded.onnx, verified
bnfold model.onnx deploy/                   # writes deploy/model.folded.onnx
bnfold model.onnx out.onnx --shape input:1,3,224,224
bnfold model.onnx -o out.onnx --json report.json --strict
bnfold model.onnx --in-place --exclude bn3  # keep one BN, overwrite MODEL
bnfold --factory mypkg.nets:make --weights w.pt --shape x=1x3x32x32 -o net.onnx
bnfold check models/ --junit-xml bnfold.xml # CI: BN left that could be folded"""


def fold_command(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL", help="model.onnx (or .pt2/.pt with torch installed).", show_default=False
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Argument(
            metavar="[OUT]",
            help="Where to write the folded model (the same as -o).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            metavar="OUT",
            help="Where to write the folded model; a folder (deploy/, created if missing) gets "
            "<stem>.folded.onnx. Default: <stem>.folded.onnx beside MODEL.",
            show_default=False,
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
    trust_pickles: Annotated[
        bool,
        typer.Option(
            "--trust-pickles",
            help="PyTorch: let a .pt2 archive unpickle its members (runs code from the file; only "
            "for files you trust). Without it, such archives are refused.",
        ),
    ] = False,
    output_names: Annotated[
        list[str] | None,
        typer.Option(
            "--output-name",
            metavar="NAME",
            help="PyTorch: name of an exported output, in order (default: the exporter's). Repeatable.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="NAME",
            help="Leave this BatchNormalization unfolded: its node name (as reports print it) or its "
            "output tensor (ONNX). Repeatable.",
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
    """Wire the options to a :class:`FoldRequest`, run it, render, exit. ``--debug`` is read by
    the app's error mapping and ``--version`` by its eager callback."""
    from bnfold.verify import VerifyOptions

    ui = Ui(quiet=quiet, verbose=verbose, json_stdout=json_stdout)
    target = resolve_paths(model, out, output, in_place=in_place, factory=factory)
    check_writable(json_file, "--json-file")
    refuse_report_over(json_file, "--json-file", [target.source, target.output])
    refuse_writing_over_data([target.source], [json_file, None if in_place else target.output])
    if weights and not factory:
        raise typer.BadParameter("--weights needs --factory", param_hint="--weights")
    request = FoldRequest(
        source=target.source,
        output=target.output,
        verify=verify,
        force=force,
        options=VerifyOptions(
            inputs=inputs, shapes=shapes_of(shape), seed=seed, samples=samples, atol=atol, rtol=rtol
        ),
        external_data=external_data,
        exclude=tuple(exclude or ()),
        output_names=tuple(output_names or ()),
        strict=strict,
        factory=factory,
        weights=weights,
        trust_pickles=trust_pickles,
    )
    if request.is_torch and exclude:
        raise typer.BadParameter("--exclude applies to ONNX models", param_hint="--exclude")
    if trust_pickles and not request.is_torch:
        raise typer.BadParameter("--trust-pickles applies to PyTorch inputs", param_hint="--trust-pickles")
    if output_names and not request.is_torch:
        raise typer.BadParameter("--output-name applies to PyTorch inputs", param_hint="--output-name")
    outcome = _run(request, target, ui)
    try:
        if ui.shows_summary:
            from bnfold.cli.render import fold_summary

            ui.print(fold_summary(outcome, verbose=ui.verbose))
        if json_stdout or json_file:
            emit_json(outcome.to_dict(), to_stdout=json_stdout, path=json_file)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {outcome.output} was written" if outcome.written else "") from None
    if outcome.exit_code:
        if outcome.error and (ui.quiet or json_stdout):
            print(f"bnfold: {one_line(outcome.error)}", file=sys.stderr, flush=True)
        raise typer.Exit(outcome.exit_code)


def _run(request: FoldRequest, target: Target, ui: Ui) -> FoldOutcome:
    """Run the request under the spinner, in the folders ``-o deploy/`` needs (removed again
    when nothing was written)."""
    outcome: FoldOutcome | None = None
    make_folders(target.new_folders)
    try:
        with ui.status(), stdout_to_stderr(ui.json_stdout):
            if request.is_torch:
                from bnfold.cli.fold_torch import fold_torch

                outcome = fold_torch(request, progress=ui.progress)
            else:
                outcome = fold_onnx_request(request, progress=ui.progress)
        return outcome
    finally:
        if outcome is None or not outcome.written:
            remove_empty_folders(target.new_folders)


def fold_onnx_request(req: FoldRequest, *, progress: Callable[[str], None]) -> FoldOutcome:
    """Run an ONNX fold request; a failed verification is an outcome, not an exception."""
    from bnfold import api

    start = time.perf_counter()
    progress(f"reading {req.source}")
    samples = (
        f" ({req.options.samples} samples)" if req.options.inputs is None else f" ({req.options.inputs})"
    )

    def step(name: str) -> None:
        progress(f"{name}{samples}" if name == "verifying" else name)

    model = load_model(req.source, lazy=True)
    before = model_stats(model, req.source)
    exclude = exclude_outputs(model, req.exclude, path=req.source)
    check_shape_names(model, req.options.shapes or {}, path=req.source)
    casts = npz_casts(model, req.options.inputs)
    del model
    in_place = same_file(req.source, req.output)
    try:
        result = api.fold_path(
            req.source,
            None if in_place else req.output,
            in_place=in_place,
            verify=req.verify,
            force=req.force,
            options=req.options,
            external_data=req.external_data,
            exclude=exclude,
            progress=step,
        )
    except VerificationError as exc:
        return not_written(
            req,
            exc,
            start=start,
            before=before,
            report=getattr(exc.result, "report", None),
            input_casts=casts,
        )
    except BnfoldError as exc:
        raise _naming(exc, req.source) from exc
    return written(
        req,
        report=result.report,
        verification=result.verification,
        before=before,
        after=stats_for_path(req.output),
        start=start,
        input_casts=casts,
    )


def _naming(exc: BnfoldError, path: str) -> BnfoldError:
    """The same error, its message prefixed with ``path`` unless it names a file already."""
    message = exc.cli_message or str(exc)
    if path in message or os.path.basename(path) in message or isinstance(exc, VerificationError):
        return exc
    return type(exc)(f"{path}: {message}")
