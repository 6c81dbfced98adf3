"""``bnfold check``: inspect deployed models, fold nothing, write nothing.

Per model, :func:`check_model` answers two questions a CI job cares about:

* Which BatchNormalization nodes could still be folded?  (``analyze_onnx``; in its
  :class:`~bnfold.report.FoldReport` the ``folded`` entries are the *foldable* ones.)
* With ``against``: is the model equivalent to another one (e.g. the deployed model against its
  source)?  (:func:`bnfold.verify.verify`, reference = ``against``, candidate = the model.)

A model is ``clean`` when neither finds anything, ``findings`` otherwise (a foldable BN left, a
verification that failed or could not run, or with ``strict`` any BN left at all) and ``error``
when it could not be read. :func:`check_models` runs many models, optionally in worker
processes. :func:`check_command` wires the command's options to them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Annotated

import typer

from bnfold.cli.console import Ui, one_line, print_error, stdout_to_stderr
from bnfold.cli.names import check_shape_names
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
from bnfold.cli.paths import check_writable, refuse_report_over, refuse_writing_over_data
from bnfold.cli.reports import emit_json
from bnfold.cli.results import CheckOptions, CheckResult, CheckStatus, ModelCheck
from bnfold.cli.stats import model_stats
from bnfold.errors import BnfoldError, InputError
from bnfold.onnx.io import write_text_atomic
from bnfold.report import VerifyReport, VerifyStatus

logger = logging.getLogger(__name__)

DEFAULT_OPTIONS = CheckOptions()

HELP = (
    "Report BatchNormalization that could still be folded, and BN left with reasons, in each MODEL "
    "(files, directories searched for *.onnx, glob patterns). Folds nothing, writes nothing. "
    "Exit 0 clean, 1 findings, 2 unreadable input."
)

SHORT_HELP = "Report BN that could still be folded; writes nothing."
EXAMPLES = """\
bnfold check model.onnx
bnfold check models/ 'exports/**/*.onnx' -j 0 --junit-xml bnfold.xml
bnfold check deployed.onnx --against source.onnx   # also verify they compute the same
bnfold check models/ --strict --json               # any BN left is a finding"""


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
    """Wire the options to :func:`check_models`; render, write the reports, exit."""
    ui = Ui(quiet=quiet, verbose=verbose, json_stdout=json_stdout)
    check_writable(json_file, "--json-file")
    check_writable(junit_xml, "--junit-xml")
    paths, unfound = discover(models)
    protected = [*paths, *([against] if against else [])]
    refuse_report_over(json_file, "--json-file", protected)
    refuse_report_over(junit_xml, "--junit-xml", protected)
    refuse_writing_over_data(protected, [json_file, junit_xml])
    if against is not None:
        if len(paths) + len(unfound) != 1:
            raise typer.BadParameter(
                f"--against compares one model; got {len(paths) + len(unfound)}", param_hint="--against"
            )
        if not os.path.isfile(against):
            raise InputError(f"{against}: {'is a directory' if os.path.isdir(against) else 'no such file'}")
        if shape or inputs:
            from bnfold.onnx.io import load_model

            reference = load_model(against, lazy=True)
            check_shape_names(reference, shapes_of(shape) or {}, path=against)
            npz_casts(reference, inputs)  # refuses a cast that changes values
    from bnfold.verify import VerifyOptions

    options = CheckOptions(
        against=against,
        strict=strict,
        verify=VerifyOptions(
            inputs=inputs, shapes=shapes_of(shape), seed=seed, samples=samples, atol=atol, rtol=rtol
        ),
    )
    with stdout_to_stderr(json_stdout):
        result = (
            _run_with_progress(paths, options, jobs=jobs or os.cpu_count() or 1, ui=ui)
            if paths
            else CheckResult(models=(), options=options)
        )
    result = dataclasses.replace(result, models=(*result.models, *unfound))
    _report_on_stderr(result, ui=ui, debug=debug)
    if ui.shows_summary and any(m.status is not CheckStatus.ERROR for m in result.models):
        from bnfold.cli.render import check_summary

        ui.print(check_summary(result, verbose=ui.verbose))
    if json_stdout or json_file:
        emit_json(result.document(), to_stdout=json_stdout, path=json_file)
    if junit_xml:
        from bnfold.cli import junit  # xml.etree: only for --junit-xml

        write_text_atomic(junit_xml, junit.junit_xml(result))
    raise typer.Exit(result.exit_code)


def _run_with_progress(paths: list[str], options: CheckOptions, *, jobs: int, ui: Ui) -> CheckResult:
    """:func:`check_models` under a bar (many models, terminal), a spinner (one) or -v lines."""
    if ui.show_progress and len(paths) > 1:
        with ui.counter(len(paths)) as advance:
            return check_models(
                paths, options=options, jobs=jobs, on_result=lambda m: advance(os.path.basename(m.path))
            )
    with ui.status() if len(paths) == 1 else nullcontext():
        ui.progress(f"checking {len(paths)} model{'s' if len(paths) != 1 else ''}")
        return check_models(
            paths,
            options=options,
            jobs=jobs,
            on_result=(lambda m: ui.progress(f"{m.path}: {m.status.value}")) if ui.verbose else None,
        )


def _report_on_stderr(result: CheckResult, *, ui: Ui, debug: bool) -> None:
    """One line per unreadable model; with stdout taken (-q, --json) one line per model with findings."""
    for m in result.models:
        if m.status is CheckStatus.ERROR:
            if debug and m.traceback:
                print(m.traceback, file=sys.stderr, end="")
            print_error(m.error or f"{m.path}: cannot be checked")
        elif m.status is CheckStatus.FINDINGS and (ui.quiet or ui.json_stdout):
            n = len(m.findings)
            listed = "; ".join(m.findings[:3]) + (f"; and {n - 3} more" if n > 3 else "")
            print(
                f"bnfold: {one_line(m.path)}: {n} finding{'s' if n != 1 else ''}: {one_line(listed)}",
                file=sys.stderr,
            )


# --------------------------------------------------------------------------------------------
# Finding the models


def discover_models(specs: Sequence[str]) -> list[str]:
    """Expand files, directories (every ``*.onnx`` below, recursively) and glob patterns.

    The order is the order given, each directory or pattern sorted; a file named twice is
    checked once. Raises :class:`InputError` for a path that does not exist, a directory
    without ``.onnx`` files and a pattern that matches nothing.
    """
    found, problems = discover(specs)
    if problems:
        raise InputError(problems[0].error or "")
    return found


def discover(specs: Sequence[str]) -> tuple[list[str], list[ModelCheck]]:
    """:func:`discover_models` that goes on past a spec that finds nothing: the models found,
    and an ``error`` entry per such spec (so one missing file does not stop the reports)."""
    found: list[str] = []
    problems: list[ModelCheck] = []
    seen: set[str] = set()
    for spec in specs:
        try:
            files = _expand(spec)
        except InputError as exc:
            problems.append(
                ModelCheck(
                    path=spec, status=CheckStatus.ERROR, error=one_line(str(exc)), error_type="input-error"
                )
            )
            continue
        for f in files:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found, problems


def _expand(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = _onnx_files_under(spec)
        if not files:
            raise InputError(f"{spec}: no .onnx files in this directory")
        return files
    if os.path.lexists(spec):
        return [spec]
    if glob.has_magic(spec):
        files = []
        for m in sorted(glob.glob(spec, recursive=True)):
            files.extend(_onnx_files_under(m) if os.path.isdir(m) else [m])
        if not files:
            raise InputError(f"{spec}: no files match this pattern")
        return files
    raise InputError(f"{spec}: no such file or directory")


def _onnx_files_under(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".onnx"))
    return out


# --------------------------------------------------------------------------------------------
# Checking


def check_model(path: str, *, options: CheckOptions = DEFAULT_OPTIONS) -> ModelCheck:
    """Check one model. Never raises for a bad model: the problem is in ``error``."""
    start = time.perf_counter()
    try:
        return _check_model(path, options, start)
    except BnfoldError as exc:
        message = one_line(exc.cli_message or str(exc))
        return ModelCheck(
            path=path,
            status=CheckStatus.ERROR,
            error=message if os.path.basename(path) in message else f"{path}: {message}",
            error_type="input-error",
            traceback=traceback.format_exc(),
            seconds=time.perf_counter() - start,
        )
    except Exception as exc:  # a bug in bnfold or a library: report it, check the other models
        logger.debug("checking %s failed", path, exc_info=True)
        return ModelCheck(
            path=path,
            status=CheckStatus.ERROR,
            error=one_line(f"{path}: internal error: {type(exc).__name__}: {exc}"),
            error_type="internal-error",
            traceback=traceback.format_exc(),
            seconds=time.perf_counter() - start,
        )


def _check_model(path: str, options: CheckOptions, start: float) -> ModelCheck:
    from bnfold.api import analyze_onnx
    from bnfold.onnx.io import load_model

    model = load_model(path, lazy=True)
    stats = model_stats(model, path)
    report = analyze_onnx(model, base_dir=os.path.dirname(os.path.abspath(path)))
    findings: list[str] = []
    for f in report.folded:
        where = f" in {f.graph}" if f.graph else ""
        findings.append(f"{f.bn}{where} can be folded into {f.producer_op} {f.producer}")
    if options.strict:
        for s in report.skipped:
            findings.append(f"{s.bn} is left ({s.reason.value}): {s.detail}")

    verification: VerifyReport | None = None
    if options.against is not None:
        from bnfold.verify import verify

        verification = verify(options.against, path, options=options.verify)
        if verification.status is VerifyStatus.FAILED:
            findings.append(f"not equivalent to {options.against}: {_verify_failure(verification)}")
        elif verification.status is VerifyStatus.NOT_RUN:
            findings.append(
                f"equivalence with {options.against} not verified: {verification.message or 'not run'}"
            )

    return ModelCheck(
        path=path,
        status=CheckStatus.FINDINGS if findings else CheckStatus.CLEAN,
        report=report,
        verification=verification,
        stats=stats,
        findings=tuple(findings),
        seconds=time.perf_counter() - start,
    )


def _verify_failure(v: VerifyReport) -> str:
    bad = [d for d in v.outputs if not d.passed]
    if bad:
        worst = max(bad, key=lambda d: d.max_rel)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return (
            f"output {worst.name} max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} "
            f"(atol {worst.atol:.3g}, rtol {worst.rtol:.3g}){more}"
        )
    return v.message or "verification failed"


def check_models(
    paths: Sequence[str],
    *,
    options: CheckOptions = DEFAULT_OPTIONS,
    jobs: int = 1,
    on_result: Callable[[ModelCheck], None] | None = None,
) -> CheckResult:
    """Check every path; ``jobs > 1`` uses that many worker processes.

    ``on_result`` is called in the calling process as each model finishes (for progress bars).
    Results keep the order of ``paths``.
    """
    start = time.perf_counter()
    if options.against is not None and len(paths) != 1:
        raise InputError(f"--against compares one model with {options.against}; got {len(paths)} models")
    results: dict[int, ModelCheck] = {}
    if jobs <= 1 or len(paths) <= 1:
        for i, p in enumerate(paths):
            results[i] = check_model(p, options=options)
            if on_result:
                on_result(results[i])
    else:
        # spawn: a fork would copy the parent's threads (rich's refresh thread, onnxruntime pools)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(jobs, len(paths)), mp_context=context
        ) as pool:
            futures = {pool.submit(check_model, p, options=options): i for i, p in enumerate(paths)}
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result:
                    on_result(results[i])
    return CheckResult(
        models=tuple(results[i] for i in range(len(paths))),
        options=options,
        seconds=time.perf_counter() - start,
    )
