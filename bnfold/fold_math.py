"""Fold arithmetic: numpy only, float64 inside, one rounding to the weight's dtype.

A BatchNormalization in inference mode is a per-channel affine map on axis 1 of its input
(ONNX BatchNormalization, all opsets; ``epsilon`` defaults to 1e-5)::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

When ``x`` is the output of a layer that is linear in its weight ``W`` along the output
channel axis, ``x = L(W) + b``, the map folds into the layer::

    W' = W * scale   (along the weight's output-channel axis)
    b' = b * scale + shift     (b = 0 when the layer has no bias)

The weight's output-channel axis is: 0 for Conv ``(C_out, C_in/g, k...)``; for ConvTranspose
``(C_in, C_out/g, k...)`` it is axis 1 *within each group* (output channel ``gi * C_out/g + j``
comes from weight rows of group ``gi``, column ``j``); for Gemm/MatMul ``B (K, N)`` axis 1, and
for Gemm with ``transB=1`` ``B (N, K)`` axis 0.

BatchNormalization is one source of ``(scale, shift)``; any per-channel affine map (a Mul/Add
by per-channel constants) folds with the same functions.

Everything is computed in float64 from the stored values and rounded once to the destination
dtype; :func:`cast_exact` refuses a result that overflows, turns NaN, or flushes a channel that
was non-zero to all zeros (float16 peers write ``inf`` when gamma/sqrt(var+eps) > 65504).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

DEFAULT_EPSILON = 1e-5  # ONNX BatchNormalization: "epsilon (float, default 1e-05)"


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y = scale * x + shift`` on a layer's output-channel axis."""

    scale: np.ndarray  # float64, shape (C,)
    shift: np.ndarray  # float64, shape (C,)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float = DEFAULT_EPSILON
) -> Affine:
    """The inference-mode BatchNormalization as an :class:`Affine`, computed in float64.

    ``epsilon`` is taken as the float32 value stored in the ONNX attribute (the runtime adds it
    in float32 too), then widened.
    """
    g = np.asarray(gamma, dtype=np.float64).reshape(-1)
    b = np.asarray(beta, dtype=np.float64).reshape(-1)
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    v = np.asarray(var, dtype=np.float64).reshape(-1)
    eps = float(np.float32(epsilon))
    scale = g / np.sqrt(v + eps)
    shift = b - m * scale
    return Affine(scale=scale, shift=shift)


def scale_weight(weight: np.ndarray, scale: np.ndarray, *, axis: int, groups: int = 1) -> np.ndarray:
    """``weight * scale`` along ``axis`` in float64.

    ``groups > 1`` with ``axis == 1`` is the ConvTranspose layout ``(C_in, C_out/g, k...)``: the
    output channel of element ``[i, j, ...]`` is ``(i // (C_in/g)) * (C_out/g) + j``.
    """
    w = np.asarray(weight, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if groups > 1:
        if axis != 1:
            raise ValueError("grouped scaling is only defined for the ConvTranspose layout (axis 1)")
        c_in, c_out_g = w.shape[0], w.shape[1]
        if c_in % groups or s.shape[0] != c_out_g * groups:
            raise ValueError(f"weight {w.shape} does not match {s.shape[0]} channels in {groups} groups")
        grouped = w.reshape((groups, c_in // groups, c_out_g) + w.shape[2:])
        s_shape = (groups, 1, c_out_g) + (1,) * (w.ndim - 2)
        return (grouped * s.reshape(s_shape)).reshape(w.shape)
    if s.shape[0] != w.shape[axis]:
        raise ValueError(f"weight axis {axis} has {w.shape[axis]} channels, scale has {s.shape[0]}")
    shape = [1] * w.ndim
    shape[axis] = s.shape[0]
    return w * s.reshape(shape)


def scale_weight_exact(
    weight: np.ndarray, scale: np.ndarray, *, axis: int, groups: int = 1
) -> tuple[np.ndarray | None, str]:
    """``weight * scale`` computed in float64 and rounded once to ``weight.dtype``.

    Same result as ``cast_exact(scale_weight(...), weight.dtype)``, but for numpy's own float
    dtypes the float64 product is formed in small buffered chunks by the ufunc and never held
    whole: one pass over the weight, no full-size float64 temporary. Returns ``(None, why)``
    when a value overflows, turns NaN, or a non-zero output channel underflows to all zeros.
    """
    w = np.asarray(weight)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if w.dtype not in (np.float16, np.float32, np.float64):  # bfloat16 etc.: the two-step path
        v = scale_weight(w, s, axis=axis, groups=groups)
        return cast_exact(v, w.dtype, channel_axis=None if groups > 1 else axis, original=w)
    if groups > 1:
        c_in, c_out_g = w.shape[0], w.shape[1]
        view = w.reshape((groups, c_in // groups, c_out_g, -1))
        s_b = s.reshape(groups, 1, c_out_g, 1)
        ch_axes: tuple[int, ...] = (1, 3)
    else:
        if s.shape[0] != w.shape[axis]:
            raise ValueError(f"weight axis {axis} has {w.shape[axis]} channels, scale has {s.shape[0]}")
        view = w
        shape = [1] * w.ndim
        shape[axis] = s.shape[0]
        s_b = s.reshape(shape)
        ch_axes = tuple(a for a in range(w.ndim) if a != axis)
    out = np.empty(view.shape, dtype=w.dtype)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        np.multiply(view, s_b, out=out, dtype=np.float64, casting="unsafe")
    if not np.isfinite(out).all():
        if np.isnan(out).any() and not np.isnan(view).any():
            return None, "the folded values contain NaN"
        new_inf = np.isinf(out) & np.isfinite(view)
        if new_inf.any():
            return None, f"a folded value overflows {w.dtype.name}"
    nz_out = np.any(out != 0, axis=ch_axes).reshape(-1) if ch_axes else (out != 0).reshape(-1)
    if not nz_out.all():
        nz_w = np.any(view != 0, axis=ch_axes).reshape(-1) if ch_axes else (view != 0).reshape(-1)
        flushed = np.flatnonzero(nz_w & (s != 0) & ~nz_out)
        if flushed.size:
            return None, f"channel {int(flushed[0])} underflows to zero in {w.dtype.name}"
    return out.reshape(w.shape), ""


DEFER_MIN_BYTES = 64 * 1024
"""Smaller weights are scaled at once (:func:`scale_weight_planned`): one pass instead of a
decision pass and a compute pass, and they weigh little in memory."""


@dataclass(frozen=True, eq=False)
class ScaledWeight:
    """``W * scale`` along an axis, rounded once to W's dtype: decided, not yet computed.

    :func:`scale_weight_planned` decides on one read pass that every value is representable;
    the values are then computed where they are written (:meth:`rows`, a block of rows at a
    time), with the same float64 multiply and rounding as :func:`scale_weight_exact`, so they
    are bit-identical to it. ``source`` is the weight the decision was made on (None once the
    recipe is stored apart from it: the values are then computed from the stored weight).

    ``ticket`` is set on a recipe made without the decision (:mod:`bnfold.fold_optimistic`):
    whoever computes its values checks them (:meth:`apply`; ``rows_accepted`` where they are
    written) and raises :class:`Undecided` where the decision might have refused them.
    """

    scale: np.ndarray  # float64 (C,)
    axis: int
    groups: int
    dtype: np.dtype
    shape: tuple[int, ...]
    source: np.ndarray | None = None
    ticket: Ticket | None = None

    @property
    def decided(self) -> bool:
        return self.ticket is None

    def rows(self, w: np.ndarray, start: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start : start + n`` (along axis 0) of the result, from the same rows of W.

        ``out``: a buffer of at least ``w.size`` elements of the dtype to write them into (a
        writer reuses one, so no block costs fresh pages)."""
        w = np.asarray(w).reshape((-1,) + self.shape[1:])
        n, ndim = w.shape[0], len(self.shape)
        s = self.scale
        if self.groups > 1:  # ConvTranspose (C_in, C_out/g, k...): row i is in group i // (C_in/g)
            per, c_out_g = self.shape[0] // self.groups, self.shape[1]
            group = np.arange(start, start + n) // per
            s_b = s[group[:, None] * c_out_g + np.arange(c_out_g)[None, :]]
            s_b = s_b.reshape((n, c_out_g) + (1,) * (ndim - 2))
        elif self.axis == 0:
            s_b = s[start : start + n].reshape((n,) + (1,) * (ndim - 1))
        else:
            shape = [1] * ndim
            shape[self.axis] = s.shape[0]
            s_b = s.reshape(shape)
        result = np.empty(w.shape, dtype=self.dtype) if out is None else out[: w.size].reshape(w.shape)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            np.multiply(w, s_b, out=result, dtype=np.float64, casting="unsafe")
        return result

    def apply(self, weight: np.ndarray | None = None) -> np.ndarray:
        """The whole result, from ``weight`` (default: ``source``). An undecided recipe is
        decided here, as :func:`scale_weight_exact` decides: :class:`Undecided` if it refuses."""
        w = self.source if weight is None else weight
        if w is None:
            raise ValueError("ScaledWeight.apply: no weight to scale")
        if self.ticket is None:
            return self.rows(w, 0).reshape(self.shape)
        w = np.asarray(w).reshape(self.shape)
        out, why = scale_weight_exact(w, self.scale, axis=self.axis, groups=self.groups)
        if out is None:
            raise Undecided(f"a fold computed before it was decided is refused: {why}")
        self.ticket.checked()
        return out

    def detached(self) -> ScaledWeight:
        """The recipe without its source weight (what a deferred tensor keeps)."""
        return replace(self, source=None)


def scale_weight_planned(
    weight: np.ndarray, scale: np.ndarray, *, axis: int, groups: int = 1
) -> tuple[ScaledWeight | np.ndarray | None, str]:
    """:func:`scale_weight_exact`, decided now and computed later where that is exact.

    For a finite float16/32/64 weight and a finite scale, one read pass decides: a channel's
    largest ``|W|`` times ``|scale|`` (float64 multiplication and the rounding to the dtype
    are both monotone and symmetric) overflows exactly when some value of the channel does,
    and rounds to zero exactly when every value of the channel does. Returns a
    :class:`ScaledWeight`, or what :func:`scale_weight_exact` returns (the array, or
    ``(None, why)`` with the same reason) in every other case, and for weights under
    :data:`DEFER_MIN_BYTES`.
    """
    w = np.asarray(weight)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if (
        w.nbytes < DEFER_MIN_BYTES
        or w.dtype not in (np.float16, np.float32, np.float64)
        or w.ndim == 0
        or not w.size
        or not np.isfinite(s).all()
    ):
        return scale_weight_exact(w, s, axis=axis, groups=groups)
    if groups > 1:
        if axis != 1 or w.ndim < 2 or w.shape[0] % groups or s.shape[0] != w.shape[1] * groups:
            return scale_weight_exact(w, s, axis=axis, groups=groups)
        view = w.reshape((groups, w.shape[0] // groups, w.shape[1], -1))
        ch_axes: tuple[int, ...] = (1, 3)
    else:
        if s.shape[0] != w.shape[axis]:
            raise ValueError(f"weight axis {axis} has {w.shape[axis]} channels, scale has {s.shape[0]}")
        view = w
        ch_axes = tuple(a for a in range(w.ndim) if a != axis)
    if groups == 1 and axis == 0 and w.ndim >= 2:
        amax = _row_abs_max(w.reshape(w.shape[0], -1))
    else:
        hi = view.max(axis=ch_axes) if ch_axes else view
        lo = view.min(axis=ch_axes) if ch_axes else view
        amax = np.maximum(hi.astype(np.float64), -lo.astype(np.float64)).reshape(-1)
    if not np.isfinite(amax).all():  # NaN or inf in the weight: the full check
        return scale_weight_exact(w, s, axis=axis, groups=groups)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        peak = (amax * np.abs(s)).astype(w.dtype)
    if np.isinf(peak).any():
        return None, f"a folded value overflows {w.dtype.name}"
    flushed = np.flatnonzero((amax != 0) & (s != 0) & (peak == 0))
    if flushed.size:
        return None, f"channel {int(flushed[0])} underflows to zero in {w.dtype.name}"
    return ScaledWeight(s, axis, groups, w.dtype, tuple(w.shape), w), ""


_REDUCE_BLOCK = 256 << 10
"""Bytes of rows reduced at a time: the min pass then reads what the max pass left in cache."""


def _row_abs_max(rows: np.ndarray) -> np.ndarray:
    """``max |rows[i]|`` per row in float64 (NaN when a row holds one), from the largest and the
    smallest value, a block of rows at a time."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    step = max(1, _REDUCE_BLOCK // max(1, rows.shape[1] * rows.itemsize))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        hi = block.max(axis=1).astype(np.float64)
        np.maximum(hi, -block.min(axis=1).astype(np.float64), out=out[start : start + step])
    return out


class Undecided(Exception):
    """A fold computed before it was decided (:mod:`bnfold.fold_optimistic`) may be one the
    decision refuses. Internal: ``bnfold.api.fold_path`` redoes the fold deciding first."""


class Ticket:
    """The standing of a recipe made without the decision: the weight and scale to decide on,
    until its values are checked (:meth:`checked`) or handed to a tensor that is checked where
    it is written (:meth:`deferred`)."""

    __slots__ = ("is_checked", "is_deferred", "scale", "weight")

    def __init__(self, weight: np.ndarray, scale: np.ndarray) -> None:
        self.weight: np.ndarray | None = weight
        self.scale = scale
        self.is_checked = False
        self.is_deferred = False

    def checked(self) -> None:
        self.is_checked, self.weight = True, None

    def deferred(self) -> None:
        self.is_deferred, self.weight = True, None


def fold_bias(bias: np.ndarray | None, affine: Affine) -> np.ndarray:
    """``b * scale + shift`` in float64; a missing bias is zero."""
    if bias is None:
        return affine.shift.copy()
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    return b * affine.scale + affine.shift


def cast_exact(
    values: np.ndarray,
    dtype: np.dtype,
    *,
    channel_axis: int | None = None,
    original: np.ndarray | None = None,
) -> tuple[np.ndarray | None, str]:
    """Round float64 ``values`` once to ``dtype``.

    Returns ``(array, "")`` or ``(None, why)`` when the result is not representable: a finite
    value becomes inf, a value is NaN, or a channel that is non-zero in float64 (and was non-zero
    in ``original``, if given) rounds to all zeros.
    """
    v64 = np.asarray(values, dtype=np.float64)
    if np.isnan(v64).any() and not (
        original is not None and np.isnan(np.asarray(original, np.float64)).any()
    ):
        return None, "the folded values contain NaN"
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        out = v64.astype(dtype)
    out64 = out.astype(np.float64)
    new_inf = np.isinf(out64) & np.isfinite(v64)
    if new_inf.any():
        worst = float(np.abs(v64[new_inf]).max())
        return None, f"a folded value ({worst:.4g}) overflows {np.dtype(dtype).name}"
    if channel_axis is not None and v64.ndim > 0 and v64.size:
        axes = tuple(a for a in range(v64.ndim) if a != channel_axis)
        nonzero64 = np.any(v64 != 0, axis=axes) if axes else v64 != 0
        nonzero_out = np.any(out64 != 0, axis=axes) if axes else out64 != 0
        flushed = nonzero64 & ~nonzero_out
        if flushed.any():
            ch = int(np.flatnonzero(flushed)[0])
            return None, f"channel {ch} underflows to zero in {np.dtype(dtype).name}"
    return out, ""


def channel_vector(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A bias-like constant as a float64 ``(channels,)`` vector when it is constant per channel.

    Accepts a scalar, ``(C,)``, ``(1, C)``, ``(1, 1)``... (anything that broadcasts along the
    last axis of a rank-2 output without depending on the row). Returns None otherwise.
    """
    v = np.asarray(value, dtype=np.float64)
    if v.ndim > 2:
        return None
    if v.ndim == 2:
        if v.shape[0] != 1:
            return None
        v = v[0]
    if v.ndim == 0 or v.shape[0] == 1:
        return np.full((channels,), float(v.reshape(-1)[0]) if v.size else 0.0)
    if v.shape[0] != channels:
        return None
    return v.copy()


# --------------------------------------------------------------------------- forward folds
#
# A map before a layer, ``x' = s * x + t`` on the layer's input-channel axis, folds forward:
#
#     Gemm/MatMul  B (K, N):  B' = diag(s) B,                     b' = b + t B
#     Conv   W (C_out, C_in/g, k...):  W'[o, i] = W[o, i] * s[c(o, i)],
#                                      b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c(o, i)]
#
# with ``c(o, i) = (o // (C_out/g)) * (C_in/g) + i`` the input channel that weight column ``i`` of
# output ``o`` reads. The Conv shift is exact only without padding: a zero-padded border never
# saw ``t``; callers refuse a non-zero shift into a padded Conv.


def conv_input_channels(weight_shape: tuple[int, ...], groups: int) -> np.ndarray:
    """``c(o, i)`` for a Conv weight ``(C_out, C_in/g, k...)``: an int array of shape (C_out, C_in/g)."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    if c_out % groups:
        raise ValueError(f"{c_out} output channels do not split into {groups} groups")
    group_of = np.arange(c_out) // (c_out // groups)
    return group_of[:, None] * c_in_g + np.arange(c_in_g)[None, :]


def forward_conv(
    weight: np.ndarray, affine: Affine, groups: int
) -> tuple[np.ndarray | None, str, np.ndarray]:
    """The Conv forward fold: ``(W' rounded once to W's dtype or None, why, bias delta float64 (C_out,))``."""
    w64 = np.asarray(weight, dtype=np.float64)
    cols = conv_input_channels(weight.shape, groups)
    extra = (1,) * (weight.ndim - 2)
    s = affine.scale[cols].reshape(cols.shape + extra)
    t = affine.shift[cols].reshape(cols.shape + extra)
    delta = (w64 * t).reshape(weight.shape[0], -1).sum(axis=1)
    if np.all(affine.scale == 1.0):
        return np.asarray(weight), "", delta
    out, why = cast_exact(w64 * s, np.asarray(weight).dtype, channel_axis=0, original=weight)
    return out, why, delta


def forward_matrix(
    b: np.ndarray, affine: Affine, *, k_axis: int
) -> tuple[np.ndarray | None, str, np.ndarray]:
    """The Gemm/MatMul forward fold for ``B`` with its K (input-feature) axis ``k_axis``:
    ``(B' or None, why, t·B float64 (N,))``."""
    b64 = np.asarray(b, dtype=np.float64)
    delta = affine.shift @ (b64 if k_axis == 0 else b64.T)
    if np.all(affine.scale == 1.0):
        return np.asarray(b), "", delta
    out, why = scale_weight_exact(b, affine.scale, axis=k_axis)
    return out, why, delta
