"""The library side of ``bnfold check``: inspect deployed models, fold nothing, write nothing.

Per model, :func:`check_model` answers two questions a CI job cares about:

* Which BatchNormalization nodes could still be folded?  (:func:`bnfold.onnx_fold.analyze_onnx`;
  in its :class:`~bnfold.report.FoldReport` the ``folded`` entries are the *foldable* ones.)
* With ``against``: is the model equivalent to another one (e.g. the deployed model against its
  source)?  (:func:`bnfold.verify.verify`, reference = ``against``, candidate = the model.)

A model is ``clean`` when neither finds anything, ``findings`` otherwise (a foldable BN left, a
verification that failed or could not run, or with ``strict`` any BN left at all) and ``error``
when it could not be read. :func:`check_models` runs many models, optionally in worker
processes; :func:`junit_xml` renders a result for CI systems. Nothing here prints.
"""

from __future__ import annotations

import concurrent.futures
import enum
import glob
import logging
import multiprocessing
import os
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from bnfold.errors import BnfoldError, InputError
from bnfold.report import FoldReport, VerifyReport, VerifyStatus

logger = logging.getLogger(__name__)


class CheckStatus(str, enum.Enum):
    """Outcome of checking one model. The value is the code used in JSON and JUnit XML."""

    CLEAN = "clean"
    FINDINGS = "findings"
    ERROR = "error"


@dataclass(frozen=True)
class CheckOptions:
    """What to check. Shared by every model of a run, so it must pickle (worker processes)."""

    against: str | None = None
    """Reference model to verify equivalence with; only meaningful for a single model."""
    strict: bool = False
    """Count every BatchNormalization left (for any reason) as a finding."""
    shapes: Mapping[str, tuple[int, ...]] | None = None
    inputs: str | None = None
    """A ``.npz`` file or a directory of TensorProto ``.pb`` files, for ``against``."""
    seed: int = 0
    samples: int = 3
    atol: float | None = None
    rtol: float | None = None


@dataclass(frozen=True)
class ModelStats:
    """Size of a model on disk and in nodes."""

    nodes: int
    """Nodes in the main graph, its subgraphs (If/Loop/Scan bodies) and model-local functions."""
    batchnorm: int
    """BatchNormalization nodes among them."""
    bytes: int
    """The ``.onnx`` file plus every external-data file it references."""
    external_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCheck:
    """The result of checking one model."""

    path: str
    status: CheckStatus
    report: FoldReport | None = None
    """``folded`` = BN that could be folded, ``skipped`` = BN that must stay, with reasons."""
    verification: VerifyReport | None = None
    stats: ModelStats | None = None
    findings: tuple[str, ...] = ()
    """One sentence per finding, for people (JUnit failure text, the summary table)."""
    error: str | None = None
    """Why the model could not be checked (one line, naming the file)."""
    error_type: str | None = None
    """``input-error`` (bad file, exit 2) or ``internal-error`` (a bug in bnfold)."""
    traceback: str | None = field(default=None, repr=False)
    """Formatted traceback of ``error``, for ``--debug``; not part of the JSON."""
    seconds: float = 0.0

    @property
    def bn_foldable(self) -> int:
        return len(self.report.folded) if self.report else 0

    @property
    def bn_left(self) -> int:
        return len(self.report.skipped) if self.report else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status.value,
            "bn_total": self.report.bn_total if self.report else None,
            "bn_foldable": self.bn_foldable if self.report else None,
            "bn_left": self.bn_left if self.report else None,
            "findings": list(self.findings),
            "report": self.report.to_dict() if self.report else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "nodes": self.stats.nodes if self.stats else None,
            "bytes": self.stats.bytes if self.stats else None,
            "error": self.error,
            "error_type": self.error_type,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class CheckResult:
    """The result of checking many models, in the order they were given."""

    models: tuple[ModelCheck, ...]
    options: CheckOptions = field(default_factory=CheckOptions)
    seconds: float = 0.0

    def count(self, status: CheckStatus) -> int:
        return sum(1 for m in self.models if m.status is status)

    @property
    def exit_code(self) -> int:
        """0 when every model is clean, 1 when any has findings, 2 when any could not be read."""
        if any(m.status is CheckStatus.ERROR for m in self.models):
            return 2
        if any(m.status is CheckStatus.FINDINGS for m in self.models):
            return 1
        return 0

    def summary(self) -> dict[str, int]:
        return {
            "models": len(self.models),
            "clean": self.count(CheckStatus.CLEAN),
            "findings": self.count(CheckStatus.FINDINGS),
            "errors": self.count(CheckStatus.ERROR),
            "bn_total": sum(m.report.bn_total for m in self.models if m.report),
            "bn_foldable": sum(m.bn_foldable for m in self.models),
            "bn_left": sum(m.bn_left for m in self.models),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "against": self.options.against,
            "strict": self.options.strict,
            "exit_code": self.exit_code,
            "seconds": self.seconds,
            "summary": self.summary(),
            "models": [m.to_dict() for m in self.models],
        }


# --------------------------------------------------------------------------------------------
# Finding the models


def discover_models(specs: Sequence[str]) -> list[str]:
    """Expand files, directories (every ``*.onnx`` below, recursively) and glob patterns.

    The order is the order given, each directory or pattern sorted; a file named twice is
    checked once. Raises :class:`InputError` for a path that does not exist, a directory
    without ``.onnx`` files and a pattern that matches nothing.
    """
    found: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            found.append(path)

    for spec in specs:
        if os.path.isdir(spec):
            files = _onnx_files_under(spec)
            if not files:
                raise InputError(f"{spec}: no .onnx files in this directory")
            for f in files:
                add(f)
        elif os.path.lexists(spec):
            add(spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            files = []
            for m in matches:
                files.extend(_onnx_files_under(m) if os.path.isdir(m) else [m])
            if not files:
                raise InputError(f"{spec}: no files match this pattern")
            for f in files:
                add(f)
        else:
            raise InputError(f"{spec}: no such file or directory")
    return found


def _onnx_files_under(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".onnx"))
    return out


# --------------------------------------------------------------------------------------------
# Model statistics


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in _graphs(model.graph):
        yield from g.node
    for fn in model.functions:
        yield from fn.node


def model_stats(model: onnx.ModelProto, path: str | os.PathLike[str]) -> ModelStats:
    """Node and BatchNormalization counts of ``model``, and the bytes ``path`` takes on disk.

    ``model`` is ``path`` loaded lazily or without its external data, so the external-data
    references are still there to be measured; lazy stubs point into ``path`` itself and are
    not counted twice.
    """
    from bnfold.io import is_lazy

    nodes = list(_all_nodes(model))
    base = os.path.dirname(os.fspath(path))
    external: list[str] = []
    for g in _graphs(model.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and not is_lazy(t):
                location = next((e.value for e in t.external_data if e.key == "location"), None)
                if location and location not in external:
                    external.append(location)
    size = os.path.getsize(path)
    for location in external:
        full = os.path.join(base, location)
        if os.path.isfile(full):
            size += os.path.getsize(full)
    return ModelStats(
        nodes=len(nodes),
        batchnorm=sum(1 for n in nodes if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")),
        bytes=size,
        external_files=tuple(external),
    )


def stats_for_path(path: str | os.PathLike[str]) -> ModelStats:
    """:func:`model_stats` of the file at ``path`` (a lazy load: no tensor data is read)."""
    from bnfold.io import load_model

    return model_stats(load_model(path, lazy=True), path)


# --------------------------------------------------------------------------------------------
# Checking


def check_model(path: str, *, options: CheckOptions = CheckOptions()) -> ModelCheck:
    """Check one model. Never raises for a bad model: the problem is in ``error``."""
    start = time.perf_counter()
    try:
        return _check_model(path, options, start)
    except BnfoldError as exc:
        message = _one_line(str(exc))
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
            error=_one_line(f"{path}: internal error: {type(exc).__name__}: {exc}"),
            error_type="internal-error",
            traceback=traceback.format_exc(),
            seconds=time.perf_counter() - start,
        )


def _check_model(path: str, options: CheckOptions, start: float) -> ModelCheck:
    from bnfold.io import load_model
    from bnfold.onnx_fold import analyze_onnx

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

        verification = verify(
            options.against,
            path,
            inputs=options.inputs,
            shapes=options.shapes,
            seed=options.seed,
            samples=options.samples,
            atol=options.atol,
            rtol=options.rtol,
        )
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check_models(
    paths: Sequence[str],
    *,
    options: CheckOptions = CheckOptions(),
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


# --------------------------------------------------------------------------------------------
# Reports for CI systems


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: one ``testcase`` per model, a ``failure`` listing its findings, an ``error``
    when it could not be read. BN left for a reason go to ``system-out``."""
    failures = result.count(CheckStatus.FINDINGS)
    errors = result.count(CheckStatus.ERROR)
    attrs = {
        "name": "bnfold check",
        "tests": str(len(result.models)),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
        "time": f"{result.seconds:.3f}",
    }
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(suites, "testsuite", attrs)
    for m in result.models:
        case = ET.SubElement(
            suite, "testcase", {"classname": "bnfold.check", "name": m.path, "time": f"{m.seconds:.3f}"}
        )
        if m.status is CheckStatus.FINDINGS:
            n = len(m.findings)
            message = f"{n} finding{'s' if n != 1 else ''}: {m.findings[0]}"
            fail = ET.SubElement(case, "failure", {"message": message, "type": _failure_type(m)})
            fail.text = "\n".join(m.findings)
        elif m.status is CheckStatus.ERROR:
            err = ET.SubElement(case, "error", {"message": m.error or "", "type": m.error_type or "error"})
            err.text = m.error or ""
        if m.report and m.report.skipped:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(f"{s.bn} left ({s.reason.value}): {s.detail}" for s in m.report.skipped)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _failure_type(m: ModelCheck) -> str:
    kinds = []
    if m.bn_foldable:
        kinds.append("foldable-batchnorm")
    if m.verification is not None and not m.verification.passed:
        kinds.append(f"verification-{m.verification.status.value}")
    if not kinds:
        kinds.append("batchnorm-left")
    return ",".join(kinds)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename:
    an interrupted run leaves the old file or the complete new one, never a partial one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
