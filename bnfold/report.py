"""Result types shared by the ONNX pass, the PyTorch pass, the verifier and the CLI.

Everything here is a frozen dataclass (or an enum) with a ``to_dict`` that gives the
JSON form documented in the README. The library never prints: callers render these.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from bnfold.onnxlib import onnx


class SkipReason(str, enum.Enum):
    """Why a BatchNormalization was left in the model. The value is the stable code used in JSON."""

    TRAINING_MODE = "training-mode"
    """BN uses batch statistics (``training_mode=1``, ``is_test=0``, or ``track_running_stats=False``)."""
    EXTRA_OUTPUTS_USED = "extra-outputs-used"
    """BN's running-mean/var or saved-statistics outputs are consumed."""
    SPATIAL_0 = "spatial-0"
    """Opset <= 8 BN with ``spatial=0`` (per-element statistics)."""
    NO_PRODUCER = "no-producer"
    """BN's input is a graph input, an initializer or an outer-scope value: nothing to absorb it."""
    UNSUPPORTED_PRODUCER = "unsupported-producer"
    """BN follows an op that cannot absorb an affine map (Relu, Concat, Add of activations...)."""
    PRODUCER_OUTPUT_SHARED = "producer-output-shared"
    """The producer's output also feeds another node, or is a graph output."""
    NON_CONSTANT_BN_PARAM = "non-constant-bn-param"
    """A BN scale/bias/mean/var is computed at run time or can be overridden (initializer listed as input)."""
    NON_CONSTANT_WEIGHT = "non-constant-weight"
    """The producer's weight or bias is computed at run time or can be overridden."""
    QUANTIZED_WEIGHT = "quantized-weight"
    """The producer's weight comes from DequantizeLinear (QDQ model)."""
    SHAPE_MISMATCH = "shape-mismatch"
    """BN parameter shapes do not match the producer's output channels."""
    CHANNEL_AXIS_MISMATCH = "channel-axis-mismatch"
    """BN's channel axis is not provably the producer's output-channel axis (e.g. MatMul on rank-3 input)."""
    BIAS_NOT_PER_CHANNEL = "bias-not-per-channel"
    """The producer's bias (Gemm C, the Add constant) is not per output channel."""
    NOT_REPRESENTABLE = "not-representable"
    """Folded values overflow, underflow or turn NaN in the weight's dtype."""
    UNSUPPORTED_DTYPE = "unsupported-dtype"
    """Weights of a dtype the fold does not handle (integers, ...)."""
    UNSUPPORTED_ATTRIBUTE = "unsupported-attribute"
    """An attribute (or its absence) that makes the layer's output axis unknown."""
    VERIFICATION_FAILED = "verification-failed"
    """The fold was applied, its local output diverged under onnxruntime, and it was reverted."""
    UNTRACEABLE = "untraceable"
    """PyTorch: the module's dataflow could not be traced, so no pair can be proven."""
    EXCLUDED = "excluded"
    """The caller asked not to fold this BN."""
    CONSTANT_ON_LAST_AXIS = "constant-on-last-axis"
    """A Mul/Add/Sub/Div constant of shape (C,) on a tensor of rank > 2 broadcasts over the LAST
    axis, not the channel axis (onnxslim folds it as per-channel, wrongly)."""
    NOT_PER_CHANNEL = "not-per-channel"
    """A Mul/Add/Sub/Div constant varies along more than one axis, e.g. (1,C,H,W): not a per-channel map."""
    DIVISION_BY_ZERO = "division-by-zero"
    """A Div by a constant with a zero element: ``x / 0`` is not ``W / 0``."""
    AXIS_NOT_PRESERVED = "axis-not-preserved"
    """A Reshape/Flatten/Squeeze/Unsqueeze between the layer and the map does not provably keep
    the channel axis (static shapes missing, or channels merged/split with another axis)."""
    FORWARD_PADDING = "forward-padding"
    """A map before a zero-padded Conv has a non-zero shift: the padded borders would not see it,
    so folding it forward is not exact."""


@dataclass(frozen=True)
class Folded:
    """One BatchNormalization merged into the layer that produces its input."""

    bn: str
    """Name of the BN node (ONNX) or qualified module name (PyTorch)."""
    producer: str
    """Name of the node/module that absorbed it."""
    producer_op: str
    """``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul`` (ONNX) or the module class (PyTorch)."""
    output: str
    """The BN's output tensor name, which the producer now writes (ONNX), or "" (PyTorch)."""
    graph: str = ""
    """Where the node lives: "" for the main graph, else e.g. ``If_0/then_branch`` or ``function:name``."""
    new_initializers: tuple[str, ...] = ()
    """Initializers created by this fold (a shared weight gets its own copy)."""
    source: str = "batchnorm"
    """What was absorbed: ``batchnorm``, ``mul-add chain`` (Mul/Add/Sub/Div by per-channel
    constants) or ``bias add`` (an Add/Sub of a per-channel constant alone)."""
    direction: str = "backward"
    """``backward``: into the layer before the map; ``forward``: into the layer after it."""
    through: tuple[str, ...] = ()
    """Op types looked through between the map and the layer (Identity, Transpose, Reshape...)."""

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)


@dataclass(frozen=True)
class Skipped:
    """One BatchNormalization left in the model, and why."""

    bn: str
    reason: SkipReason
    detail: str
    """A sentence a person can act on."""
    output: str = ""
    graph: str = ""
    producer: str = ""
    producer_op: str = ""
    source: str = "batchnorm"
    """What was left: a ``batchnorm`` node, or a ``mul-add chain``/``bias add`` after a layer
    that matches a foldable shape but was refused (see :attr:`Folded.source`)."""

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)


@dataclass(frozen=True)
class FoldReport:
    """What a fold pass did: every BN either folded or skipped with a reason."""

    folded: tuple[Folded, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    @property
    def bn_total(self) -> int:
        return len(self.folded) + len(self.skipped)

    def skipped_by_reason(self) -> dict[SkipReason, list[Skipped]]:
        out: dict[SkipReason, list[Skipped]] = {}
        for s in self.skipped:
            out.setdefault(s.reason, []).append(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn_folded": len(self.folded),
            "bn_left": len(self.skipped),
            "folded": [f.to_dict() for f in self.folded],
            "skipped": [s.to_dict() for s in self.skipped],
        }


class VerifyStatus(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    NOT_RUN = "not-run"
    """onnxruntime could not load or run a model: never counts as a pass."""


@dataclass(frozen=True)
class TensorDiff:
    """Comparison of one tensor (a graph output or a shared intermediate) over all samples."""

    name: str
    kind: str
    """``output`` or ``intermediate``."""
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    """max |ref - cand| / scale, where scale is the reference's magnitude (see verify.py)."""
    mean_abs: float
    mismatched: int
    """Elements outside tolerance, over all samples."""
    total: int
    atol: float
    rtol: float
    passed: bool
    worst_channel: int | None = None
    """Axis-1 channel with the largest relative error, for intermediates of rank >= 2."""
    nan_inf_mismatch: bool = False
    noise: float = 0.0
    """Calibrated noise allowance, in the unit of ``max_rel``: how far a correct fold was measured to
    move this tensor (the reference run twice, differing only in float rounding), times a factor;
    added to ``rtol`` (see bnfold.verify.compare). 0 when not calibrated."""
    matched_by: str = "name"
    """How the candidate's tensor was paired with the reference's: ``name`` (the same name),
    ``fold-alias`` (the candidate's layer kept its own output name after absorbing the BN, so that
    name holds the reference's BN output) or ``structure`` (renamed, matched by op and inputs)."""

    @property
    def mismatched_fraction(self) -> float:
        return self.mismatched / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["mismatched_fraction"] = self.mismatched_fraction
        return d


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class VerifyReport:
    status: VerifyStatus
    outputs: tuple[TensorDiff, ...] = ()
    intermediates: tuple[TensorDiff, ...] = ()
    weights: tuple[TensorDiff, ...] = ()
    """Fold points checked statically (kind ``weights``): the candidate's stored weights against
    the reference's BN folded in float64, per element, in ulps (see bnfold.verify.weights)."""
    inputs: tuple[InputSpec, ...] = ()
    samples: int = 0
    seed: int | None = None
    input_source: str = "generated"
    """``generated``, ``npz:PATH``, ``pb-dir:PATH`` or ``user``."""
    compared_on: str = "outputs+intermediates"
    """``outputs+intermediates`` when the models share tensor names, else ``outputs``."""
    first_divergent: tuple[str, ...] = ()
    """Shared tensors that diverge while every tensor upstream of them matches, and fold points
    whose weights check failed, in graph order."""
    suspect_folds: tuple[str, ...] = ()
    """BN output names (fold points) whose tensors diverged first (filled when a FoldReport is known)."""
    message: str = ""
    """Why it failed or was not run, in one sentence."""
    onnxruntime_version: str = ""
    provider: str = "CPUExecutionProvider"
    candidate_runs_optimized: bool | None = None
    """Whether the candidate also loaded and ran at onnxruntime's default optimization level."""
    seconds: float = 0.0
    calibrated: bool | None = None
    """Whether tolerances were calibrated per tensor (the reference also ran at onnxruntime's
    ``ORT_ENABLE_BASIC``, which folds BN itself); False when that run failed, None when not attempted."""
    reverted: tuple[Skipped, ...] = ()
    """Folds that diverged and were reverted before this result (reason ``verification-failed``,
    with why): a PASSED report with reverted folds passed only without them."""
    matched: Mapping[str, int] = field(default_factory=dict)
    """Intermediate tensors compared, counted by how they were paired: ``name``, ``fold-alias``,
    ``structure`` (see ``TensorDiff.matched_by``)."""
    bound_dims: Mapping[str, int] = field(default_factory=dict)
    """Symbolic input dimensions nothing fixed, bound automatically: symbol -> size used."""

    @property
    def passed(self) -> bool:
        return self.status is VerifyStatus.PASSED

    def to_dict(self) -> dict[str, Any]:
        d = _asdict(self)
        d["passed"] = self.passed
        return d


@dataclass(frozen=True)
class FoldResult:
    """What :func:`bnfold.fold_onnx` returns."""

    model: onnx.ModelProto
    """The folded model."""
    report: FoldReport
    verification: VerifyReport | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"report": self.report.to_dict(), "seconds": self.seconds}
        d["verification"] = self.verification.to_dict() if self.verification else None
        return d


class ExportExtra(TypedDict, total=False):
    """``ExportResult.extra``: how the module was exported and checked against torch."""

    exporter: str
    """``torchscript`` or ``dynamo``."""
    torch_vs_onnx: VerifyReport
    """The saved ONNX model against the torch module's outputs on the example inputs."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`bnfold.export` returns."""

    path: str
    module_report: FoldReport
    onnx_report: FoldReport
    verification: VerifyReport | None = None
    extra: ExportExtra = field(default_factory=ExportExtra)

    def to_dict(self) -> dict[str, Any]:
        return _asdict(self)


def jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # strict JSON has no NaN/Infinity
        return str(value)
    return value


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
