"""The ONNX fold pass: structure, report and numbers for every pattern; a negative test per
skip reason; regressions for the failures other folding tools have (shared/PITFALLS.md)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import SkipReason, analyze_onnx, count_bn, fold_onnx
from conftest import assert_close, bn_stats, run_ort
from onnx_builders import G, assert_refused, conv_bn


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def check_folded(g: G, *, n_folded: int = 1, rtol: float = 1e-5) -> onnx.ModelProto:
    """Fold g's model and check structure, report, checker and onnxruntime numbers."""
    model = g.model()
    before = model.SerializeToString()
    onnx.checker.check_model(model, full_check=True)
    ref = run_ort(model, g.feeds)
    result = fold_onnx(model)
    assert model.SerializeToString() == before, "the caller's model was mutated"
    out = result.model
    assert len(result.report.folded) == n_folded, result.report
    assert count_bn(out) == count_bn(model) - n_folded
    onnx.checker.check_model(out, full_check=True)
    assert [v.name for v in out.graph.input] == [v.name for v in model.graph.input]
    assert [v for v in out.graph.output] == [v for v in model.graph.output]
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    assert out.doc_string == model.doc_string and list(out.metadata_props) == list(model.metadata_props)
    assert_close(ref, run_ort(out, g.feeds), rtol=rtol)
    # idempotent: a second pass finds nothing to fold
    again = fold_onnx(out)
    assert not again.report.folded
    return out


# --------------------------------------------------------------------------- Conv / ConvTranspose

CONV_CASES = [
    (op, rank, group, bias)
    for op in ("Conv", "ConvTranspose")
    for rank in (1, 2, 3)
    for group in (1, 2)
    for bias in (True, False)
] + [("Conv", 2, 4, False), ("Conv", 2, 4, True)]  # depthwise (cin == cout == group)


@pytest.mark.parametrize(
    ("op", "rank", "group", "bias"),
    CONV_CASES,
    ids=[f"{o}-{r}d-g{g}-{'b' if b else 'nob'}" for o, r, g, b in CONV_CASES],
)
def test_conv_bn_folds(rng, op, rank, group, bias):
    cout = 4 if group == 4 else 6
    g = conv_bn(rng, op=op, rank=rank, group=group, bias=bias, cout=cout)
    out = check_folded(g)
    assert ops(out) == [op, "Relu"]
    result = fold_onnx(g.model())
    f = result.report.folded[0]
    assert (f.bn, f.producer_op, f.output) == ("bn", op, "z")
    assert out.graph.node[0].output[0] == "z", "the absorbing node writes the BN's output name"
    # name rule: the changed weight and bias never keep their old names
    assert {t.name for t in out.graph.initializer} == set(f.new_initializers)
    assert len(f.new_initializers) == 2 and not {"W", "B"} & set(f.new_initializers)


def test_epsilon_absent_defaults_to_spec_value(rng):
    """Without the attribute, epsilon is 1e-5 (ONNX spec); a small var makes a wrong default visible."""
    g = conv_bn(rng, eps=None)
    var = next(t for t in g.inits if t.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(np.full(6, 2e-5, np.float32), "bn_var"))
    check_folded(g)


def test_float16_conv_folds_and_keeps_dtype(rng):
    g = conv_bn(rng, dtype=np.float16)
    out = check_folded(g, rtol=2e-3)
    assert all(t.data_type == TensorProto.FLOAT16 for t in out.graph.initializer)


def test_bn15_mixed_dtypes_keep_the_producer_dtype(rng):
    """BN-15 allows fp16 X/scale/bias with fp32 mean/var: folded tensors stay fp16."""
    g = G(rng, opset=15)
    g.input("x", [1, 3, 5, 5], np.float16)
    g.node("Conv", ["x", g.init("W", rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float16))], ["y"])
    gamma, beta, mean, var = bn_stats(rng, 4)
    names = [
        g.init("s", gamma.astype(np.float16)),
        g.init("b", beta.astype(np.float16)),
        g.init("m", mean),
        g.init("v", var),
    ]
    g.nodes.append(helper.make_node("BatchNormalization", ["y", *names], ["z"], name="bn"))
    g.output("z", TensorProto.FLOAT16, [1, 4, 3, 3])
    out = check_folded(g, rtol=2e-3)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}


# --------------------------------------------------------------------------- Gemm

GEMM_CASES = [
    (trans_b, alpha, beta, c)
    for trans_b in (0, 1)
    for alpha, beta in ((1.0, 1.0), (0.5, 2.0), (1.0, 0.0))
    for c in ("none", "n", "1n", "scalar")
]


@pytest.mark.parametrize(
    ("trans_b", "alpha", "beta", "c"), GEMM_CASES, ids=[f"tB{t}-a{a}-b{b}-C{c}" for t, a, b, c in GEMM_CASES]
)
def test_gemm_bn_folds(rng, trans_b, alpha, beta, c):
    g = G(rng)
    g.input("x", [3, 5])
    w = rng.normal(0, 1, (7, 5) if trans_b else (5, 7)).astype(np.float32)
    ins = ["x", g.init("B", w)]
    if c != "none":
        shape = {"n": (7,), "1n": (1, 7), "scalar": ()}[c]
        ins.append(g.init("C", rng.normal(0, 1, shape).astype(np.float32)))
    g.node("Gemm", ins, ["y"], transB=trans_b, alpha=alpha, beta=beta)
    g.bn("y", 7, "z")
    g.output("z", shape=[3, 7])
    out = check_folded(g)
    assert ops(out) == ["Gemm"]


def test_gemm_with_full_c_is_skipped(rng):
    g = G(rng)
    g.input("x", [3, 5])
    g.node(
        "Gemm",
        [
            "x",
            g.init("B", rng.normal(0, 1, (5, 7)).astype(np.float32)),
            g.init("C", rng.normal(0, 1, (3, 7)).astype(np.float32)),
        ],
        ["y"],
    )
    g.bn("y", 7, "z")
    g.output("z", shape=[3, 7])
    assert_refused(g, SkipReason.BIAS_NOT_PER_CHANNEL, fragment="(3, 7)")


# --------------------------------------------------------------------------- MatMul


def matmul_bn(rng, *, a_shape, add: str | None = None, declare_rank: bool = True) -> G:
    g = G(rng)
    g.input("x", a_shape)
    if not declare_rank:
        g.inputs[-1] = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    f = a_shape[-1]
    g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (f, f)).astype(np.float32))], ["mm"])
    y = "mm"
    if add is not None:
        shape = {"n": (f,), "1n": (1, f), "scalar": ()}[add]
        g.node("Add", ["mm", g.init("c", rng.normal(0, 1, shape).astype(np.float32))], ["y"])
        y = "y"
    g.bn(y, a_shape[1], "z")
    g.output("z", shape=list(a_shape))
    return g


@pytest.mark.parametrize("add", [None, "n", "1n", "scalar"], ids=["matmul", "add-n", "add-1n", "add-scalar"])
def test_matmul_rank2_folds(rng, add):
    g = matmul_bn(rng, a_shape=[4, 6], add=add)
    out = check_folded(g)
    assert ops(out) == (["Gemm"] if add is None else ["MatMul", "Add"])
    # reported as the op the user's model has: a MatMul that became a Gemm printed as "Gemm"
    assert fold_onnx(g.model()).report.folded[0].producer_op == ("MatMul" if add is None else "Add")


def test_matmul_on_sequence_axis_is_not_folded(rng):
    """(N, L, F) with L == F: BN's axis 1 is L, not MatMul's feature axis. onnxruntime's
    MatMulBNFusion and torch.fx's fuse scale the features by the sequence statistics."""
    assert_refused(matmul_bn(rng, a_shape=[2, 6, 6]), SkipReason.CHANNEL_AXIS_MISMATCH, fragment="rank 3")


def test_matmul_add_on_sequence_axis_is_not_folded(rng):
    assert_refused(matmul_bn(rng, a_shape=[2, 6, 6], add="n"), SkipReason.CHANNEL_AXIS_MISMATCH)


def test_matmul_with_unknown_rank_is_not_folded(rng):
    assert_refused(
        matmul_bn(rng, a_shape=[4, 6], declare_rank=False),
        SkipReason.CHANNEL_AXIS_MISMATCH,
        fragment="unknown",
    )


# --------------------------------------------------------------------------- skip reasons


def test_training_mode_bn_is_not_folded(rng):
    """onnxscript's optimizer folds training-mode BN and changes the outputs."""
    g = conv_bn(rng)
    g.nodes[1].attribute.append(helper.make_attribute("training_mode", 1))
    assert_refused(g, SkipReason.TRAINING_MODE)


def test_opset6_is_test_0_is_not_folded(rng):
    g = conv_bn(rng)
    g.opset = 6
    g.ir = 3
    del g.nodes[1].attribute[:]
    g.nodes[1].attribute.append(helper.make_attribute("is_test", 0))
    assert_refused(g, SkipReason.TRAINING_MODE, fragment="is_test")


def test_opset7_spatial0_is_skipped_not_a_crash(rng):
    g = conv_bn(rng)
    g.opset = 7
    g.nodes[1].attribute.append(helper.make_attribute("spatial", 0))
    assert_refused(g, SkipReason.SPATIAL_0)


def test_extra_bn_outputs_consumed(rng):
    g = conv_bn(rng)
    g.opset = 9
    g.nodes[1].output.extend(["rm", "rv"])
    g.output("rm", shape=[6])
    assert_refused(g, SkipReason.EXTRA_OUTPUTS_USED)


def test_opset9_bn_with_unused_statistics_outputs_is_training_mode(rng):
    """Opset 9-13 BN with five outputs runs in training mode in onnxruntime (batch statistics)
    even when the extra outputs are unused: folding it with the running statistics changes Y."""
    g = conv_bn(rng)
    g.opset = 9
    g.nodes[1].output.extend(["rm", "rv", "sm", "sv"])
    assert_refused(g, SkipReason.TRAINING_MODE, fragment="training mode")


def test_bn_on_graph_input_has_no_producer(rng):
    g = G(rng)
    g.input("x", [1, 3, 4, 4])
    g.bn("x", 3, "z")
    g.output("z", shape=[1, 3, 4, 4])
    assert_refused(g, SkipReason.NO_PRODUCER)


def test_conv_relu_bn_is_not_folded(rng):
    g = conv_bn(rng)
    g.nodes[0].output[0] = "c"
    g.nodes.insert(1, helper.make_node("Relu", ["c"], ["y"], name="relu_mid"))
    assert_refused(g, SkipReason.UNSUPPORTED_PRODUCER, fragment="Relu")


def test_conv_output_with_another_consumer_is_not_folded(rng):
    g = conv_bn(rng)
    g.node("Sigmoid", ["y"], ["side"])
    g.output("side", shape=[None] * 4)
    assert_refused(g, SkipReason.PRODUCER_OUTPUT_SHARED)


def test_conv_output_that_is_a_graph_output_is_not_folded(rng):
    g = conv_bn(rng)
    g.output("y", shape=[None] * 4)
    assert_refused(g, SkipReason.PRODUCER_OUTPUT_SHARED)


def test_bn_param_computed_at_run_time(rng):
    g = conv_bn(rng)
    g.input("runtime_scale", [6])
    g.nodes[1].input[1] = "runtime_scale"
    assert_refused(g, SkipReason.NON_CONSTANT_BN_PARAM, fragment="graph input")


def test_weight_initializer_listed_as_input_is_overridable(rng):
    """IR >= 4: an initializer that is also a graph input can be fed at run time; onnxsim and
    onnxslim fold it anyway and bake in a value the caller may replace."""
    g = conv_bn(rng)
    g.inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4, 3, 3]))
    assert_refused(g, SkipReason.NON_CONSTANT_WEIGHT, fragment="overridden")


def test_dequantize_linear_weight_is_not_folded(rng):
    g = conv_bn(rng)
    g.inits = [t for t in g.inits if t.name != "W"]
    g.init("Wq", rng.integers(-100, 100, (6, 4, 3, 3)).astype(np.int8))
    g.init("Ws", np.array(0.02, np.float32))
    g.nodes.insert(0, helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], name="dq"))
    assert_refused(g, SkipReason.QUANTIZED_WEIGHT, fragment="DequantizeLinear")


def test_bn_channel_count_mismatch(rng):
    g = G(rng)
    g.input("x", [2, 5])
    g.node("Gemm", ["x", g.init("B", rng.normal(0, 1, (5, 7)).astype(np.float32))], ["y"])
    names = [g.init(f"p{i}", a) for i, a in enumerate(bn_stats(rng, 1))]  # broadcast (1,) params
    g.nodes.append(helper.make_node("BatchNormalization", ["y", *names], ["z"], name="bn"))
    g.output("z", shape=[2, 7])
    assert_refused(g, SkipReason.SHAPE_MISMATCH)


def test_float16_overflow_is_skipped_not_written_as_inf(rng):
    """gamma/sqrt(var+eps) > 65504: every ONNX peer writes inf into the fp16 weight."""
    g = conv_bn(rng, dtype=np.float16)
    scale = next(t for t in g.inits if t.name == "bn_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full(6, 60000, np.float16), "bn_scale"))
    var = next(t for t in g.inits if t.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(np.full(6, 0.0, np.float16), "bn_var"))
    g.nodes[1].attribute[0].f = 1e-4
    assert_refused(g, SkipReason.NOT_REPRESENTABLE, fragment="overflows float16")


def test_float16_fold_that_fits_is_done_even_when_scale_alone_overflows(rng):
    """scale = gamma/sqrt(var+eps) = 1e5 overflows fp16, but W*scale fits: float64 math folds it."""
    g = conv_bn(rng, dtype=np.float16, bias=False)
    w = next(t for t in g.inits if t.name == "W")
    w.CopyFrom(numpy_helper.from_array((rng.normal(0, 1, (6, 4, 3, 3)) * 1e-4).astype(np.float16), "W"))
    for name, value in (("bn_var", 0.0), ("bn_mean", 0.0)):
        t = next(t for t in g.inits if t.name == name)
        t.CopyFrom(numpy_helper.from_array(np.full(6, value, np.float16), name))
    g.nodes[1].attribute[0].f = 1e-10
    assert 1 / np.sqrt(np.float32(1e-10)) > np.finfo(np.float16).max
    result = fold_onnx(g.model())
    assert len(result.report.folded) == 1
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in result.model.graph.initializer)


def test_float16_channel_flushed_to_zero_is_skipped(rng):
    g = conv_bn(rng, dtype=np.float16)
    scale = next(t for t in g.inits if t.name == "bn_scale")
    vals = np.ones(6, np.float16)
    vals[2] = np.float16(6e-8)  # the smallest fp16 subnormal
    scale.CopyFrom(numpy_helper.from_array(vals, "bn_scale"))
    var = next(t for t in g.inits if t.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(np.full(6, 60000, np.float16), "bn_var"))
    assert_refused(g, SkipReason.NOT_REPRESENTABLE, fragment="channel 2 underflows")


def test_excluded_bn_is_left(rng):
    model = conv_bn(rng).model()
    result = fold_onnx(model, exclude=["z"])
    assert [s.reason for s in result.report.skipped] == [SkipReason.EXCLUDED]
    assert result.model == model


# --------------------------------------------------------------------------- regressions


def test_shared_weight_is_cloned_not_scaled_twice(rng):
    """Two convs share W; only one is followed by BN. Scaling W in place (torch.fx fuse) would
    change the other conv's output."""
    g = conv_bn(rng)
    g.node("Conv", ["x", "W", "B"], ["y2"], pads=[1, 1, 1, 1])
    g.output("y2", shape=[None] * 4)
    out = check_folded(g)
    folded_conv = out.graph.node[0]
    assert folded_conv.input[1] != "W" and folded_conv.input[2] != "B"
    w_orig = next(t for t in g.inits if t.name == "W")
    assert next(t for t in out.graph.initializer if t.name == "W") == w_orig


def test_new_bias_name_collides_with_nothing(rng):
    """A bias-less conv gets a bias; a tensor already named like the natural choice must not clash."""
    g = conv_bn(rng, bias=False)
    for taken in ("conv_0_bias_bnfold", "W_bnfold"):
        g.init(taken, np.zeros(1, np.float32))
        g.node("Identity", [taken], [taken + "_out"])
        g.output(taken + "_out", shape=[1])
    out = check_folded(g)
    names = [t.name for t in out.graph.initializer]
    assert len(names) == len(set(names))


def test_two_folds_sharing_bn_parameters(rng):
    """Two Conv->BN pairs whose BNs share parameter initializers both fold, each correctly."""
    g = conv_bn(rng)
    g.node(
        "Conv",
        ["x", g.init("W2", rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32))],
        ["y2"],
        pads=[1, 1, 1, 1],
    )
    g.nodes.append(
        helper.make_node(
            "BatchNormalization", ["y2", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["z2"], name="bn2"
        )
    )
    g.output("z2", shape=[None] * 4)
    out = check_folded(g, n_folded=2)
    assert not any(t.name.startswith("bn_") for t in out.graph.initializer), "dead BN parameters removed"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_bn_bn_chain_folds_to_fixed_point(rng, bias):
    """Conv -> BN -> BN folds both. Without a bias, the first fold creates the bias that the
    second overwrites in place: protobuf's append() stores a copy, so the pass once kept a
    stale handle and wrote the second fold into nothing (max abs error 2.4)."""
    g = conv_bn(rng, bias=bias)
    g.nodes[2].input[0] = "z2"
    g.nodes.insert(
        2,
        helper.make_node(
            "BatchNormalization",
            ["z", *[g.init(f"bn2_{i}", a) for i, a in enumerate(bn_stats(rng, 6))]],
            ["z2"],
            name="bn2",
        ),
    )
    out = check_folded(g, n_folded=2)
    assert ops(out) == ["Conv", "Relu"]


@pytest.mark.parametrize("source", ["constant", "identity", "constant_of_shape"])
def test_weights_from_constant_nodes_are_constant(rng, source):
    """Weights from Constant, Identity(initializer) or a ConstantOfShape chain fold, and the
    now-dead constant nodes are removed."""
    g = conv_bn(rng)
    w = next(t for t in g.inits if t.name == "W")
    g.inits.remove(w)
    if source == "constant":
        g.nodes.insert(0, helper.make_node("Constant", [], ["W"], value=w, name="cW"))
    elif source == "identity":
        w.name = "W_init"
        g.inits.append(w)
        g.nodes.insert(0, helper.make_node("Identity", ["W_init"], ["W"], name="idW"))
    else:
        shape = numpy_helper.from_array(np.array([6, 4, 3, 3], np.int64), "shape")
        g.nodes.insert(0, helper.make_node("Constant", [], ["Wshape"], value=shape, name="cS"))
        g.nodes.insert(
            1,
            helper.make_node(
                "ConstantOfShape",
                ["Wshape"],
                ["Wones"],
                value=numpy_helper.from_array(np.array([0.25], np.float32)),
                name="cos",
            ),
        )
        g.init("Wmul", rng.normal(0, 1, (6, 1, 1, 1)).astype(np.float32))
        g.nodes.insert(2, helper.make_node("Mul", ["Wones", "Wmul"], ["W"], name="mulW"))
    out = check_folded(g)
    assert ops(out) == ["Conv", "Relu"]


def test_ir3_new_initializers_are_declared_as_inputs(rng):
    """IR 3 requires every initializer to be a graph input; onnxruntime's optimizer and onnxslim
    write invalid models by forgetting that. Here initializers listed as inputs ARE constant."""
    g = conv_bn(rng, bias=False)
    g.opset, g.ir = 7, 3
    for t in g.inits:
        g.inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1
    out = result.model
    inits = {t.name for t in out.graph.initializer}
    assert inits <= {v.name for v in out.graph.input}
    assert not any(v.name.startswith("bn_") for v in out.graph.input), (
        "dead initializers leave graph.input too"
    )
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": g.feeds["x"]}
    assert_close(run_ort(model, feeds), run_ort(out, feeds))


def test_stale_value_info_is_removed(rng):
    g = conv_bn(rng)
    model = g.model()
    model = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == "y" for v in model.graph.value_info)
    out = fold_onnx(model).model
    assert not any(v.name == "y" for v in out.graph.value_info)


def test_inplace_mutates_the_callers_model(rng):
    model = conv_bn(rng).model()
    result = fold_onnx(model, inplace=True)
    assert result.model is model and count_bn(model) == 0


def test_analyze_changes_nothing(rng):
    model = conv_bn(rng).model()
    before = model.SerializeToString()
    report = analyze_onnx(model)
    assert len(report.folded) == 1 and model.SerializeToString() == before


# --------------------------------------------------------------------------- subgraphs and functions


def test_conv_bn_inside_if_branches_with_outer_scope_weights(rng):
    """Conv+BN in both branches of an If, reading W and the BN parameters from the outer graph."""
    g = conv_bn(rng)
    conv, bn, _relu = g.nodes
    g.input("cond", [], np.bool_)
    branches = []
    for name in ("then", "else"):
        c = helper.make_node("Conv", list(conv.input), [f"y_{name}"], name=f"conv_{name}", pads=[1, 1, 1, 1])
        b = helper.make_node(
            "BatchNormalization", [f"y_{name}", *bn.input[1:]], [f"z_{name}"], name=f"bn_{name}", epsilon=1e-3
        )
        r = helper.make_node("Relu" if name == "then" else "Sigmoid", [f"z_{name}"], [f"o_{name}"])
        branches.append(
            helper.make_graph(
                [c, b, r], name, [], [helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, None)]
            )
        )
    g.nodes = [
        helper.make_node("If", ["cond"], ["out"], then_branch=branches[0], else_branch=branches[1], name="if")
    ]
    g.feeds["cond"] = np.array(True)
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 2
    assert {f.graph for f in result.report.folded} == {"if/then_branch", "if/else_branch"}
    assert count_bn(result.model) == 0
    onnx.checker.check_model(result.model, full_check=True)
    for cond in (True, False):
        feeds = {"x": g.feeds["x"], "cond": np.array(cond)}
        assert_close(run_ort(model, feeds), run_ort(result.model, feeds))


def test_conv_bn_inside_a_model_local_function(rng):
    g = G(rng)
    g.input("x", [1, 3, 6, 6])
    g.init("W", rng.normal(0, 1, (5, 3, 3, 3)).astype(np.float32))
    g.nodes.append(helper.make_node("ConvBN", ["x", "W"], ["out"], domain="local", name="call"))
    g.output("out", shape=[1, 5, 4, 4])
    params = [numpy_helper.from_array(a, f"p{i}") for i, a in enumerate(bn_stats(rng, 5))]
    body = [helper.make_node("Constant", [], [f"p{i}"], value=t) for i, t in enumerate(params)]
    body += [
        helper.make_node("Conv", ["X", "Wt"], ["Y"], name="fconv"),
        helper.make_node("BatchNormalization", ["Y", "p0", "p1", "p2", "p3"], ["Z"], name="fbn"),
    ]
    # the weight is a function input, so it is not constant inside the function body
    fn = helper.make_function("local", "ConvBN", ["X", "Wt"], ["Z"], body, [helper.make_opsetid("", 17)])
    model = g.model()
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(fn)
    result = fold_onnx(model)
    assert [s.reason for s in result.report.skipped] == [SkipReason.NON_CONSTANT_WEIGHT]
    # with the weight as a Constant inside the function, it folds
    fn2 = model.functions[0]
    del fn2.input[1:]
    fn2.node.insert(
        0,
        helper.make_node(
            "Constant", [], ["Wt"], value=numpy_helper.from_array(numpy_helper.to_array(g.inits[0]), "Wt")
        ),
    )
    model.graph.node[0].input.pop()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1 and result.report.folded[0].graph == "function:local.ConvBN"
    onnx.checker.check_model(result.model, full_check=True)
    assert_close(run_ort(model, {"x": g.feeds["x"]}), run_ort(result.model, {"x": g.feeds["x"]}))
