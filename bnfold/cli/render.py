"""How the CLI shows results to people: rich renderables built from the outcomes of
:mod:`bnfold.cli.results` and the reports of :mod:`bnfold.report`. The caller picks the console
(stdout, stderr) and decides when to print; JSON documents are the results' own ``to_dict``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.filesize import decimal as human_bytes
from rich.table import Table
from rich.text import Text

from bnfold.cli.results import CheckResult, CheckStatus, FoldOutcome, ModelCheck
from bnfold.report import Folded, FoldReport, Skipped, TensorDiff, VerifyReport, VerifyStatus

_BRIEF_LIMIT = 10
"""Items listed per section without --verbose."""

_STATUS_STYLE = {"passed": "green", "failed": "bold red", "not-run": "bold yellow"}


# --------------------------------------------------------------------------------------------
# fold


def fold_summary(outcome: FoldOutcome, *, verbose: bool = False) -> RenderableType:
    """The at-a-glance summary of a fold: BN folded/left (with reasons), verification per
    output, intermediates, nodes, size and time."""
    parts: list[RenderableType] = [Text.assemble(("bnfold ", "bold"), outcome.source, " → ", outcome.output)]
    if outcome.module_report is not None and outcome.module_report.bn_total:
        parts.append(_bn_section("PyTorch modules", outcome.module_report, verbose=verbose))
    if outcome.report is not None:
        parts.append(_bn_section("BatchNormalization", outcome.report, verbose=verbose))
    parts.append(verification_section(outcome.verification, verbose=verbose))
    torch_check = (outcome.export or {}).get("torch_vs_onnx")
    if isinstance(torch_check, VerifyReport):
        parts.append(_torch_line(torch_check))
    parts.append(_stats_line(outcome))
    if outcome.written:
        parts.append(Text.assemble(("wrote ", "green"), outcome.output))
    else:
        parts.append(
            Text.assemble(("nothing written", "bold red"), f": {outcome.error}" if outcome.error else "")
        )
    if outcome.written and outcome.error:
        parts.append(Text(outcome.error, style="yellow"))
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


def bn_table(
    folded: Sequence[Folded], folded_label: str, skipped: Sequence[Skipped], *, verbose: bool
) -> Group:
    """One line per BN: ``folded``/``foldable`` with the layer that absorbs it, ``left`` with the
    reason code and sentence. Without ``verbose`` each kind stops after a few lines."""
    width = max(len(folded_label), len("left")) + 2
    limit = None if verbose else _BRIEF_LIMIT
    done = [(f.bn, f.graph, Text(f" → {f.producer_op} {f.producer}", style="green")) for f in folded]
    left = [
        (s.bn, s.graph, Text.assemble("  ", (s.reason.value, "yellow"), f": {s.detail}")) for s in skipped
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
        Text.assemble((f"  {label:<{width}}", "dim"), f"{bn} [{graph}]" if graph else bn, tail)
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
    style = _STATUS_STYLE[v.status.value]
    how = f"{v.samples} sample{'s' if v.samples != 1 else ''}"
    if v.seed is not None and v.input_source == "generated":
        how += f", seed {v.seed}"
    if v.input_source != "generated":
        how += f", inputs {v.input_source}"
    engine = f"onnxruntime {v.onnxruntime_version}" if v.onnxruntime_version else "onnxruntime"
    parts: list[RenderableType] = [
        Text.assemble(
            (f"{title}: ", "bold"), (v.status.value, style), f" — {how}, {engine} CPU at ORT_DISABLE_ALL"
        )
    ]
    if v.message and v.status is not VerifyStatus.PASSED:
        parts.append(Text(f"  {v.message}", style=style))
    if v.outputs:
        parts.append(_diff_table(v.outputs))
    if v.intermediates:
        parts.append(_diffs_line("intermediates", "compared", v.intermediates))
        if verbose:
            parts.append(_diff_table(v.intermediates))
    elif v.status is not VerifyStatus.NOT_RUN:
        parts.append(Text("  intermediates: none compared (no shared tensor names)", style="dim"))
    if v.weights:
        parts.append(_diffs_line("folded weights", "recomputed from the reference", v.weights))
        if verbose:
            parts.append(_diff_table(v.weights))
    if v.first_divergent:
        parts.append(Text(f"  first divergent: {', '.join(v.first_divergent)}", style="red"))
    if v.suspect_folds:
        parts.append(Text(f"  suspect folds: {', '.join(v.suspect_folds)}", style="red"))
    return Group(*parts)


def _diff_table(diffs: Iterable[TensorDiff]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=True, show_edge=False)
    table.add_column("tensor", overflow="fold")
    table.add_column("shape")
    table.add_column("max abs", justify="right")
    table.add_column("max rel", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("", no_wrap=True)
    for d in diffs:
        ok = (
            Text("ok", style="green")
            if d.passed
            else Text(f"FAIL {d.mismatched}/{d.total}", style="bold red")
        )
        if d.nan_inf_mismatch:
            ok.append(" nan/inf", style="bold red")
        table.add_row(
            d.name,
            "x".join(str(s) for s in d.shape) or "scalar",
            f"{d.max_abs:.2e}",
            f"{d.max_rel:.2e}",
            f"rtol {d.rtol:.0e}" if d.atol == 0 else f"atol {d.atol:.0e} + rtol {d.rtol:.0e}",
            ok,
        )
    return table


def _diffs_line(what: str, how: str, diffs: Sequence[TensorDiff]) -> Text:
    bad = [d for d in diffs if not d.passed]
    worst = max(diffs, key=lambda d: d.max_rel)
    text = Text(f"  {what}: {len(diffs)} {how}, ")
    if bad:
        text.append(f"{len(bad)} outside tolerance", style="bold red")
    else:
        text.append("all within tolerance", style="green")
    text.append(f"; worst {worst.name} (max abs {worst.max_abs:.2e}, max rel {worst.max_rel:.2e})")
    return text


def _torch_line(check: VerifyReport) -> Text:
    """``torch vs ONNX: passed — on the example inputs; worst output y: max abs …, max rel …``."""
    style = _STATUS_STYLE[check.status.value]
    text = Text.assemble(("torch vs ONNX: ", "bold"), (check.status.value, style))
    if check.outputs:
        worst = max(check.outputs, key=lambda d: d.max_rel)
        text.append(
            f" — on the example inputs; worst output {worst.name}: max abs {worst.max_abs:.2e}, "
            f"max rel {worst.max_rel:.2e}"
        )
    if check.message:
        text.append(f"; {check.message}", style=style)
    return text


def _stats_line(outcome: FoldOutcome) -> Text:
    text = Text()
    b, a = outcome.before, outcome.after
    if b is not None:
        text.append("nodes ", "bold")
        text.append(f"{b.nodes} → {a.nodes}" if a else f"{b.nodes}")
        text.append("   size ", "bold")
        text.append(f"{human_bytes(b.bytes)} → {human_bytes(a.bytes)}" if a else human_bytes(b.bytes))
        text.append("   ")
    elif a is not None:
        text.append("nodes ", "bold")
        text.append(str(a.nodes))
        text.append("   size ", "bold")
        text.append(human_bytes(a.bytes))
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
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("model", overflow="fold")
        table.add_column("BN", justify="right")
        table.add_column("foldable", justify="right")
        table.add_column("left", justify="right")
        if against:
            table.add_column("equivalent")
        table.add_column("status")
        for m in readable:
            row = [
                m.path,
                str(m.report.bn_total) if m.report else "-",
                Text(str(m.bn_foldable), style="bold red" if m.bn_foldable else ""),
                str(m.bn_left),
            ]
            if against:
                row.append(_verify_cell(m))
            row.append(_status_cell(m))
            table.add_row(*row)
        parts.append(table)
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
    return Group(Text(m.path, style="bold"), *rows)


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
