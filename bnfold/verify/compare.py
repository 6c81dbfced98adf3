"""How close is equal: one tensor's comparison over samples, and where divergence starts.

The metric
    ``scale`` is the reference's largest finite magnitude in one sample: per tensor for graph
    outputs, per axis-1 channel for intermediates of rank >= 2, so that one channel folded
    wrongly is judged against that channel's own magnitude. A channel's scale is floored at
    ``CHANNEL_SCALE_FLOOR`` (0.1) of its tensor's scale: a quiet channel downstream of loud
    ones carries their absolute rounding noise (on a random 18-conv ResNet-style graph the
    worst correct-fold error was 1.8e-6 of the tensor scale but 4.4e-5 of a channel scale
    floored at 1e-2, 8e-6 floored at 0.1). Every scale is at least the dtype's smallest
    normal number. An element is out of tolerance when::

        |ref - cand| > atol + rtol * scale[channel] + NOISE_FACTOR * noise[channel]

    ``max_rel`` is ``max |ref - cand| / scale``. NaN and Inf must sit at the same places
    with the same sign in both models; matching ones are left out of the error figures,
    differing ones fail the tensor (``nan_inf_mismatch``). Integer, bool and string tensors
    must be equal, whatever ``atol``/``rtol`` say.

The calibrated noise
    A fixed fraction of a tensor's own magnitude is the wrong unit where a correct fold's
    float32 noise is large against the values: class scores after a Sigmoid of logits near -8.8
    (YOLO heads: every score ~1.5e-4, so a few ulps of logit noise are 1e-3 of the score), or
    deep Softmax/Erf tensors where near-ties amplify rounding. ``noise`` is measured, not
    assumed: the reference also runs at onnxruntime's ``ORT_ENABLE_BASIC``, which folds
    Conv+BN itself, a correct fold that differs from the ``ORT_DISABLE_ALL`` run only in float
    rounding; ``noise`` is the largest ``|ref - that run|`` per channel (per tensor for
    outputs), in the same sample. ``NOISE_FACTOR`` is 16: on 8 seeds each of a YOLO-shaped head
    and a visformer-shaped attention stack (tests/verify/noise_models.py) and the zoo, a factor
    of 6 clears every correct fold, 4 leaves one false alarm (0 gives the old rule: 15 of 31
    models failed); calibrated at ``ORT_ENABLE_ALL`` instead (which also reorders Conv
    arithmetic, at twice the memory) 3 sufficed. The verification power suite catches the same
    200 of 200 faults, 167 at runtime, with the factor at 0 or 16, since a fault shows at its
    own fold point where the noise is ~1e-7. Reported as ``TensorDiff.noise`` (relative to the
    scale, like ``max_rel``).

Default tolerances (``atol`` is 0 for every float type: the scale already carries the unit)
    ========  =====  ==================================================================
    dtype     rtol   why
    ========  =====  ==================================================================
    float64   1e-9   rounding is ~1e-16; seven orders of headroom for noise growth, and
                     small enough to see ``epsilon`` 1e-5 dropped. (onnxruntime's CPU
                     provider has no float64 Conv: such models are NOT_RUN.)
    float32   1e-4   a correct fold (float64 math, one rounding) differs from the unfolded
                     graph by float32 reassociation noise: ~3e-7 on one Conv+BN, at most
                     1.2e-5 over 5 seeds of the 18-conv graph above, 8.3e-6 over 3 seeds
                     of every model in models/ folded by fold_onnx. 1e-4 is 8x above that
                     and 10x below a 1e-3 fold error.
    float16   5e-2   every kernel boundary rounds to float16 (2**-11), and the folded
                     weights are rounded once more; the 18-conv graph reached 1.5e-2 with
                     a correct fold. Catches only errors of ~5% and up.
    bfloat16  0.1    8x float16's unit roundoff; not measured: onnxruntime's Python API
                     cannot pass bfloat16 tensors, so such models are NOT_RUN.
    ========  =====  ==================================================================

What the float32 defaults catch, and what they cannot
    The runtime comparison (tests/verify/test_verify_power.py, 200 faults on the zoo) catches two
    channels swapped, a training-mode BN folded with running statistics, one channel's bias
    off by 1e-3 of its magnitude, ``epsilon`` dropped when it is 1e-3, and 38 of 40 weights
    off by 1e-3 in one channel (the other two moved their channel by 1e-6 and 5.6e-5: its
    values come mostly from the bias). It cannot see ``epsilon`` dropped when it is the ONNX
    default 1e-5: that changes ``1/sqrt(var+eps)`` by ``eps/(2 var)``, 5.9e-6 to 2.7e-5 of
    the channel measured, under rtol (float64 models catch it). The weights check catches all
    200, including those. A channel quieter than 10% of its tensor's peak is judged against
    that 10%: a 1e-3 error is seen down to channels at ~1% of the peak.
    Where a BN's input is far larger than its output (``|mean| * gamma/sqrt(var)`` >>
    ``|y|``), the unfolded reference itself loses digits in ``x - mean`` and a correct fold
    can exceed ``rtol``: pass a looser ``rtol`` there.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..report import TensorDiff

__all__ = [
    "CHANNEL_SCALE_FLOOR",
    "DEFAULT_RTOL",
    "NOISE_FACTOR",
    "TensorStats",
    "failure_summary",
    "first_divergent",
    "noise_of",
]

DEFAULT_RTOL: dict[str, float] = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2, "bfloat16": 0.1}
"""Default ``rtol`` relative to the channel scale, by dtype (complex: by its parts); ``atol`` defaults to 0."""
CHANNEL_SCALE_FLOOR = 0.1
"""A channel's scale is at least this fraction of its tensor's scale."""
NOISE_FACTOR = 16.0
"""A channel may differ by this many times the calibrated noise (see module docstring)."""


@dataclass
class TensorStats:
    """One tensor's comparison, accumulated over samples."""

    name: str
    kind: str
    """``output`` (one scale per tensor) or ``intermediate`` (one scale per axis-1 channel)."""
    user_atol: float | None
    user_rtol: float | None
    cand_name: str = ""
    """The candidate's tensor compared with the reference's ``name`` (the same name unless
    ``matched_by`` says otherwise)."""
    matched_by: str = "name"
    shape: tuple[int, ...] = ()
    dtype: str = ""
    atol: float = 0.0
    rtol: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    sum_abs: float = 0.0
    counted: int = 0
    mismatched: int = 0
    total: int = 0
    nan_inf_mismatch: bool = False
    channel_rel: np.ndarray | None = None
    noise_rel: float = 0.0
    problem: str = ""

    def add(self, ref: np.ndarray, cand: np.ndarray, noise: np.ndarray | float | None = None) -> None:
        """Compare one sample; ``noise`` is :func:`noise_of` this sample's reference and its run a
        second way that differs only in float rounding (the noise a correct fold makes here)."""
        if not self.total:
            self.shape, self.dtype = tuple(ref.shape), ref.dtype.name
            if ref.dtype.kind in "fc":  # else atol = rtol = 0: integers, bools and strings must be equal
                self.atol = 0.0 if self.user_atol is None else float(self.user_atol)
                self.rtol = (
                    DEFAULT_RTOL[np.finfo(ref.dtype).dtype.name]
                    if self.user_rtol is None
                    else float(self.user_rtol)
                )
        self.total += ref.size
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            self.problem = self.problem or (
                f"'{self.name}' is {ref.dtype}{list(ref.shape)} in the reference "
                f"but {cand.dtype}{list(cand.shape)} in the candidate"
            )
            self.mismatched += ref.size
            return
        if ref.dtype.kind not in "fciub":  # strings
            self.mismatched += int(np.count_nonzero(ref != cand))
            return
        wide = np.result_type(ref.dtype, np.float64)
        r, c = ref.astype(wide), cand.astype(wide)
        finite = np.isfinite(r) & np.isfinite(c)
        special_bad = ~finite & ~((np.isnan(r) & np.isnan(c)) | (r == c))  # r == c: same-signed Inf
        self.nan_inf_mismatch |= bool(special_bad.any())
        with np.errstate(invalid="ignore"):  # Inf - Inf
            diff = np.where(finite, np.abs(r - c), 0.0)
        per_channel = self.kind == "intermediate" and ref.ndim >= 2
        tiny = float(np.finfo(ref.dtype).tiny) if ref.dtype.kind in "fc" else 1.0
        scale = scale_of(np.where(np.isfinite(r), np.abs(r), 0.0), per_channel, tiny)
        rel = diff / scale
        allowed = self.atol + self.rtol * scale
        if noise is not None and np.ndim(noise) in (0, ref.ndim):
            allowance = NOISE_FACTOR * np.asarray(noise)
            allowed = allowed + allowance
            self.noise_rel = max(self.noise_rel, float(np.max(allowance / scale)))
        self.mismatched += int(np.count_nonzero((diff > allowed) | special_bad))
        if finite.any():
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            self.counted += int(np.count_nonzero(finite))
        if per_channel:
            per = channel_max(rel)
            self.channel_rel = per if self.channel_rel is None else np.maximum(self.channel_rel, per)

    def result(self) -> TensorDiff:
        return TensorDiff(
            name=self.name,
            kind=self.kind,
            shape=self.shape,
            dtype=self.dtype,
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            mean_abs=self.sum_abs / self.counted if self.counted else 0.0,
            mismatched=self.mismatched,
            total=self.total,
            atol=self.atol,
            rtol=self.rtol,
            passed=self.mismatched == 0 and not self.problem,
            worst_channel=int(np.argmax(self.channel_rel)) if self.channel_rel is not None else None,
            nan_inf_mismatch=self.nan_inf_mismatch,
            noise=self.noise_rel,
            matched_by=self.matched_by,
        )


def scale_of(magnitude: np.ndarray, per_channel: bool, tiny: float) -> np.ndarray | float:
    """The reference's largest magnitude, per tensor or per axis-1 channel (floored, see module doc)."""
    whole = float(magnitude.max()) if magnitude.size else 0.0
    if not per_channel:
        return max(whole, tiny)
    channel = np.maximum(channel_max(magnitude), max(CHANNEL_SCALE_FLOOR * whole, tiny))
    return channel.reshape((1, -1) + (1,) * (magnitude.ndim - 2))


def noise_of(ref: np.ndarray, calibration: np.ndarray, kind: str) -> np.ndarray | float | None:
    """Largest finite ``|ref - calibration|``, per tensor (``output``) or per axis-1 channel
    (``intermediate`` of rank >= 2), broadcastable against ``ref``; None for non-float tensors."""
    if ref.dtype.kind not in "fc" or calibration.shape != ref.shape:
        return None
    wide = np.result_type(ref.dtype, np.float64)
    return _noise(ref.astype(wide), calibration.astype(wide), kind == "intermediate" and ref.ndim >= 2)


def _noise(ref: np.ndarray, calibration: np.ndarray, per_channel: bool) -> np.ndarray | float:
    with np.errstate(invalid="ignore"):
        both = np.isfinite(ref) & np.isfinite(calibration)
        diff = np.where(both, np.abs(ref - calibration), 0.0)
    if not per_channel:
        return float(diff.max()) if diff.size else 0.0
    return channel_max(diff).reshape((1, -1) + (1,) * (diff.ndim - 2))


def channel_max(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return np.zeros(a.shape[1])
    return a.max(axis=tuple(i for i in range(a.ndim) if i != 1))


def first_divergent(graph: onnx.GraphProto, failing: Sequence[str]) -> tuple[str, ...]:
    """Failing tensors with no failing tensor among their ancestors in ``graph``, in graph order.

    One pass over the nodes, which ONNX requires to be in topological order.
    """
    bad = set(failing)
    upstream_bad: dict[str, bool] = {}  # tensor -> some ancestor fails
    first = []
    for node in graph.node:
        ins = [i for i in node.input if i] + outer_names(node)
        above = any(i in bad or upstream_bad.get(i, False) for i in ins)
        for o in node.output:
            upstream_bad[o] = above
            if o in bad and not above:
                first.append(o)
    return tuple(first)


def outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read (a superset of the outer-scope values they use)."""
    names = []
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for n in g.node:
                names.extend(i for i in n.input if i)
                names.extend(outer_names(n))
    return names


def in_graph_order(graph: onnx.GraphProto, names: Sequence[str]) -> tuple[str, ...]:
    wanted = set(names)
    order = [o for n in graph.node for o in n.output if o in wanted]
    return tuple(dict.fromkeys([*order, *names]))


def failure_summary(diffs: Sequence[TensorDiff], failing: Sequence[str], first: Sequence[str]) -> str:
    worst = max((d for d in diffs if d.name in first), key=lambda d: (d.nan_inf_mismatch, d.max_rel))
    what = "NaN/Inf at different places" if worst.nan_inf_mismatch else f"max_rel {worst.max_rel:.3g}"
    return (
        f"{len(failing)} of {len(diffs)} compared tensors differ; first divergent: {', '.join(first)} "
        f"({worst.name}: {worst.mismatched} of {worst.total} elements out of tolerance, {what}, "
        f"rtol {worst.rtol:g})"
    )
