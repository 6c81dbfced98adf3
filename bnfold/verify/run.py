"""Prove a folded model computes what the original computes, with onnxruntime.

Both models run on onnxruntime's CPUExecutionProvider at ``ORT_DISABLE_ALL``: at any higher
level onnxruntime fuses Conv+BatchNormalization itself, and the reference would be a folded
model too. The reference also runs at ``ORT_ENABLE_BASIC`` to calibrate the tolerances
(:mod:`bnfold.verify.calibrate`, :mod:`bnfold.verify.compare`), and the candidate once at ``ORT_ENABLE_ALL``
(``candidate_runs_optimized``). Sessions of a model file are built from a weightless copy whose
initializers are external references into the file (onnxruntime maps them; no copy of the
weights passes through Python), with weight pre-packing off.

Steps
    1. The interface (:mod:`bnfold.verify.interface`): inputs, output types, overridable
       initializers. A difference fails before anything runs.
    2. The samples (:mod:`bnfold.verify.inputs`): given, or drawn seeded; If conditions take
       both values; free dimensions are bound to a size both models run (``bound_dims``).
    3. The pairs: graph outputs by name (:mod:`bnfold.verify.correspond`); intermediates by
       name, as fold aliases (a name another tool kept after folding the BN behind it), or by
       structure when renamed (:mod:`bnfold.verify.structure`), the last two confirmed on the
       first sample; ``matched`` counts each kind.
    4. Every sample through both models; each pair compared per channel. A wrong fold shows up
       at its own tensor, and ``first_divergent`` names the failing tensors none of whose
       failing ancestors (in the reference graph) explain them.
    5. At each fold point the candidate's stored weights are checked statically against the
       reference's layer and BN folded in float64, to 4 ulps of the weight dtype
       (:mod:`bnfold.verify.weights`, reported in ``weights``): it catches what float32 noise
       hides, and fails a fold of a training-mode BN outright.

Limits
    Every compared intermediate becomes a graph output, so onnxruntime keeps them all alive:
    memory grows with the activations of one sample (``intermediates=False`` avoids it), and
    the calibration keeps those of every sample while they weigh less than the weights
    (:mod:`bnfold.verify.calibrate`). Peak memory: about twice the model's weights (large-500:
    2.2x the file) plus the fetched activations; the weights check adds a few MB.
    Tensors inside If/Loop bodies, bfloat16 intermediates and tensors of unknown type are not
    compared; fold points inside subgraphs, behind Reshape/Flatten, and bfloat16 weights are
    not checked statically.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..report import InputSpec, VerifyReport, VerifyStatus
from .calibrate import CALIBRATION_LEVEL, calibrate
from .compare import TensorStats, failure_summary, first_divergent, in_graph_order
from .correspond import Pair, alias_candidates, output_pairs, pick_aliases, shared_by_name
from .inputs import (
    InputDecl,
    declared_inputs,
    free_dims,
    generated_samples,
    switch_inputs,
    unfixed_error,
    user_samples,
)
from .interface import interface_problems, overrides
from .models import (
    PROVIDER,
    ModelLike,
    NotRun,
    OrtModel,
    first_line,
    onnxruntime,
    open_model,
    release_memory,
    run,
    session,
)
from .options import InputsLike, Shapes, VerifyOptions, verify_options
from .structure import structural_options
from .weights import WeightCheck, check_weights

__all__ = ["verify", "verify_with"]

log = logging.getLogger(__name__)


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    inputs: InputsLike | None = None,
    shapes: Shapes | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    intermediates: bool = True,
    options: VerifyOptions | None = None,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare outputs and shared tensors.

    ``inputs``: one sample (name -> array), a list of samples, an ``.npz`` or a ``.pb`` folder
    (see :func:`load_inputs`); by default ``samples`` draws seeded from ``seed``. ``shapes``
    fixes symbolic dimensions ({"input": (1, 3, 224, 224)}); an unresolved dimension 0 is 1.
    ``atol``/``rtol`` replace the per-dtype defaults (:mod:`bnfold.verify.compare`) for float
    tensors, and loosen (never tighten) the static weights check. ``options`` gives all six at
    once (:class:`VerifyOptions`), instead of the keywords. ``intermediates=False`` compares the
    graph outputs only: no shared tensors, no weights check.

    Raises ShapeError for a dimension nothing fixes, InputError for unusable inputs or
    files. A model onnxruntime cannot load or run gives status NOT_RUN, never PASSED.
    """
    opts = verify_options(
        options, inputs=inputs, shapes=shapes, seed=seed, samples=samples, atol=atol, rtol=rtol
    )
    return verify_with(reference, candidate, opts, intermediates=intermediates)


def verify_with(
    reference: ModelLike,
    candidate: ModelLike,
    options: VerifyOptions,
    *,
    intermediates: bool = True,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """:func:`verify` with its options in one :class:`VerifyOptions`; ``progress`` is called with
    each step as it starts (``verifying: sample 2/3``...)."""
    step = progress or (lambda _step: None)
    start = time.perf_counter()
    ref, cand = open_model(reference, "reference"), open_model(candidate, "candidate")
    fields: dict[str, Any] = {"onnxruntime_version": onnxruntime().__version__, "provider": PROVIDER}

    def finish(status: VerifyStatus, message: str = "") -> VerifyReport:
        return VerifyReport(status=status, message=message, seconds=time.perf_counter() - start, **fields)

    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
        try:
            decls, cand_inputs = declared_inputs(ref.graph), declared_inputs(cand.graph)
        except NotRun as e:
            return finish(VerifyStatus.NOT_RUN, str(e))
        problems = interface_problems(ref, cand, decls, cand_inputs)
        if problems:
            return finish(VerifyStatus.FAILED, "interface differs: " + "; ".join(problems))
        try:
            feeds, notes = _feeds(ref, cand, decls, cand_inputs, options, fields, tmp)
        except NotRun as e:
            return finish(VerifyStatus.NOT_RUN, str(e))
        return _compare(
            ref, cand, feeds, cand_inputs, options, intermediates, fields, notes, finish, tmp, step
        )


def _feeds(
    ref: OrtModel,
    cand: OrtModel,
    decls: Sequence[InputDecl],
    cand_inputs: Sequence[InputDecl],
    options: VerifyOptions,
    fields: dict[str, Any],
    tmp: str,
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """The samples both models run on, and notes on how they were chosen."""
    notes = []
    if options.inputs is None:
        free = free_dims(decls, options.shapes)
        bound = _bind(ref, cand, decls, cand_inputs, options, free, tmp) if free else {}
        feeds = generated_samples(decls, options.shapes, options.seed, options.samples, bound)
        fields.update(seed=options.seed, input_source="generated", bound_dims=bound)
        switches = switch_inputs(decls, {n: a.shape for n, a in feeds[0].items()})
        if switches:
            ifs = [
                n.name or n.output[0] for n in ref.graph.node if n.op_type == "If" and n.input[0] in switches
            ]
            ran = f": If {ifs} ran both branches" if ifs else ""
            notes.append(f"bool input(s) {switches} took True and False{ran}")
    else:
        feeds, fields["input_source"] = user_samples(options.inputs, decls)
    first = feeds[0]
    fields["samples"] = len(feeds)
    fields["inputs"] = tuple(InputSpec(d.name, first[d.name].shape, first[d.name].dtype.name) for d in decls)
    if any(d.elem_type == TensorProto.BFLOAT16 for d in decls):
        raise NotRun("onnxruntime's Python API cannot pass bfloat16 tensors")
    return feeds, notes


BIND_SIZES = (16, 32, 64, 8, 128, 224, 4, 3)
"""Sizes tried, in order, for a symbolic dimension nothing fixes (1 is never tried: it broadcasts)."""


def _bind(
    ref: OrtModel,
    cand: OrtModel,
    decls: Sequence[InputDecl],
    cand_inputs: Sequence[InputDecl],
    options: VerifyOptions,
    free: Sequence[str],
    tmp: str,
) -> dict[str, int]:
    """One size for every free dimension that both models run with (one seeded sample)."""
    level = "ORT_DISABLE_ALL"
    ref.prepare(tmp)
    cand.prepare(tmp)
    sessions = [(session(ref, (), level), ref, [d.name for d in decls])]
    sessions.append((session(cand, (), level), cand, [d.name for d in cand_inputs]))
    for size in BIND_SIZES:
        bind = dict.fromkeys(free, size)
        sample = generated_samples(decls, options.shapes, options.seed, 1, bind)[0]
        try:
            for sess, model, names in sessions:
                run(sess, model, {n: sample[n] for n in names})
        except NotRun as e:
            log.debug("free dimensions %s = %d do not run: %s", list(free), size, e)
            continue
        return bind
    d, i, dim = next(
        (d, i, x) for d in decls for i, x in enumerate(d.dims or ()) if (x or f"{d.name}[{i}]") == free[0]
    )
    what = f"'{dim}'" if dim else "unknown"
    raise unfixed_error(
        d,
        f"input '{d.name}' dimension {i} ({what}) is not fixed, and no size in {list(BIND_SIZES)} "
        f"for {list(free)} runs both models",
    )


def _compare(
    ref: OrtModel,
    cand: OrtModel,
    feeds: Sequence[dict[str, np.ndarray]],
    cand_inputs: Sequence[InputDecl],
    options: VerifyOptions,
    intermediates: bool,
    fields: dict[str, Any],
    notes: list[str],
    finish: Any,
    tmp: str,
    step: Callable[[str], None],
) -> VerifyReport:
    """Pair the tensors, run, compare, check the weights, and say what failed first."""
    atol, rtol = options.atol, options.rtol
    ref_outs, cand_outs = [o.name for o in ref.graph.output], [o.name for o in cand.graph.output]
    outputs, problem, note = output_pairs(ref_outs, cand_outs)
    if problem:
        return finish(VerifyStatus.FAILED, problem)
    notes += [note] if note else []
    plan = _Plan(outputs)
    if intermediates:
        plan.add_intermediates(ref, cand)
    fields["compared_on"] = "outputs+intermediates" if plan.has_intermediates else "outputs"
    cand_feeds = [{d.name: feed[d.name] for d in cand_inputs} for feed in feeds]
    try:
        plan.overrides = overrides(ref, options.seed)
        stats, ignored = _execute(ref, cand, plan, feeds, cand_feeds, fields, notes, (atol, rtol), tmp, step)
    except NotRun as e:
        return finish(VerifyStatus.NOT_RUN, str(e))
    if ignored:
        return finish(VerifyStatus.FAILED, ignored)

    diffs = [s.result() for s in stats]
    if intermediates:
        step("verifying: folded weights")
    weights = _weights(ref, cand, atol, rtol) if intermediates else []
    fields["outputs"] = tuple(d for d in diffs if d.kind == "output")
    fields["intermediates"] = tuple(d for d in diffs if d.kind == "intermediate")
    fields["matched"] = dict(Counter(d.matched_by for d in fields["intermediates"]))
    unconfirmed = plan.undecided - sum(
        s.cand_name in plan.chains or s.cand_name in plan.structural for s in stats
    )
    if unconfirmed:
        fields["matched"]["unconfirmed"] = unconfirmed
    fields["weights"] = tuple(w.diff for w in weights)
    failing = [d.name for d in diffs if not d.passed]
    bad_weights = [w for w in weights if not w.diff.passed]
    if not failing and not bad_weights:
        return finish(VerifyStatus.PASSED, "; ".join(notes))
    first = first_divergent(ref.graph, failing) or tuple(failing)
    fields["first_divergent"] = in_graph_order(ref.graph, [*first, *(w.diff.name for w in bad_weights)])
    problem = next((s.problem for s in stats if s.problem), "")
    summary = problem or (failure_summary(diffs, failing, first) if failing else "")
    return finish(
        VerifyStatus.FAILED, "; ".join(p for p in [summary, *(w.problem for w in bad_weights), *notes] if p)
    )


class _Plan:
    """What to fetch from each model, and the pairs known before running (aliases are picked on
    the first sample)."""

    def __init__(self, outputs: list[Pair]) -> None:
        self.pairs = list(outputs)
        self.chains: dict[str, list[str]] = {}
        """Shared names another tool may have kept after a fold: the reference tensors they may hold."""
        self.structural: dict[str, list[str]] = {}
        """Renamed candidate tensors matched by structure: the reference tensors they may hold."""
        self.types: dict[str, int] = {}
        self.cand_types: dict[str, int] = {}
        self.overrides: dict[str, np.ndarray] = {}
        """Overridable initializers of the reference, perturbed, fed to both in one more run."""

    @property
    def has_intermediates(self) -> bool:
        n_outputs = sum(p.kind == "output" for p in self.pairs)
        return len(self.pairs) > n_outputs or bool(self.chains) or bool(self.structural)

    @property
    def undecided(self) -> int:
        return len(self.chains) + len(self.structural)

    def add_intermediates(self, ref: OrtModel, cand: OrtModel) -> None:
        shared, self.types, self.cand_types = shared_by_name(ref, cand, set())
        self.chains = alias_candidates(ref, cand, self.types)
        self.pairs += [Pair(n, n, "intermediate") for n in shared if n not in self.chains]
        known = {n: [n] for n in shared if n not in self.chains} | self.chains
        self.structural = structural_options(ref, cand, known, self.types, self.cand_types)

    def pick(self, ref_values: Mapping[str, np.ndarray], cand_values: Mapping[str, np.ndarray]) -> list[Pair]:
        """Every pair, the ambiguous ones decided on one sample."""
        return (
            self.pairs
            + pick_aliases(self.chains, ref_values, cand_values)
            + pick_aliases(self.structural, ref_values, cand_values, label="structure")
        )

    def fetch(self) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        """Extra outputs of the reference and of the candidate."""
        undecided = {**self.chains, **self.structural}
        ref_names = [p.ref for p in self.pairs if p.kind != "output"]
        ref_names += [r for options in undecided.values() for r in options]
        cand_names = [p.cand for p in self.pairs if p.kind != "output"] + list(undecided)

        def infos(names: list[str], types: Mapping[str, int]) -> list[onnx.ValueInfoProto]:
            return [helper.make_tensor_value_info(n, types[n], None) for n in dict.fromkeys(names)]

        return infos(ref_names, self.types), infos(cand_names, self.cand_types)


def _execute(
    ref: OrtModel,
    cand: OrtModel,
    plan: _Plan,
    feeds: Sequence[Mapping[str, np.ndarray]],
    cand_feeds: Sequence[Mapping[str, np.ndarray]],
    fields: dict[str, Any],
    notes: list[str],
    tolerances: tuple[float | None, float | None],
    tmp: str,
    step: Callable[[str], None],
) -> tuple[list[TensorStats], str]:
    """Run both models at ``ORT_DISABLE_ALL`` on every sample and compare the pairs; then once
    more with the overridable initializers perturbed (the outputs must still agree: a sentence
    saying how they do not, or "").

    Three phases, so that at most two models' weights are resident at once: the candidate once
    at ``ORT_ENABLE_ALL`` (does it load there: ``candidate_runs_optimized``); the reference on
    every sample at ``CALIBRATION_LEVEL`` (:mod:`bnfold.verify.calibrate`: the noise a correct
    fold makes at each tensor); then the reference and the candidate at ``ORT_DISABLE_ALL``,
    compared.
    """
    ref_extra, cand_extra = plan.fetch()
    ref_names = [o.name for o in ref.graph.output] + [v.name for v in ref_extra]
    cand_names = [o.name for o in cand.graph.output] + [v.name for v in cand_extra]
    outputs = frozenset(o.name for o in ref.graph.output)
    ref.prepare(tmp)
    cand.prepare(tmp)
    step("verifying: the candidate at ORT_ENABLE_ALL")
    try:
        run(session(cand, (), "ORT_ENABLE_ALL"), cand, cand_feeds[0])
        fields["candidate_runs_optimized"] = True
    except NotRun as e:
        fields["candidate_runs_optimized"] = False
        notes.append(f"at ORT_ENABLE_ALL: {e}")
    release_memory()
    step(f"verifying: calibrating (the reference at {CALIBRATION_LEVEL})")
    override = [{**feeds[0], **plan.overrides}] if plan.overrides else []
    calibration = calibrate(ref, ref_extra, [*feeds, *override], ref_names, outputs, notes)
    release_memory()
    fields["calibrated"] = calibration.calibrated
    ref_sess = calibration.reference_session or session(ref, ref_extra, "ORT_DISABLE_ALL")
    cand_sess = session(cand, cand_extra, "ORT_DISABLE_ALL")
    noise = calibration.noise

    stats: list[TensorStats] = []
    for i, (feed, cand_feed) in enumerate(zip(feeds, cand_feeds)):
        step(f"verifying: sample {i + 1}/{len(feeds)}")
        r = dict(zip(ref_names, run(ref_sess, ref, feed)))
        c = dict(zip(cand_names, run(cand_sess, cand, cand_feed)))
        if i == 0:
            stats = [
                TensorStats(p.ref, p.kind, *tolerances, cand_name=p.cand, matched_by=p.matched_by)
                for p in plan.pick(r, c)
            ]
        for s in stats:
            s.add(r[s.name], c[s.cand_name], noise(i, s.name, r[s.name]))
    ignored = ""
    if override:
        outs = [p for p in plan.pairs if p.kind == "output"]
        r = dict(zip(ref_names, run(ref_sess, ref, override[0])))
        c = dict(zip(cand_names, run(cand_sess, cand, {**cand_feeds[0], **plan.overrides})))
        checks = [TensorStats(p.ref, "output", *tolerances) for p in outs]
        for s, p in zip(checks, outs):
            s.add(r[p.ref], c[p.cand], noise(len(feeds), p.ref, r[p.ref]))
        bad = [s.result() for s in checks if not s.result().passed]
        if bad:
            ignored = (
                f"with the overridable initializer(s) {sorted(plan.overrides)} fed perturbed values, "
                f"output '{bad[0].name}' differs (max_rel {bad[0].max_rel:.3g}): the candidate "
                "does not use them as the reference does"
            )
    return stats, ignored


def _weights(ref: OrtModel, cand: OrtModel, atol: float | None, rtol: float | None) -> list[WeightCheck]:
    """The static check of every fold point (bnfold.verify.weights); if it cannot read a graph,
    the fold points are left to the runtime comparison."""
    try:
        return check_weights(
            ref.proto,
            cand.proto,
            reference_dir=ref.directory,
            candidate_dir=cand.directory,
            atol=atol,
            rtol=rtol,
        )
    except Exception as e:  # noqa: BLE001 - a graph it cannot read is left to the runtime comparison
        log.debug("weights check skipped: %s", first_line(e))
        return []
