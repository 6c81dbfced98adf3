"""bnfold.verify (run, inputs, compare, models): onnxruntime at ORT_DISABLE_ALL, seeded inputs, per-channel comparison of shared tensors.

Candidates are folded by hand here, in float64 numpy (W' = W*s, b' = (b - mean)*s + beta,
s = gamma/sqrt(var + eps)), with the absorbing layer writing the BN's output name, as the
fold pass does. Each injected fault is the smallest the module docstring promises to catch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError, ShapeError
from bnfold.onnx.io import LAZY_THRESHOLD, is_lazy, load_model
from bnfold.report import VerifyStatus
from bnfold.verify import DEFAULT_RTOL, compare, load_inputs, make_inputs, models, verify
from bnfold.verify import inputs as verify_inputs
from conftest import bn_stats

F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- builders


def make_model(nodes, inputs, outputs, inits, *, opset=17, ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    # onnxruntime 1.31 loads IR <= 13; onnx.helper stamps the newest IR by default.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def tensor(name: str, array: np.ndarray, dtype=np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


@dataclass
class Layer:
    """One producer (Conv or Gemm weight with output channels first) followed by BN, in float64."""

    W: np.ndarray
    B: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    def folded(self, eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """W' and b' computed in float64: the correct fold, or with ``eps`` replaced."""
        s = self.gamma / np.sqrt(self.var + (self.eps if eps is None else eps))
        return self.W * s.reshape((-1,) + (1,) * (self.W.ndim - 1)), (self.B - self.mean) * s + self.beta


def random_layer(rng, shape, eps) -> Layer:
    w, b = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])), rng.standard_normal(shape[0])
    return Layer(w, b, *bn_stats(rng, shape[0], np.float64), eps=eps)


def conv_stack(
    rng, *, depth=1, channels=8, eps=1e-5, dtype=np.float32, training=False, x_dims=("N", 3, 8, 8)
):
    """x -> [Conv -> BN (bn<i>) -> Relu (relu<i>)] * depth; the last Relu writes ``y``."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    layers, nodes, inits, prev, cin = [], [], [], "x", x_dims[1]
    for i in range(1, depth + 1):
        layer = random_layer(rng, (channels, cin, 3, 3), eps)
        layers.append(layer)
        names = [f"{k}{i}" for k in ("W", "B", "gamma", "beta", "mean", "var")]
        for name, value in zip(names, (layer.W, layer.B, layer.gamma, layer.beta, layer.mean, layer.var)):
            inits.append(tensor(name, value, dtype))
        nodes.append(helper.make_node("Conv", [prev, names[0], names[1]], [f"conv{i}"], pads=[1, 1, 1, 1]))
        bn_out = [f"bn{i}", f"running_mean{i}", f"running_var{i}"] if training else [f"bn{i}"]
        attrs = {"training_mode": 1} if training else {}
        nodes.append(
            helper.make_node("BatchNormalization", [f"conv{i}", *names[2:]], bn_out, epsilon=eps, **attrs)
        )
        prev = "y" if i == depth else f"relu{i}"
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [prev]))
        cin = channels
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", elem, list(x_dims))],
        [helper.make_tensor_value_info("y", elem, None)],
        inits,
    )
    return model, layers


def fold_conv_stack(layers, *, dtype=np.float32, folded=None, x_dims=("N", 3, 8, 8)):
    """The folded twin of conv_stack: Conv<i> writes bn<i>. ``folded`` overrides (W', b') per layer."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, prev = [], [], "x"
    for i, layer in enumerate(layers, start=1):
        w, b = (folded or {}).get(i) or layer.folded()
        inits += [tensor(f"Wf{i}", w, dtype), tensor(f"Bf{i}", b, dtype)]
        nodes.append(helper.make_node("Conv", [prev, f"Wf{i}", f"Bf{i}"], [f"bn{i}"], pads=[1, 1, 1, 1]))
        prev = "y" if i == len(layers) else f"relu{i}"
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [prev]))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", elem, list(x_dims))],
        [helper.make_tensor_value_info("y", elem, None)],
        inits,
    )


def gemm_bn(rng, *, eps=1e-5, dtype=np.float32, fold=Layer.folded, cand_outputs=("y", "z")):
    """x[N,6] -> Gemm(transB) -> BN (bn) -> Relu (y), Tanh (z); and its fold, made by ``fold(layer)``."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    layer = random_layer(rng, (8, 6), eps)
    w, b = fold(layer)
    x = [helper.make_tensor_value_info("x", elem, ["N", 6])]

    def tail(y, z):
        nodes = [helper.make_node("Relu", ["bn"], [y]), helper.make_node("Tanh", ["bn"], [z])]
        return nodes, [helper.make_tensor_value_info(n, elem, None) for n in (y, z)]

    bn_params = zip(("g", "be", "m", "v"), (layer.gamma, layer.beta, layer.mean, layer.var))
    nodes, outputs = tail("y", "z")
    ref = make_model(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["gemm"], transB=1),
            helper.make_node("BatchNormalization", ["gemm", "g", "be", "m", "v"], ["bn"], epsilon=eps),
            *nodes,
        ],
        x,
        outputs,
        [
            tensor("W", layer.W, dtype),
            tensor("B", layer.B, dtype),
            *(tensor(n, v, dtype) for n, v in bn_params),
        ],
    )
    nodes, outputs = tail(*cand_outputs)
    cand = make_model(
        [helper.make_node("Gemm", ["x", "Wf", "Bf"], ["bn"], transB=1), *nodes],
        x,
        outputs,
        [tensor("Wf", w, dtype), tensor("Bf", b, dtype)],
    )
    return ref, cand


def run(model: onnx.ModelProto, feed: dict, names: list[str]) -> list[np.ndarray]:
    """Run ``model`` at ORT_DISABLE_ALL with ``names`` exposed as outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def by_name(report) -> dict:
    return {d.name: d for d in (*report.outputs, *report.intermediates)}


# --------------------------------------------------------------------------- correct folds pass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_conv_fold_passes(rng, seed):
    ref, layers = conv_stack(rng, depth=2)
    report = verify(ref, fold_conv_stack(layers), seed=seed)
    assert report.status is VerifyStatus.PASSED, report.message
    assert report.compared_on == "outputs+intermediates"
    assert [d.name for d in report.outputs] == ["y"]
    assert [d.name for d in report.intermediates] == ["bn1", "relu1", "bn2"]
    diffs = by_name(report)
    assert all(d.passed and d.mismatched == 0 for d in diffs.values())
    assert all(d.max_rel < DEFAULT_RTOL["float32"] / 10 for d in diffs.values())
    assert diffs["bn1"].shape == (1, 8, 8, 8) and diffs["bn1"].total == 3 * 8 * 64
    assert diffs["bn1"].worst_channel is not None and diffs["y"].worst_channel is None
    assert diffs["y"].rtol == DEFAULT_RTOL["float32"] and diffs["y"].atol == 0.0
    assert report.first_divergent == () and report.message == ""
    assert report.candidate_runs_optimized is True
    assert (report.samples, report.seed, report.input_source) == (3, seed, "generated")
    assert [(i.name, i.shape, i.dtype) for i in report.inputs] == [("x", (1, 3, 8, 8), "float32")]
    assert report.onnxruntime_version == ort.__version__
    assert report.provider == "CPUExecutionProvider" and report.seconds > 0


@pytest.mark.parametrize("seed", [0, 5])
def test_correct_gemm_fold_with_two_outputs_passes(rng, seed):
    ref, cand = gemm_bn(rng)
    report = verify(ref, cand, seed=seed, shapes={"x": (4, 6)})
    assert report.status is VerifyStatus.PASSED, report.message
    assert [d.name for d in report.outputs] == ["y", "z"]
    assert [d.name for d in report.intermediates] == ["bn"]
    assert report.intermediates[0].shape == (4, 8)


def test_same_seed_same_inputs_other_seed_other_inputs(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    a, b, c = verify(ref, cand, seed=7), verify(ref, cand, seed=7), verify(ref, cand, seed=8, samples=5)
    assert a.outputs[0].max_abs == b.outputs[0].max_abs
    assert a.outputs[0].mean_abs != c.outputs[0].mean_abs
    assert c.samples == 5 and c.outputs[0].total == 5 * 8 * 64


def test_make_inputs_gives_the_samples_verify_generates(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    samples = make_inputs(ref, shapes={"x": (2, 3, 8, 8)}, seed=4, samples=2)
    assert [s["x"].shape for s in samples] == [(2, 3, 8, 8)] * 2 and samples[0]["x"].dtype == np.float32
    assert not np.array_equal(samples[0]["x"], samples[1]["x"])
    given = verify(ref, cand, inputs=samples)
    generated = verify(ref, cand, shapes={"x": (2, 3, 8, 8)}, seed=4, samples=2)
    assert given.outputs == generated.outputs and given.intermediates == generated.intermediates
    assert (given.input_source, given.seed, generated.seed) == ("user", None, 4)


# --------------------------------------------------------------------------- faults are caught


def _fault_weight(layer, channel_scale=None):
    w, b = layer.folded()
    w[3] *= 1 + 1e-3
    return w, b


def _fault_bias(layer, channel_scale):
    """Channel 3's bias off by 1e-3 of that channel's own output magnitude."""
    w, b = layer.folded()
    b[3] += 1e-3 * channel_scale[3]
    return w, b


def _fault_swap(layer, channel_scale=None):
    w, b = layer.folded()
    return w[[0, 1, 2, 4, 3, 5, 6, 7]], b[[0, 1, 2, 4, 3, 5, 6, 7]]


FAULTS = {
    "weight-channel-1e-3": (_fault_weight, 3),
    "bias-channel-1e-3": (_fault_bias, 3),
    "channels-swapped": (_fault_swap, None),
}


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_one_channel_fault_is_caught_at_its_fold(rng, fault):
    make, channel = FAULTS[fault]
    ref, layers = conv_stack(rng)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (bn,) = run(ref, {"x": x}, ["bn1"])  # x is verify's first sample for seed 0
    report = verify(ref, fold_conv_stack(layers, folded={1: make(layers[0], np.abs(bn).max(axis=(0, 2, 3)))}))
    assert report.status is VerifyStatus.FAILED
    assert report.first_divergent == ("bn1",)
    bn_diff = by_name(report)["bn1"]
    assert not bn_diff.passed and 0 < bn_diff.mismatched < bn_diff.total
    if channel is not None:
        assert bn_diff.worst_channel == channel
    else:
        assert bn_diff.worst_channel in (3, 4)
    assert "bn1" in report.message


def test_dropped_epsilon_is_caught_when_eps_is_1e_3(rng):
    ref, layers = conv_stack(rng, eps=1e-3)
    report = verify(ref, fold_conv_stack(layers, folded={1: layers[0].folded(eps=0.0)}))
    assert report.status is VerifyStatus.FAILED
    assert report.first_divergent == ("bn1",)


def test_training_mode_bn_folded_with_running_stats_is_caught(rng):
    """A BN with training_mode=1 normalizes with batch statistics; folding its running stats is wrong."""
    ref, layers = conv_stack(rng, training=True)
    report = verify(ref, fold_conv_stack(layers))
    assert report.status is VerifyStatus.FAILED
    assert report.first_divergent == ("bn1",)


@pytest.mark.parametrize("bad_layer", [1, 2])
def test_first_divergent_is_the_upstream_most_failing_fold(rng, bad_layer):
    ref, layers = conv_stack(rng, depth=2)
    report = verify(ref, fold_conv_stack(layers, folded={bad_layer: _fault_weight(layers[bad_layer - 1])}))
    diffs = by_name(report)
    assert report.status is VerifyStatus.FAILED
    assert report.first_divergent == (f"bn{bad_layer}",)
    assert not diffs["bn2"].passed and not diffs["y"].passed  # downstream of either fault
    assert diffs["bn1"].passed is (bad_layer == 2)


def test_gemm_fault_in_one_feature_is_caught(rng):
    def wrong(layer):
        w, b = layer.folded()
        w[5] *= 1 + 1e-3
        return w, b

    report = verify(*gemm_bn(rng, fold=wrong))
    assert report.status is VerifyStatus.FAILED
    assert report.first_divergent == ("bn",) and report.intermediates[0].worst_channel == 5


def test_user_tolerances_override_the_defaults(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers, folded={1: _fault_weight(layers[0])})
    assert verify(ref, cand).status is VerifyStatus.FAILED
    loose = verify(ref, cand, rtol=1e-2)
    assert loose.status is VerifyStatus.PASSED
    assert {d.rtol for d in (*loose.outputs, *loose.intermediates)} == {1e-2}
    assert verify(ref, cand, atol=10.0).status is VerifyStatus.PASSED


# --------------------------------------------------------------------------- dtypes


def test_float16_model_correct_fold_passes_and_25_percent_fault_fails(rng):
    ref, layers = conv_stack(rng, dtype=np.float16)
    good = verify(ref, fold_conv_stack(layers, dtype=np.float16))
    assert good.status is VerifyStatus.PASSED, good.message
    assert good.outputs[0].dtype == "float16" and good.outputs[0].rtol == DEFAULT_RTOL["float16"]
    w, b = layers[0].folded()
    w[2] *= 1.25
    bad = verify(ref, fold_conv_stack(layers, dtype=np.float16, folded={1: (w, b)}))
    assert bad.status is VerifyStatus.FAILED and bad.first_divergent == ("bn1",)


def test_float64_catches_dropped_default_epsilon(rng):
    """float64 is tight enough to see eps=1e-5 dropped, which float32 noise hides."""
    ref, good = gemm_bn(rng, dtype=np.float64)
    assert verify(ref, good).status is VerifyStatus.PASSED
    ref, bad = gemm_bn(rng, dtype=np.float64, fold=lambda layer: layer.folded(eps=0.0))
    report = verify(ref, bad)
    assert report.status is VerifyStatus.FAILED and report.first_divergent == ("bn",)
    assert report.intermediates[0].rtol == DEFAULT_RTOL["float64"]


def int_bool_models(rng):
    """x float, mask bool, u uint8, idx int64 -> Gemm -> BN -> Where(mask) + u -> Gather(idx); and its fold."""
    layer = random_layer(rng, (8, 6), 1e-5)
    w, b = layer.folded()
    tail = [
        helper.make_node("Where", ["mask", "bn", "zero"], ["masked"]),
        helper.make_node("Cast", ["u"], ["uf"], to=F32),
        helper.make_node("Add", ["masked", "uf"], ["sum"]),
        helper.make_node("Gather", ["sum", "idx"], ["y"], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info("x", F32, ["N", 6]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 8]),
        helper.make_tensor_value_info("u", TensorProto.UINT8, ["N", 8]),
        helper.make_tensor_value_info("idx", TensorProto.INT64, [3]),
    ]
    outputs = [helper.make_tensor_value_info("y", F32, None)]
    params = zip(
        ["W", "B", "g", "be", "m", "v"], (layer.W, layer.B, layer.gamma, layer.beta, layer.mean, layer.var)
    )
    ref = make_model(
        [
            helper.make_node("Gemm", ["x", "W", "B"], ["gemm"], transB=1),
            helper.make_node("BatchNormalization", ["gemm", "g", "be", "m", "v"], ["bn"]),
            *tail,
        ],
        inputs,
        outputs,
        [*(tensor(n, v) for n, v in params), tensor("zero", 0.0)],
    )
    cand = make_model(
        [helper.make_node("Gemm", ["x", "Wf", "Bf"], ["bn"], transB=1), *tail],
        inputs,
        outputs,
        [tensor("Wf", w), tensor("Bf", b), tensor("zero", 0.0)],
    )
    return ref, cand


def test_int_uint_and_bool_inputs_are_generated_and_fed(rng):
    ref, cand = int_bool_models(rng)
    report = verify(ref, cand, shapes={"x": (3, 6)})
    assert report.status is VerifyStatus.PASSED, report.message
    assert [(i.name, i.shape, i.dtype) for i in report.inputs] == [
        ("x", (3, 6), "float32"),
        ("mask", (3, 8), "bool"),  # the symbol N is bound by shapes={"x": ...}
        ("u", (3, 8), "uint8"),
        ("idx", (3,), "int64"),
    ]
    assert report.outputs[0].shape == (3, 3)
    assert [d.name for d in report.intermediates] == ["bn", "masked", "uf", "sum"]


@pytest.mark.parametrize(
    "elem",
    [
        TensorProto.INT8,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.UINT8,
        TensorProto.UINT16,
        TensorProto.UINT32,
        TensorProto.UINT64,
        TensorProto.BOOL,
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
    ],
    ids=lambda e: TensorProto.DataType.Name(e).lower(),
)
def test_generated_inputs_have_the_declared_dtype_and_small_non_negative_integers(elem):
    decl = verify_inputs.InputDecl("a", elem, (4, 50))
    sample = verify_inputs.generate([decl], {"a": (4, 50)}, np.random.default_rng(0))["a"]
    assert sample.dtype == helper.tensor_dtype_to_np_dtype(elem) and sample.shape == (4, 50)
    if sample.dtype.kind in "iu":
        assert sample.min() == 0 and sample.max() == 4
    elif sample.dtype.kind == "b":
        assert 0 < sample.sum() < sample.size
    else:
        assert -10 < sample.min() < -1 and 1 < sample.max() < 10  # standard normal, not U(0, 1)


def test_bfloat16_model_is_not_run_with_a_reason():
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y], [])
    report = verify(model, model)
    assert report.status is VerifyStatus.NOT_RUN and not report.passed
    assert "bfloat16" in report.message


# --------------------------------------------------------------------------- outputs, names, NaN


def test_renamed_intermediates_are_matched_by_structure(rng):
    """Before issue 13 a candidate that renamed its tensors was compared on its outputs only, and
    the fault below was named at ``y``; matched by structure it is caught at its fold point."""
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    for node in cand.graph.node:  # rename every intermediate
        node.input[:] = ["other" if i == "bn1" else i for i in node.input]
        node.output[:] = ["other" if o == "bn1" else o for o in node.output]
    good = verify(ref, cand)
    assert good.status is VerifyStatus.PASSED and good.compared_on == "outputs+intermediates"
    assert [(d.name, d.matched_by) for d in good.intermediates] == [("bn1", "structure")]
    assert good.matched == {"structure": 1}
    cand.graph.initializer[0].CopyFrom(tensor("Wf1", _fault_weight(layers[0])[0]))
    bad = verify(ref, cand)
    assert bad.status is VerifyStatus.FAILED and bad.first_divergent == ("bn1",)


def test_intermediates_false_compares_outputs_only(rng):
    ref, layers = conv_stack(rng)
    report = verify(ref, fold_conv_stack(layers), intermediates=False)
    assert report.compared_on == "outputs" and report.intermediates == ()


def test_renamed_outputs_are_matched_by_position(rng):
    ref, cand = gemm_bn(rng, cand_outputs=("y", "z_renamed"))
    report = verify(ref, cand)
    assert report.status is VerifyStatus.PASSED
    assert [d.name for d in report.outputs] == ["y", "z"]
    assert "matched by position" in report.message and "z->z_renamed" in report.message


def test_candidate_needing_an_input_the_reference_lacks_fails(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    cand.graph.input.append(helper.make_tensor_value_info("bias_in", F32, [1]))
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and "['bias_in']" in report.message


def test_output_shape_or_count_mismatch_fails_with_a_message(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    cand.graph.node[-1].output[0] = "pre"
    cand.graph.node.append(helper.make_node("Flatten", ["pre"], ["y"]))
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED
    assert "'y'" in report.message and "[1, 8, 8, 8]" in report.message and "[1, 512]" in report.message
    cand.graph.output.append(helper.make_tensor_value_info("pre", F32, None))
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and "outputs" in report.message


def sqrt_tail(model: onnx.ModelProto, *, abs_first: bool = False) -> onnx.ModelProto:
    """Relu(bn1) -> y becomes Sqrt(bn1) -> y (NaN where bn1 < 0), or Sqrt(Abs(bn1)) (no NaN)."""
    last = model.graph.node[-1]
    last.op_type = "Sqrt"
    if abs_first:
        last.input[0] = "abs"
        model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Abs", ["bn1"], ["abs"]))
    return model


def test_nan_at_the_same_places_passes_and_elsewhere_fails(rng):
    ref, layers = conv_stack(rng)
    ref = sqrt_tail(ref)
    same = verify(ref, sqrt_tail(fold_conv_stack(layers)))
    y = by_name(same)["y"]
    assert same.status is VerifyStatus.PASSED and not y.nan_inf_mismatch
    assert np.isfinite(y.max_abs) and y.max_rel < 1e-5
    moved = verify(ref, sqrt_tail(fold_conv_stack(layers), abs_first=True))
    y = by_name(moved)["y"]
    assert moved.status is VerifyStatus.FAILED and y.nan_inf_mismatch and not y.passed
    assert moved.first_divergent == ("y",) and by_name(moved)["bn1"].passed
    assert "NaN/Inf" in moved.message


@pytest.mark.parametrize(
    ("cand", "ok"),
    [
        ([1.0, np.inf, np.nan, -np.inf], True),
        ([1.0, -np.inf, np.nan, -np.inf], False),
        ([1.0, np.inf, 0.0, -np.inf], False),
    ],
    ids=["same", "inf-sign-flipped", "nan-became-finite"],
)
def test_inf_and_nan_must_match_in_place_and_sign(cand, ok):
    stats = compare.TensorStats("t", "output", None, None)
    stats.add(np.array([1.0, np.inf, np.nan, -np.inf], np.float32), np.array(cand, np.float32))
    diff = stats.result()
    assert diff.passed is ok and diff.nan_inf_mismatch is not ok
    assert diff.max_abs == 0.0 and diff.mismatched == (0 if ok else 1)


def test_integer_tensors_must_be_equal_whatever_the_tolerance():
    stats = compare.TensorStats("idx", "output", 100.0, 1.0)
    stats.add(np.array([[0, 3, 4]], np.int64), np.array([[0, 3, 4]], np.int64))
    assert stats.result().passed and stats.result().rtol == 0.0
    stats.add(np.array([[0, 3, 4]], np.int64), np.array([[0, 2, 4]], np.int64))
    diff = stats.result()
    assert not diff.passed and (diff.mismatched, diff.total, diff.max_abs) == (1, 6, 1.0)


def test_scale_is_per_channel_for_intermediates_and_per_tensor_for_outputs():
    """A 2e-4 error on a channel of magnitude 1 hides next to a channel of magnitude 5 (4e-5 of
    the tensor scale) unless each channel is judged against its own magnitude."""
    ref = np.ones((1, 2, 4), np.float32)
    ref[:, 0] = 5.0
    cand = ref.copy()
    cand[0, 1, 2] += 2e-4
    inter, out = (
        compare.TensorStats("t", "intermediate", None, None),
        compare.TensorStats("t", "output", None, None),
    )
    inter.add(ref, cand)
    out.add(ref, cand)
    assert not inter.result().passed and inter.result().worst_channel == 1
    assert inter.result().max_rel == pytest.approx(2e-4, rel=1e-2)
    assert out.result().passed and out.result().max_rel == pytest.approx(4e-5, rel=1e-2)


def test_a_quiet_channel_is_judged_against_the_floor_not_its_own_noise():
    ref = np.ones((1, 2, 4), np.float32)
    ref[:, 0] = 100.0
    ref[:, 1] = 1e-6
    cand = ref.copy()
    cand[0, 1, 0] += 5e-4  # 5e-6 of the tensor scale, 5e-5 of the floored channel scale (10.0)
    stats = compare.TensorStats("t", "intermediate", None, None)
    stats.add(ref, cand)
    assert stats.result().passed and stats.result().max_rel == pytest.approx(5e-5, rel=1e-2)


def test_first_divergent_follows_values_read_inside_subgraphs():
    """``b`` is computed by an If whose branch reads ``a``: a failing ``a`` explains a failing ``b``."""
    branch = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["n"])], "then", [], [helper.make_empty_tensor_value_info("n")]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch),
            helper.make_node("Abs", ["x"], ["c"]),
            helper.make_node("Add", ["b", "c"], ["d"]),
        ],
        "g",
        [],
        [],
    )
    assert compare.first_divergent(graph, ["d", "b", "a"]) == ("a",)
    assert compare.first_divergent(graph, ["d", "c", "b"]) == ("b", "c")


# --------------------------------------------------------------------------- shapes


def test_leading_symbolic_dim_defaults_to_batch_1_and_shapes_binds_it(rng):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    assert verify(ref, cand).inputs[0].shape == (1, 3, 8, 8)
    report = verify(ref, cand, shapes={"x": (2, 3, 8, 8)})
    assert report.inputs[0].shape == (2, 3, 8, 8) and report.outputs[0].shape == (2, 8, 8, 8)


def test_free_dims_are_bound_to_a_size_both_models_run_and_reported(rng):
    """Issue 13: a symbolic dimension other than the batch (an audio model's time axis) stopped
    verification with a ShapeError; now a small size both models run with is chosen."""
    dims = ("N", 3, "H", "W")
    ref, layers = conv_stack(rng, x_dims=dims)
    cand = fold_conv_stack(layers, x_dims=dims)
    report = verify(ref, cand)
    assert report.status is VerifyStatus.PASSED and report.bound_dims == {"H": 16, "W": 16}
    assert report.inputs[0].shape == (1, 3, 16, 16)
    report = verify(ref, cand, shapes={"x": (1, 3, 5, 7)})
    assert report.status is VerifyStatus.PASSED and report.outputs[0].shape == (1, 8, 5, 7)
    assert report.bound_dims == {}


def test_unresolved_dim_raises_shape_error_naming_input_and_dim(rng):
    """When no tried size runs (here the graph needs H, W = 5, 7), the error names the input and
    the dimension, in the API's words; ``cli_message`` says it in the command line's."""
    dims = ("N", 3, "H", "W")
    ref, layers = conv_stack(rng, x_dims=dims)
    cand = fold_conv_stack(layers, x_dims=dims)
    for m in (ref, cand):
        m.graph.initializer.append(tensor("fixed", np.ones((1, 8, 5, 7), np.float32)))
        m.graph.node.append(helper.make_node("Add", ["y", "fixed"], ["y5x7"]))
        m.graph.output[0].name = "y5x7"
    with pytest.raises(ShapeError) as err:
        verify(ref, cand)
    assert "'x'" in str(err.value) and "dimension 2" in str(err.value) and "'H'" in str(err.value)
    assert "shapes={'x': (N, 3, H, W)}" in str(err.value) and "\n" not in str(err.value)
    assert "--shape x=Nx3xHxW" in err.value.cli_message and "shapes=" not in err.value.cli_message
    report = verify(ref, cand, shapes={"x": (1, 3, 5, 7)})
    assert report.status is VerifyStatus.PASSED and report.outputs[0].shape == (1, 8, 5, 7)


def test_unknown_dim_without_name_is_bound_too_and_pinning_it_is_an_interface_change(rng):
    ref, layers = conv_stack(rng, x_dims=("N", 3, 8, 8))
    ref.graph.input[0].type.tensor_type.shape.dim[3].Clear()
    same = onnx.ModelProto()
    same.CopyFrom(ref)
    report = verify(ref, same)
    assert report.passed and report.bound_dims == {"x[3]": 16} and report.inputs[0].shape == (1, 3, 8, 16)
    report = verify(ref, fold_conv_stack(layers))
    assert report.status is VerifyStatus.FAILED
    assert (
        "input 'x' dimension 3 is dynamic ('?') in the reference, fixed to 8 in the candidate"
        in report.message
    )


def test_symbols_bound_by_shapes_apply_to_every_input():
    a = helper.make_tensor_value_info("a", F32, ["N", "K"])
    b = helper.make_tensor_value_info("b", F32, [2, "K"])
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [a, b],
        [helper.make_tensor_value_info("y", F32, None)],
        [],
    )
    report = verify(model, model, shapes={"a": (2, 5)})
    assert [i.shape for i in report.inputs] == [(2, 5), (2, 5)]


@pytest.mark.parametrize(
    ("shapes", "error", "text"),
    [
        ({"nope": (1,)}, InputError, "nope"),
        ({"x": (1, 3, 8)}, ShapeError, "rank 4"),
        ({"x": (1, 4, 8, 8)}, ShapeError, "dimension 1 is 3"),
    ],
    ids=["unknown-input", "wrong-rank", "static-dim-conflict"],
)
def test_bad_shapes_are_rejected(rng, shapes, error, text):
    ref, layers = conv_stack(rng)
    with pytest.raises(error, match=text):
        verify(ref, fold_conv_stack(layers), shapes=shapes)


# --------------------------------------------------------------------------- user inputs


def test_npz_mapping_and_list_inputs(rng, tmp_path):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    from_npz = verify(ref, cand, inputs=tmp_path / "in.npz")
    from_map = verify(ref, cand, inputs={"x": x})
    from_list = verify(ref, cand, inputs=[{"x": x}, {"x": x[:1]}])
    assert from_npz.input_source == f"npz:{tmp_path / 'in.npz'}" and from_map.input_source == "user"
    assert (from_npz.samples, from_npz.seed, from_npz.inputs[0].shape) == (1, None, (2, 3, 8, 8))
    assert from_npz.outputs[0].max_abs == from_map.outputs[0].max_abs  # the same data went in
    assert from_list.samples == 2 and from_list.outputs[0].total == 3 * 8 * 64
    assert all(r.status is VerifyStatus.PASSED for r in (from_npz, from_map, from_list))
    # float64 arrays are cast to the model's float32
    assert verify(ref, cand, inputs={"x": x.astype(np.float64)}).status is VerifyStatus.PASSED


def _write_pb(path: Path, array: np.ndarray, name: str) -> None:
    t = numpy_helper.from_array(array)
    t.name = name
    path.write_bytes(t.SerializeToString())


def test_pb_dir_inputs_named_positional_and_test_data_sets(rng, tmp_path):
    ref, cand = gemm_bn(rng)
    flat = tmp_path / "flat"
    flat.mkdir()
    _write_pb(flat / "input_0.pb", np.ones((2, 6), np.float32), "")  # unnamed: matched by position
    report = verify(ref, cand, inputs=flat)
    assert report.status is VerifyStatus.PASSED and report.input_source == f"pb-dir:{flat}"
    assert report.inputs[0].shape == (2, 6) and report.samples == 1
    sets = tmp_path / "sets"
    for i in range(2):
        (sets / f"test_data_set_{i}").mkdir(parents=True)
        _write_pb(sets / f"test_data_set_{i}" / "input_0.pb", np.full((i + 1, 6), i, np.float32), "x")
        _write_pb(sets / f"test_data_set_{i}" / "output_0.pb", np.zeros((1,), np.float32), "y")  # ignored
    loaded = load_inputs(sets)
    assert [s["x"].shape for s in loaded] == [(1, 6), (2, 6)]
    report = verify(ref, cand, inputs=sets)
    assert report.samples == 2 and report.outputs[0].total == 3 * 8


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (
            lambda p: np.savez(p / "in.npz", y=np.ones((1, 6), np.float32)) or p / "in.npz",
            r"unknown input\(s\) \['y'\]",
        ),
        (lambda p: np.savez(p / "in.npz", x=np.ones((1, 7), np.float32)) or p / "in.npz", r"shape \(1, 7\)"),
        (lambda p: (p / "bad.npz").write_bytes(b"not a zip") and p / "bad.npz", "cannot read"),
        (lambda p: p / "missing.npz", "no such file"),
        (lambda p: (p / "in.txt").write_text("x") and p / "in.txt", r"\.npz"),
        (
            lambda p: (p / "input_0.pb").write_bytes(b"\xff\xff\xff") and p,
            "not a serialized onnx TensorProto",
        ),
        (
            lambda p: _write_pb(p / "input_1.pb", np.ones((1, 6), np.float32), "") or p,
            "position matches no model input",
        ),
        (lambda p: p, "no input_<i>.pb"),
    ],
    ids=[
        "unknown-name",
        "wrong-shape",
        "unreadable-npz",
        "missing",
        "wrong-suffix",
        "garbage-pb",
        "unnamed-extra-pb",
        "empty-dir",
    ],
)
def test_bad_user_inputs_raise_one_line_input_error(rng, tmp_path, make, text):
    ref, cand = gemm_bn(rng)
    path = make(tmp_path)
    with pytest.raises(InputError, match=text) as err:
        verify(ref, cand, inputs=path)
    assert "\n" not in str(err.value)


def test_missing_or_wrong_kind_input_in_mapping_raises(rng):
    ref, _ = int_bool_models(rng)
    x = np.ones((1, 6), np.float32)
    with pytest.raises(InputError, match=r"missing input\(s\) \['mask', 'u', 'idx'\]"):
        verify(ref, ref, inputs={"x": x})
    feed = {"x": x, "mask": np.ones((1, 8)), "u": np.ones((1, 8), np.uint8), "idx": np.zeros(3, np.int64)}
    with pytest.raises(InputError, match="input 'mask' is float64, the model wants bool"):
        verify(ref, ref, inputs=feed)


@pytest.mark.parametrize("ir_version", [3, 8], ids=["ir3-constant", "ir8-overridable"])
def test_initializers_listed_as_inputs_are_not_fed(rng, ir_version):
    """They keep their defaults in the generated samples. At IR >= 4 they can be overridden, so
    a candidate that folded them away has a different interface (issue 13): it fails, naming
    them; the reference against itself passes."""
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    for m in (ref, cand):
        m.ir_version = ir_version
        if ir_version == 3:
            m.opset_import[0].version = 8
        m.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer
        )
    same = onnx.ModelProto()
    same.CopyFrom(ref)
    for candidate in (cand, same) if ir_version == 3 else (same,):
        report = verify(ref, candidate)
        assert report.status is VerifyStatus.PASSED, report.message
        assert [i.name for i in report.inputs] == ["x"]
    if ir_version >= 4:
        report = verify(ref, cand)
        assert report.status is VerifyStatus.FAILED and "interface differs" in report.message
        assert "['W1', 'B1', 'gamma1', 'beta1', 'mean1', 'var1']" in report.message


# --------------------------------------------------------------------------- onnxruntime


def test_reference_runs_at_disable_all_where_bn_survives(rng, tmp_path):
    """At ORT's default level the reference's Conv+BN is fused and would prove nothing."""
    ref, _ = conv_stack(rng)
    kept = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        so = models.session_options(level)
        so.optimized_model_filepath = str(tmp_path / f"{level}.onnx")
        ort.InferenceSession(ref.SerializeToString(), so, providers=["CPUExecutionProvider"])
        kept[level] = "BatchNormalization" in {
            n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node
        }
    assert kept == {"ORT_DISABLE_ALL": True, "ORT_ENABLE_ALL": False}


def test_sessions_compared_are_at_disable_all_and_the_extra_check_at_default(rng, monkeypatch):
    """Reference and candidate are compared at ORT_DISABLE_ALL; the reference runs once more at
    ORT_ENABLE_BASIC (the noise calibration: onnxruntime folds its BN there), and the candidate
    once at the default level first (does it load there? its memory is then reused); the
    calibration session runs alone, gone before either comparison session is built (it holds
    its own folded copy of the weights: beside both compared models, 3.1x a 500 MB model)."""
    seen = []
    real = ort.InferenceSession

    def recording(model, sess_options=None, **kwargs):
        source = model if isinstance(model, bytes) else Path(model).read_bytes()
        seen.append(
            (
                "reference" if b"BatchNormalization" in source else "candidate",
                sess_options.graph_optimization_level,
                sess_options.log_severity_level,
                kwargs["providers"],
            )
        )
        return real(model, sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    ref, layers = conv_stack(rng)
    assert verify(ref, fold_conv_stack(layers)).passed
    level = ort.GraphOptimizationLevel
    cpu = ["CPUExecutionProvider"]
    assert seen == [
        ("candidate", level.ORT_ENABLE_ALL, 4, cpu),
        ("reference", level.ORT_ENABLE_BASIC, 4, cpu),
        ("reference", level.ORT_DISABLE_ALL, 4, cpu),
        ("candidate", level.ORT_DISABLE_ALL, 4, cpu),
    ]


def test_candidate_failing_at_default_level_is_reported_not_failed(rng, monkeypatch):
    real = ort.InferenceSession

    def no_optimized(model, sess_options=None, **kwargs):
        if sess_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : fusion broke\nmore detail")
        return real(model, sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", no_optimized)
    ref, layers = conv_stack(rng)
    report = verify(ref, fold_conv_stack(layers))
    assert report.status is VerifyStatus.PASSED and report.candidate_runs_optimized is False
    assert "ORT_ENABLE_ALL" in report.message and "fusion broke" in report.message
    assert "more detail" not in report.message


def with_custom_op(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.node[-1].op_type, model.graph.node[-1].domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


@pytest.mark.parametrize("where", ["candidate", "reference"])
def test_model_onnxruntime_cannot_load_is_not_run(rng, where):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers)
    report = verify(ref, with_custom_op(cand)) if where == "candidate" else verify(with_custom_op(ref), cand)
    assert report.status is VerifyStatus.NOT_RUN and not report.passed
    assert where in report.message and "FancyRelu" in report.message and "\n" not in report.message


def test_model_paths_with_external_data(rng, tmp_path, monkeypatch):
    ref, layers = conv_stack(rng, depth=2)
    paths = {}
    for name, model in (
        ("ref", ref),
        ("good", fold_conv_stack(layers)),
        ("bad", fold_conv_stack(layers, folded={2: _fault_weight(layers[1])})),
    ):
        (tmp_path / name).mkdir()
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy, tmp_path / name / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0
        )
        paths[name] = str(tmp_path / name / "m.onnx")
    monkeypatch.chdir(tmp_path / "good")  # relative external paths resolve next to the model, not cwd
    good = verify(paths["ref"], paths["good"])
    assert good.status is VerifyStatus.PASSED, good.message
    assert good.candidate_runs_optimized and len(good.intermediates) == 3
    bad = verify(Path(paths["ref"]), paths["bad"])
    assert bad.status is VerifyStatus.FAILED and bad.first_divergent == ("bn2",)


def test_lazily_loaded_model_proto_is_resolved_through_bnfold_io(rng, tmp_path):
    """Stubs from load_model(lazy=True) point into the file; onnxruntime cannot read them itself."""
    channels = math.isqrt(LAZY_THRESHOLD // (9 * 4)) + 1  # conv2's weight is big enough to be a stub
    ref, layers = conv_stack(rng, depth=2, channels=channels)
    onnx.save_model(ref, tmp_path / "ref.onnx")
    lazy = load_model(tmp_path / "ref.onnx", lazy=True)
    assert any(is_lazy(t) for t in lazy.graph.initializer)
    good = verify(lazy, fold_conv_stack(layers))
    assert good.status is VerifyStatus.PASSED, good.message
    bad = verify(lazy, fold_conv_stack(layers, folded={2: _fault_weight(layers[1])}))
    assert bad.status is VerifyStatus.FAILED and bad.first_divergent == ("bn2",)


def test_model_proto_with_external_data_not_loaded(rng, tmp_path):
    """Its data files are relative to a folder the ModelProto does not record."""
    ref, layers = conv_stack(rng)
    onnx.save_model(ref, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InputError, match="'W1'.*m.data"):
        verify(unloaded, fold_conv_stack(layers))
    lazy = load_model(tmp_path / "m.onnx", lazy=True)  # remembers its folder: resolvable
    assert verify(lazy, fold_conv_stack(layers)).status is VerifyStatus.PASSED


def test_unreadable_model_path_raises_input_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01\x12garbage")
    with pytest.raises(InputError, match="junk.onnx: "):
        verify(tmp_path / "junk.onnx", tmp_path / "junk.onnx")
    with pytest.raises(InputError, match="no such file"):
        verify(tmp_path / "absent.onnx", tmp_path / "absent.onnx")


def test_models_over_protobuf_limit_go_through_external_data_without_touching_the_caller(rng, monkeypatch):
    ref, layers = conv_stack(rng)
    cand = fold_conv_stack(layers, folded={1: _fault_weight(layers[0])})
    before = (ref.SerializeToString(), cand.SerializeToString())
    saved = []
    real = models.save_model
    monkeypatch.setattr(models, "serialize", lambda model: None)  # what it returns past 2 GB
    monkeypatch.setattr(models, "save_model", lambda m, p, **kw: saved.append(p) or real(m, p, **kw))
    report = verify(ref, cand)
    assert report.status is VerifyStatus.FAILED and report.first_divergent == ("bn1",)  # weights arrived
    assert len(saved) == 2 and report.candidate_runs_optimized  # once per model, not per session
    assert (ref.SerializeToString(), cand.SerializeToString()) == before
