"""How the CLI shows results to people: rich renderables built from the outcomes of
:mod:`bnfold.cli.results` and the reports of :mod:`bnfold.report`. The caller picks the console
(stdout, stderr) and decides when to print; JSON documents are the results' own ``to_dict``.

Every name that comes from a model or a path goes through :func:`~bnfold.cli.console.printable`
(no terminal control sequences) and into :class:`~rich.text.Text` (no markup: ``model[v2].onnx``
prints as written). Tables are plain aligned lines (:mod:`bnfold.cli.tables`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Group, RenderableType
from rich.filesize import decimal as human_bytes
from rich.text import Text

from bnfold.cli.console import printable as esc
from bnfold.cli.results import CheckResult, CheckStatus, FoldOutcome, ModelCheck
from bnfold.cli.tables import Cell, columns
from bnfold.report import Folded, FoldReport, Skipped, TensorDiff, VerifyReport, VerifyStatus

_BRIEF_LIMIT = 10
"""Items listed per section without --verbose."""

_STATUS_STYLE = {"passed": "green", "failed": "bold red", "not-run": "bold yellow"}


# --------------------------------------------------------------------------------------------
# fold


def fold_summary(outcome: FoldOutcome, *, verbose: bool = False) -> RenderableType:
    """The at-a-glance summary of a fold: BN folded/left (with reasons), verification per
    output, intermediates, nodes, size and time."""
    parts: list[RenderableType] = [
        Text.assemble(("bnfold ", "bold"), esc(outcome.source), " → ", esc(outcome.output))
    ]
    if outcome.module_report is not None and outcome.module_report.bn_total:
        parts.append(_bn_section("PyTorch modules", outcome.module_report, verbose=verbose))
    if outcome.report is not None:
        parts.append(_bn_section("BatchNormalization", outcome.report, verbose=verbose))
    parts.append(verification_section(outcome.verification, verbose=verbose))
    if outcome.input_casts:
        casts = ", ".join(f"{c.input} {c.source} → {c.target}" for c in outcome.input_casts)
        parts.append(
            Text(f"  inputs cast to the model's types: {esc(casts)} (every value exact)", style="dim")
        )
    torch_check = (outcome.export or {}).get("torch_vs_onnx")
    if isinstance(torch_check, VerifyReport):
        parts.append(_torch_line(torch_check))
    parts.append(_stats_line(outcome))
    if outcome.written:
        parts.append(Text.assemble(("wrote ", "green"), esc(outcome.output)))
    else:
        parts.append(
            Text.assemble(("nothing written", "bold red"), f": {esc(outcome.error)}" if outcome.error else "")
        )
    if outcome.written and outcome.error:
        parts.append(Text(esc(outcome.error), style="yellow"))
    return Group(*parts)


def _bn_section(title: str, report: FoldReport, *, verbose: bool) -> RenderableType:
    left = len(report.skipped)
    head = Text.assemble(
        (f"{title}: ", "bold"),
        (f"{len(report.folded)} folded", "green" if report.folded else ""),
        ", ",
        (f"{left} left", "yellow" if left else ""),
    )
    lines = bn_table(report.folded if verbose else (), "folded", report.skipped, verbose=verbose)
    return Group(head, lines) if lines.renderables else head


def absorber(f: Folded) -> str:
    """The layer that absorbs a BN, for people: ``Conv conv1``; an unnamed one by the tensor it
    writes once folded (``unnamed Conv (output bn1_out)``), since ``Conv Conv`` names nothing."""
    if f.producer and f.producer != f.producer_op:
        return f"{f.producer_op} {f.producer}"
    return f"unnamed {f.producer_op} (output {f.output})" if f.output else f"unnamed {f.producer_op}"


def bn_table(
    folded: Sequence[Folded], folded_label: str, skipped: Sequence[Skipped], *, verbose: bool
) -> Group:
    """One line per BN: ``folded``/``foldable`` with the layer that absorbs it, ``left`` with the
    reason code and sentence. Without ``verbose`` each kind stops after a few lines."""
    width = max(len(folded_label), len("left")) + 2
    limit = None if verbose else _BRIEF_LIMIT
    done = [(f.bn, f.graph, Text(f" → {esc(absorber(f))}", style="green")) for f in folded]
    left = [
        (s.bn, s.graph, Text.assemble("  ", (s.reason.value, "yellow"), f": {esc(s.detail)}"))
        for s in skipped
    ]
    return Group(
        *_bn_lines(folded_label, done, width=width, limit=limit, more="more"),
        *_bn_lines("left", left, width=width, limit=limit, more="more left"),
    )


def _bn_lines(
    label: str, rows: Sequence[tuple[str, str, Text]], *, width: int, limit: int | None, more: str
) -> list[Text]:
    """``  LABEL  bn [graph]TAIL`` per row, up to ``limit`` rows, then ``… N MORE``."""
    lines = [
        Text.assemble((f"  {label:<{width}}", "dim"), esc(f"{bn} [{graph}]" if graph else bn), tail)
        for bn, graph, tail in rows[:limit]
    ]
    if limit is not None and len(rows) > limit:
        lines.append(Text(f"  {'':<{width}}… {len(rows) - limit} {more} (-v lists all)", style="dim"))
    return lines


def verification_section(
    v: VerifyReport | None, *, verbose: bool = False, title: str = "Verification"
) -> RenderableType:
    if v is None:
        return Text.assemble((f"{title}: ", "bold"), ("skipped (--no-verify)", "yellow"))
    if v.compared_on == "unchanged":  # nothing was folded: the verifier had nothing to run
        return Text.assemble(
            (f"{title}: ", "bold"), (v.status.value, _STATUS_STYLE[v.status.value]), f" — {esc(v.message)}"
        )
    style = _STATUS_STYLE[v.status.value]
    how = f"{v.samples} sample{'s' if v.samples != 1 else ''}"
    if v.seed is not None and v.input_source == "generated":
        how += f", seed {v.seed}"
    if v.input_source != "generated":
        how += f", inputs {esc(v.input_source)}"
    engine = f"onnxruntime {v.onnxruntime_version}" if v.onnxruntime_version else "onnxruntime"
    status = v.status.value
    if v.passed and v.reverted:
        status = f"passed after reverting {len(v.reverted)} fold{'s' if len(v.reverted) != 1 else ''}"
        style = "yellow"
    parts: list[RenderableType] = [
        Text.assemble((f"{title}: ", "bold"), (status, style), f" — {how}, {engine} CPU at ORT_DISABLE_ALL")
    ]
    if v.message and v.status is not VerifyStatus.PASSED:
        parts.append(Text(f"  {esc(v.message)}", style=style))
    for s in v.reverted[: None if verbose else _BRIEF_LIMIT]:
        parts.append(Text(f"  reverted {esc(s.bn)}: {esc(s.detail)}", style="yellow"))
    if v.bound_dims:
        bound = ", ".join(f"{esc(k)}={n}" for k, n in v.bound_dims.items())
        parts.append(Text(f"  symbolic dimensions bound to: {bound} (--shape to choose)", style="dim"))
    if v.outputs:
        parts.append(_diff_table(v.outputs))
    if v.intermediates:
        parts.append(_diffs_line("intermediates", _compared(v), v.intermediates))
        if verbose:
            parts.append(_diff_table(v.intermediates))
    elif v.status is not VerifyStatus.NOT_RUN:
        parts.append(Text("  intermediates: none compared (no shared tensor names)", style="dim"))
    if v.weights:
        parts.append(_diffs_line("folded weights", "recomputed from the reference", v.weights))
        if verbose:
            parts.append(_diff_table(v.weights))
    if v.first_divergent:
        parts.append(Text(f"  first divergent: {esc(', '.join(v.first_divergent))}", style="red"))
    if v.suspect_folds:
        parts.append(Text(f"  suspect folds: {esc(', '.join(v.suspect_folds))}", style="red"))
    return Group(*parts)


def _compared(v: VerifyReport) -> str:
    """``compared`` or ``compared (3 by name, 2 as fold aliases)`` when not all by name."""
    kinds = {k: n for k, n in v.matched.items() if n}
    if set(kinds) <= {"name"}:
        return "compared"
    words = {"name": "by name", "fold-alias": "as fold aliases", "structure": "by structure"}
    return f"compared ({', '.join(f'{n} {words.get(k, k)}' for k, n in kinds.items())})"


def _diff_table(diffs: Iterable[TensorDiff]) -> Group:
    rows: list[list[Cell]] = []
    for d in diffs:
        result = (
            Text("ok", style="green")
            if d.passed
            else Text(f"FAIL {d.mismatched}/{d.total}", style="bold red")
        )
        if d.nan_inf_mismatch:
            result.append(" nan/inf", style="bold red")
        tolerance = f"rtol {d.rtol:.0e}" if d.atol == 0 else f"atol {d.atol:.0e} + rtol {d.rtol:.0e}"
        if d.noise:
            tolerance += f" + noise {d.noise:.0e}"
        rows.append(
            [
                d.name,
                "x".join(str(s) for s in d.shape) or "scalar",
                f"{d.max_abs:.2e}",
                f"{d.max_rel:.2e}",
                tolerance,
                result,
            ]
        )
    return columns(["tensor", "shape", "max abs", "max rel", "tolerance", "result"], rows, right=(2, 3))


def _diffs_line(what: str, how: str, diffs: Sequence[TensorDiff]) -> Text:
    bad = [d for d in diffs if not d.passed]
    worst = max(diffs, key=lambda d: d.max_rel)
    text = Text(f"  {what}: {len(diffs)} {how}, ")
    if bad:
        text.append(f"{len(bad)} outside tolerance", style="bold red")
    else:
        text.append("all within tolerance", style="green")
    text.append(f"; worst {esc(worst.name)} (max abs {worst.max_abs:.2e}, max rel {worst.max_rel:.2e})")
    return text


def _torch_line(check: VerifyReport) -> Text:
    """``torch vs ONNX: passed — on the example inputs; worst output y: max abs …, max rel …``."""
    style = _STATUS_STYLE[check.status.value]
    text = Text.assemble(("torch vs ONNX: ", "bold"), (check.status.value, style))
    if check.outputs:
        worst = max(check.outputs, key=lambda d: d.max_rel)
        text.append(
            f" — on the example inputs; worst output {esc(worst.name)}: max abs {worst.max_abs:.2e}, "
            f"max rel {worst.max_rel:.2e}"
        )
    if check.message:
        text.append(f"; {esc(check.message)}", style=style)
    return text


def _stats_line(outcome: FoldOutcome) -> Text:
    text = Text()
    b, a = outcome.before, outcome.after
    if b is not None or a is not None:
        nodes = f"{b.nodes} → {a.nodes}" if b and a else f"{(b or a).nodes}"  # type: ignore[union-attr]
        size = (
            f"{human_bytes(b.bytes)} → {human_bytes(a.bytes)}" if b and a else human_bytes((b or a).bytes)  # type: ignore[union-attr]
        )
        text.append("nodes ", "bold")
        text.append(nodes)
        text.append("   size ", "bold")
        text.append(size)
        text.append("   ")
    text.append("time ", "bold")
    text.append(f"{outcome.seconds:.2f} s")
    return text


# --------------------------------------------------------------------------------------------
# check


def check_summary(result: CheckResult, *, verbose: bool = False) -> RenderableType:
    """The per-model table, then each model's foldable / left BN and verification, then a total."""
    parts: list[RenderableType] = []
    readable = [m for m in result.models if m.status is not CheckStatus.ERROR]
    against = result.options.against is not None
    if readable:
        header = ["model", "BN", "foldable", "left", *(["equivalent"] if against else []), "status"]
        rows: list[list[Cell]] = []
        for m in readable:
            row: list[Cell] = [
                m.path,
                str(m.report.bn_total) if m.report else "-",
                Text(str(m.bn_foldable), style="bold red" if m.bn_foldable else ""),
                str(m.bn_left),
            ]
            if against:
                row.append(_verify_cell(m))
            row.append(_status_cell(m))
            rows.append(row)
        parts.append(columns(header, rows, right=(1, 2, 3)))
        for m in readable:
            details = _model_details(m, verbose=verbose)
            if details is not None:
                parts.append(details)
    parts.append(_check_total(result))
    return Group(*parts)


def _verify_cell(m: ModelCheck) -> Text:
    if m.verification is None:
        return Text("-")
    style = _STATUS_STYLE[m.verification.status.value]
    return Text(m.verification.status.value, style=style)


def _status_cell(m: ModelCheck) -> Text:
    if m.status is CheckStatus.CLEAN:
        return Text("clean", style="green")
    if m.status is CheckStatus.FINDINGS:
        return Text("findings", style="bold red")
    return Text("error", style="bold red")


def _model_details(m: ModelCheck, *, verbose: bool) -> RenderableType | None:
    rows: list[RenderableType] = []
    if m.report and (m.report.folded or m.report.skipped):
        rows.append(bn_table(m.report.folded, "foldable", m.report.skipped, verbose=verbose))
    if m.verification is not None and (verbose or not m.verification.passed):
        rows.append(verification_section(m.verification, verbose=verbose, title="  equivalence"))
    if not rows:
        return None
    return Group(Text(esc(m.path), style="bold"), *rows)


def _check_total(result: CheckResult) -> Text:
    s = result.summary()
    text = Text()
    text.append(f"{s['models']} model{'s' if s['models'] != 1 else ''}: ", "bold")
    text.append(f"{s['clean']} clean", "green" if s["clean"] else "")
    text.append(", ")
    text.append(f"{s['findings']} with findings", "bold red" if s["findings"] else "")
    if s["errors"]:
        text.append(", ")
        text.append(f"{s['errors']} unreadable", "bold red")
    text.append(f"; BN foldable {s['bn_foldable']}, left {s['bn_left']}; {result.seconds:.2f} s")
    return text
