"""Safe folding: fold, verify with onnxruntime, revert the folds that diverge, verify again.

Used by :mod:`bnfold.api` (``fold_onnx(..., verify=True)``, ``fold_path``). Because a
fold keeps the BN's output name, the verifier compares the fold points of both models; a
fold whose tensor diverges first (every shared tensor upstream of it matches), or whose
stored weights differ from the BN folded exactly (:mod:`bnfold.verify.weights`), is reverted
by folding again from the source with that BN excluded. When divergence cannot be attributed to
a fold (e.g. it shows only at graph outputs, or inside a subgraph), every fold of that round
is reverted. The result either passed verification or raises VerificationError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import VerificationError
from ..report import FoldReport, SkipReason, VerifyReport, VerifyStatus
from . import run
from .options import VerifyOptions

MAX_ROUNDS = 4

# make(exclude) -> (candidate for the verifier: ModelProto or path, its FoldReport, payload)
Make = Callable[[frozenset[str]], tuple[Any, FoldReport, Any]]


@dataclasses.dataclass(frozen=True)
class Verified:
    payload: Any
    report: FoldReport
    verification: VerifyReport


def fold_verified(
    make: Make,
    reference: Any,
    *,
    options: VerifyOptions,
    exclude: frozenset[str] = frozenset(),
    force: bool = False,
    intermediates: bool = True,
    unchanged: Callable[[Any], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Verified:
    """Run ``make`` until its candidate verifies against ``reference``; see module docstring.

    With ``force=True`` a candidate that still fails after reverting is returned instead of
    raising (its verification report says FAILED). ``unchanged(payload)`` says whether a
    candidate that folded nothing has the reference's very graph: then, unless folds were
    reverted to get there (the reference must then show it runs the same twice), it passes
    without an onnxruntime run.
    """
    reverted: dict[str, str] = {}
    last: tuple[Any, FoldReport, Any] | None = None
    vr: VerifyReport | None = None
    for _ in range(MAX_ROUNDS):
        candidate, report, payload = make(exclude | frozenset(reverted))
        last = (candidate, report, payload)
        if not report.folded and not reverted and unchanged is not None and unchanged(payload):
            vr = VerifyReport(
                status=VerifyStatus.PASSED,
                compared_on="unchanged",
                message="nothing folded: the candidate's graph is the reference's, no onnxruntime run",
            )
        else:
            vr = run.verify_with(
                reference, candidate, options, intermediates=intermediates, progress=progress
            )
        if vr.status is VerifyStatus.PASSED:
            marked = _mark_reverted(report, reverted)
            return Verified(payload, marked, _with_reverted(vr, marked, reverted))
        if vr.status is VerifyStatus.NOT_RUN:
            break
        folded_outputs = [f.output for f in report.folded]
        suspects = [n for n in vr.first_divergent if n in set(folded_outputs)]
        if not suspects:
            suspects = folded_outputs
        if not suspects:
            break  # nothing left to revert: the difference is not ours
        for name in suspects:
            reverted[name] = _why(vr, name)
    assert last is not None and vr is not None
    candidate, report, payload = last
    marked = _mark_reverted(report, reverted)
    final = _with_reverted(vr, marked, reverted)
    if force:
        return Verified(payload, marked, final)
    if vr.status is VerifyStatus.NOT_RUN:
        msg = f"verification not run: {vr.message}"
    else:
        msg = f"verification failed: {vr.message or 'outputs differ'}"
    raise VerificationError(msg, report=final, result=Verified(payload, marked, final))


def _why(vr: VerifyReport, name: str) -> str:
    """The sentence for a reverted fold: what failed at its tensor, or that it was not cleared.

    Only failing comparisons are quoted: a fold reverted because the divergence could not be
    attributed may have a tensor that matched.
    """
    parts = [
        f"its output diverged under onnxruntime (max rel error {d.max_rel:.3g}, channel {d.worst_channel})"
        for d in vr.intermediates
        if d.name == name and not d.passed
    ] + [
        f"its folded weights differ from the BN folded exactly (max rel error {d.max_rel:.3g}, "
        f"channel {d.worst_channel})"
        for d in vr.weights
        if d.name == name and not d.passed
    ]
    return "; ".join(parts) or "the folded model's outputs diverged and this fold could not be cleared"


def _mark_reverted(report: FoldReport, reverted: Mapping[str, str]) -> FoldReport:
    if not reverted:
        return report
    skipped = tuple(
        dataclasses.replace(s, reason=SkipReason.VERIFICATION_FAILED, detail=reverted[s.output])
        if s.reason is SkipReason.EXCLUDED and s.output in reverted
        else s
        for s in report.skipped
    )
    return FoldReport(folded=report.folded, skipped=skipped)


def _with_reverted(vr: VerifyReport, report: FoldReport, reverted: Mapping[str, str]) -> VerifyReport:
    """``vr`` naming the reverted folds (``reverted``, ``suspect_folds``); a pass says it came
    only after reverting, so that it never reads as a plain "passed"."""
    if not reverted:
        return vr
    undone = tuple(
        s for s in report.skipped if s.reason is SkipReason.VERIFICATION_FAILED and s.output in reverted
    )
    message = vr.message
    if vr.status is VerifyStatus.PASSED:
        n = len(reverted)
        said = f"passed after reverting {n} fold{'s' if n != 1 else ''} that diverged ({', '.join(reverted)})"
        message = "; ".join(p for p in (said, vr.message) if p)
    suspects = tuple(dict.fromkeys([*vr.suspect_folds, *reverted]))
    return dataclasses.replace(vr, suspect_folds=suspects, reverted=undone, message=message)
