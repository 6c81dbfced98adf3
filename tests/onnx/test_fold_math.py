"""bnfold.fold_math: the fold arithmetic, in float64 with one rounding; the grouped
ConvTranspose layout; refusals of values the weight dtype cannot hold."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold import fold_math
from conftest import bn_stats


def test_bn_affine_matches_the_definition_in_float64(rng):
    gamma, beta, mean, var = bn_stats(rng, 5)
    aff = fold_math.bn_affine(gamma, beta, mean, var, 1e-3)
    eps = float(np.float32(1e-3))  # the attribute is a float32
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    assert aff.scale.dtype == np.float64 and aff.channels == 5
    np.testing.assert_array_equal(aff.scale, s)
    np.testing.assert_array_equal(aff.shift, beta.astype(np.float64) - mean.astype(np.float64) * s)
    x = rng.normal(0, 1, 5)
    g64, b64, m64, v64 = (a.astype(np.float64) for a in (gamma, beta, mean, var))
    bn = g64 * (x - m64) / np.sqrt(v64 + eps) + b64
    np.testing.assert_allclose(aff.scale * x + aff.shift, bn, rtol=1e-12, atol=1e-12)


def test_default_epsilon_is_the_spec_value():
    assert fold_math.DEFAULT_EPSILON == 1e-5


@pytest.mark.parametrize("axis", [0, 1])
def test_scale_weight_along_an_axis(rng, axis):
    w = rng.normal(0, 1, (4, 6, 3))
    s = rng.normal(0, 1, w.shape[axis])
    out = fold_math.scale_weight(w, s, axis=axis)
    expected = w * (s[:, None, None] if axis == 0 else s[None, :, None])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_conv_transpose_scales_each_groups_output_channels(rng, groups):
    """ConvTranspose weight (C_in, C_out/g, k): output channel of [i, j] is (i // (C_in/g)) *
    (C_out/g) + j. torch's fuse_conv_bn_weights scales axis 1 as if there were one group."""
    c_in, c_out_g = 2 * groups, 3
    w = rng.normal(0, 1, (c_in, c_out_g, 2, 2)).astype(np.float32).astype(np.float64)
    s = rng.normal(0, 1, c_out_g * groups)
    expected = np.empty_like(w)
    for i in range(c_in):
        for j in range(c_out_g):
            expected[i, j] = w[i, j] * s[(i // (c_in // groups)) * c_out_g + j]
    np.testing.assert_array_equal(fold_math.scale_weight(w, s, axis=1, groups=groups), expected)
    out, why = fold_math.scale_weight_exact(w.astype(np.float32), s, axis=1, groups=groups)
    assert why == "" and out is not None
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_grouped_scaling_rejects_a_layout_that_does_not_split():
    with pytest.raises(ValueError):
        fold_math.scale_weight(np.ones((3, 2, 1)), np.ones(4), axis=1, groups=2)
    with pytest.raises(ValueError):
        fold_math.scale_weight(np.ones((4, 2, 1)), np.ones(4), axis=0, groups=2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_exact_scaling_rounds_once_from_float64(rng, dtype):
    w = rng.normal(0, 1, (6, 4, 3, 3)).astype(dtype)
    s = rng.normal(0, 2, 6)
    out, why = fold_math.scale_weight_exact(w, s, axis=0)
    assert why == "" and out is not None and out.dtype == np.dtype(dtype)
    two_step, _ = fold_math.cast_exact(fold_math.scale_weight(w, s, axis=0), np.dtype(dtype))
    np.testing.assert_array_equal(out, two_step)
    np.testing.assert_array_equal(out, (w.astype(np.float64) * s[:, None, None, None]).astype(dtype))


def test_float16_overflow_is_refused_not_written_as_inf():
    out, why = fold_math.scale_weight_exact(
        np.full((2, 1, 1), 100, np.float16), np.array([1000.0, 1.0]), axis=0
    )
    assert out is None and "overflows float16" in why
    out, why = fold_math.cast_exact(np.array([7e4]), np.dtype(np.float16))
    assert out is None and "overflows" in why


def test_float16_product_that_fits_is_kept_even_when_the_scale_alone_overflows():
    out, why = fold_math.scale_weight_exact(np.full((1, 1, 1), 1e-3, np.float16), np.array([1e6]), axis=0)
    assert why == "" and out is not None and np.isfinite(out).all()
    assert abs(float(out.reshape(-1)[0]) - 1000.0) < 1.0


def test_a_channel_flushed_to_zero_is_refused():
    w = np.full((2, 1, 1), 1e-4, np.float16)
    out, why = fold_math.scale_weight_exact(w, np.array([1e-6, 1.0]), axis=0)
    assert out is None and "channel 0 underflows" in why
    out, why = fold_math.cast_exact(np.array([1e-10, 1.0]), np.dtype(np.float16), channel_axis=0)
    assert out is None and "channel 0" in why


def test_a_zero_scale_channel_is_not_an_underflow():
    out, why = fold_math.scale_weight_exact(np.ones((2, 1, 1), np.float16), np.array([0.0, 1.0]), axis=0)
    assert why == "" and out is not None and not out[0].any()


def test_nan_is_refused_unless_the_weight_had_it():
    out, why = fold_math.cast_exact(np.array([np.nan]), np.dtype(np.float32))
    assert out is None and "NaN" in why
    out, why = fold_math.cast_exact(np.array([np.nan]), np.dtype(np.float32), original=np.array([np.nan]))
    assert out is not None and why == ""


def test_fold_bias_with_and_without_a_bias(rng):
    aff = fold_math.Affine(scale=rng.normal(0, 1, 4), shift=rng.normal(0, 1, 4))
    np.testing.assert_array_equal(fold_math.fold_bias(None, aff), aff.shift)
    b = rng.normal(0, 1, 4).astype(np.float32)
    np.testing.assert_array_equal(fold_math.fold_bias(b, aff), b.astype(np.float64) * aff.scale + aff.shift)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [
        ((), True),
        ((1,), True),
        ((4,), True),
        ((1, 4), True),
        ((1, 1), True),
        ((3,), False),
        ((2, 4), False),
        ((1, 1, 4), False),
    ],
    ids=str,
)
def test_channel_vector_accepts_only_per_column_constants(shape, ok):
    v = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1
    out = fold_math.channel_vector(v, 4)
    assert (out is not None) == ok
    if ok:
        assert out.shape == (4,)
        np.testing.assert_array_equal(
            out, np.broadcast_to(v.reshape(-1), (4,)) if v.size > 1 else np.full(4, v.item())
        )


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_forward_conv_scales_each_input_channel_and_moves_the_shift_into_the_bias(rng, groups):
    """conv(s*x + t) == conv'(x) for an unpadded Conv, checked on a direct float64 convolution."""
    c_in, c_out = 4, 8
    w = rng.normal(0, 1, (c_out, c_in // groups, 2, 2)).astype(np.float32)
    aff = fold_math.Affine(scale=rng.uniform(0.5, 2, c_in), shift=rng.normal(0, 1, c_in))
    w_new, why, delta = fold_math.forward_conv(w, aff, groups)
    assert why == "" and w_new is not None and w_new.dtype == np.float32

    def conv(x, weight):  # x (C_in, 2, 2) with a 2x2 kernel: one output position
        out = np.zeros(c_out)
        for o in range(c_out):
            g = o // (c_out // groups)
            chans = range(g * (c_in // groups), (g + 1) * (c_in // groups))
            out[o] = sum((weight[o, i] * x[c]).sum() for i, c in enumerate(chans))
        return out

    x = rng.normal(0, 1, (c_in, 2, 2))
    normalized = aff.scale[:, None, None] * x + aff.shift[:, None, None]
    expected = conv(normalized, w.astype(np.float64))
    got = conv(x, w_new.astype(np.float64)) + delta
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k_axis", [0, 1])
def test_forward_matrix_scales_rows_of_b_and_returns_t_b(rng, k_axis):
    b = rng.normal(0, 1, (5, 3) if k_axis == 0 else (3, 5)).astype(np.float32)
    aff = fold_math.Affine(scale=rng.uniform(0.5, 2, 5), shift=rng.normal(0, 1, 5))
    b_new, why, delta = fold_math.forward_matrix(b, aff, k_axis=k_axis)
    assert why == "" and b_new is not None
    b_kn = (b if k_axis == 0 else b.T).astype(np.float64)
    x = rng.normal(0, 1, (4, 5))
    expected = (x * aff.scale + aff.shift) @ b_kn
    got = x @ (b_new if k_axis == 0 else b_new.T).astype(np.float64) + delta
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_forward_folds_refuse_what_the_dtype_cannot_hold():
    aff = fold_math.Affine(scale=np.array([1e6, 1.0]), shift=np.zeros(2))
    w, why, _ = fold_math.forward_conv(np.full((1, 2, 1, 1), 100, np.float16), aff, 1)
    assert w is None and "overflows" in why
    b, why, _ = fold_math.forward_matrix(np.full((2, 1), 100, np.float16), aff, k_axis=0)
    assert b is None and "overflows" in why


def _planned_as_exact(w, s, axis, groups):
    assert w.nbytes >= fold_math.DEFER_MIN_BYTES  # the tests below lower the threshold
    planned, why = fold_math.scale_weight_planned(w, s, axis=axis, groups=groups)
    if isinstance(planned, fold_math.ScaledWeight):
        return planned.apply(), why
    return planned, why


_EDGE_CASES = {
    # name: (dtype, scale factory, weight tweak)
    "plain-f32": (np.float32, lambda c: np.linspace(-2, 3, c), None),
    "f16-overflow": (np.float16, lambda c: np.full(c, 2e4), None),
    "f16-one-channel-overflows": (np.float16, lambda c: np.r_[np.ones(c - 1), 7e4], None),
    "f16-flush": (np.float16, lambda c: np.r_[np.ones(c - 1), 1e-12], None),
    "f16-edge-of-range": (np.float16, lambda c: np.full(c, 65504.0 / 3.0), "ones-times-3"),
    "f32-flush": (np.float32, lambda c: np.r_[1e-50, np.ones(c - 1)], None),
    "zero-scale": (np.float32, lambda c: np.r_[0.0, np.ones(c - 1)], None),
    "zero-channel": (np.float32, lambda c: np.full(c, 1e-50), "zero-first-channel"),
    "f64-overflow": (np.float64, lambda c: np.full(c, 1e300), "big"),
    "nan-weight": (np.float32, lambda c: np.ones(c) * 2, "nan"),
    "inf-weight": (np.float32, lambda c: np.ones(c) * 2, "inf"),
    "inf-scale": (np.float32, lambda c: np.r_[np.inf, np.ones(c - 1)], None),
    "nan-scale": (np.float32, lambda c: np.r_[np.nan, np.ones(c - 1)], None),
}


@pytest.mark.parametrize("case", sorted(_EDGE_CASES), ids=sorted(_EDGE_CASES))
@pytest.mark.parametrize(
    "shape,axis,groups",
    [
        ((6, 4, 3, 3), 0, 1),
        ((8, 3, 3), 1, 2),
        ((5, 6), 1, 1),
        ((6, 5), 0, 1),
        ((6,), 0, 1),
        ((2, 3, 6), 2, 1),
    ],
    ids=["conv", "convtranspose-g2", "gemm-n", "gemm-transb", "vector", "matmul-3d"],
)
def test_planned_scaling_decides_and_computes_exactly_as_the_full_pass(
    case, shape, axis, groups, rng, monkeypatch
):
    """The deferred fold decides on a channel's largest |W|; without exactly the same decisions
    (and reasons) as scale_weight_exact, the streaming save would write a fold the in-memory
    path refuses, or refuse one it takes, and its values would not be bit-identical."""
    dtype, make_scale, tweak = _EDGE_CASES[case]
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    w = rng.standard_normal(shape).astype(dtype)
    channels = shape[1] * groups if groups > 1 else shape[axis]
    if tweak == "ones-times-3":
        w = np.full(shape, 3.0, dtype)
    elif tweak == "zero-first-channel":
        w = np.moveaxis(w, axis, 0).copy()
        w[0] = 0
        w = np.moveaxis(w, 0, axis)
    elif tweak == "big":
        w = (w * 1e10).astype(dtype)
    elif tweak in ("nan", "inf"):
        w.reshape(-1)[1] = np.nan if tweak == "nan" else np.inf
    s = np.asarray(make_scale(channels), dtype=np.float64)
    with np.errstate(all="ignore"):
        expected, why = fold_math.scale_weight_exact(w, s, axis=axis, groups=groups)
        got, got_why = _planned_as_exact(w, s, axis, groups)
    assert got_why == why
    if expected is None:
        assert got is None
    else:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()


def test_scaled_weight_rows_in_blocks_equal_the_whole(rng, monkeypatch):
    """The save computes a deferred weight a block of rows at a time; any block split must give
    the bytes of the whole computation (grouped ConvTranspose included)."""
    monkeypatch.setattr(fold_math, "DEFER_MIN_BYTES", 0)
    for shape, axis, groups in (((8, 3, 2, 2), 1, 4), ((7, 5, 3), 0, 1), ((9, 4), 1, 1)):
        w = rng.standard_normal(shape).astype(np.float32)
        c = shape[1] * groups if groups > 1 else shape[axis]
        planned, _ = fold_math.scale_weight_planned(w, rng.uniform(-2, 2, c), axis=axis, groups=groups)
        whole = planned.apply().tobytes()
        for step in (1, 2, 3):
            parts = [planned.rows(w[i : i + step], i).tobytes() for i in range(0, shape[0], step)]
            assert b"".join(parts) == whole
