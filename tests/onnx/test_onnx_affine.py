"""Mul/Add/Sub/Div chains and bias Adds after a layer (issue 12 items 2 and 5), constants from
static metadata (item 1), and the look-through paths (items 3 and 6): a positive test per
shape, a negative test per new reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import SkipReason, count_bn, fold_onnx
from conftest import assert_close, run_ort
from onnx_builders import G, assert_refused, assert_untouched


def conv_then(
    rng, ops: list[tuple[str, tuple[int, ...] | None, bool]], *, bias: bool = False, c: int = 6
) -> G:
    """x (2,4,7,7) -> Conv (c out) -> each (op, constant shape, activation first) -> Relu -> out."""
    g = G(rng)
    g.input("x", [2, 4, 7, 7])
    ins = ["x", g.init("W", rng.normal(0, 1, (c, 4, 3, 3)).astype(np.float32))]
    if bias:
        ins.append(g.init("B", rng.normal(0, 1, c).astype(np.float32)))
    g.node("Conv", ins, ["y0"], pads=[1, 1, 1, 1])
    prev = "y0"
    for i, (op, shape, act_first) in enumerate(ops):
        value = rng.uniform(0.5, 1.5, shape or ()) * rng.choice([-1.0, 1.0], shape or ())
        k = g.init(f"k{i}", value.astype(np.float32))
        g.node(op, [prev, k] if act_first else [k, prev], [f"y{i + 1}"])
        prev = f"y{i + 1}"
    g.node("Relu", [prev], ["out"])
    g.output("out", shape=[2, c, 7, 7])
    return g


def fold_checked(g: G, *, n_folded: int, rtol: float = 2e-6) -> onnx.ModelProto:
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == n_folded, result.report
    onnx.checker.check_model(result.model, full_check=True)
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds), rtol=rtol)
    assert not fold_onnx(result.model).report.folded
    verified = fold_onnx(model, verify=True)
    assert verified.verification.passed and len(verified.report.folded) == n_folded
    return result.model


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


CHAINS = {
    "keras-mul-add": [("Mul", (1, 6, 1, 1), True), ("Add", (1, 6, 1, 1), True)],
    "chw-constants": [("Mul", (6, 1, 1), True), ("Add", (6, 1, 1), True)],
    "long-mixed": [
        ("Add", (1, 6, 1, 1), True),
        ("Mul", (1, 6, 1, 1), False),
        ("Sub", (1, 6, 1, 1), True),
        ("Div", (1, 6, 1, 1), True),
        ("Sub", (1, 6, 1, 1), False),
        ("Mul", (), True),
    ],
    "with-scalars": [("Mul", (), True), ("Add", (1, 6, 1, 1), True), ("Mul", (1, 1, 1, 1), True)],
}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chain", list(CHAINS), ids=list(CHAINS))
def test_mul_add_chain_folds_into_the_conv(rng, chain, bias):
    out = fold_checked(conv_then(rng, CHAINS[chain], bias=bias), n_folded=1)
    assert ops(out) == ["Conv", "Relu"]
    f = fold_onnx(conv_then(rng, CHAINS[chain], bias=bias).model()).report.folded[0]
    assert (f.source, f.direction, f.producer_op, f.output) == (
        "mul-add chain",
        "backward",
        "Conv",
        f"y{len(CHAINS[chain])}",
    )


def test_negative_and_zero_scales_fold(rng):
    g = conv_then(rng, [("Mul", (1, 6, 1, 1), True), ("Add", (1, 6, 1, 1), True)])
    k0 = next(t for t in g.inits if t.name == "k0")
    k0.CopyFrom(
        numpy_helper.from_array(np.array([-2, 0, 1.5, -0.5, 0, 3], np.float32).reshape(1, 6, 1, 1), "k0")
    )
    out = fold_checked(g, n_folded=1)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == conv.input[1]))
    assert not w[1].any() and not w[4].any()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1)], ids=["1c11", "c11"])
def test_bias_add_goes_into_the_conv_bias(rng, shape, bias):
    g = conv_then(rng, [("Add", shape, True), ("Sub", shape, True)], bias=bias)
    out = fold_checked(g, n_folded=1)
    assert ops(out) == ["Conv", "Relu"]
    f = fold_onnx(g.model()).report.folded[0]
    assert f.source == "bias add"
    w = next(t for t in out.graph.initializer if t.name == "W")
    assert numpy_helper.to_array(w).tolist() == numpy_helper.to_array(g.inits[0]).tolist(), "weight untouched"


@pytest.mark.parametrize(
    "chain",
    [[("Mul", (), True), ("Add", (1, 1, 1, 1), True)], [("Add", (), True)], [("Div", (), True)]],
    ids=["mul-add", "add", "div"],
)
def test_chains_of_scalars_alone_are_left_alone(rng, chain):
    """``x * 0.5`` (GELU), attention's ``* scale``: not BN-like; nothing folded, nothing reported."""
    assert_untouched(conv_then(rng, chain))


def test_dense_mul_add_with_vector_constants_folds(rng):
    """keras' Dense -> BN on a rank-2 tensor: (C,) constants broadcast along axis 1 = channels."""
    g = G(rng)
    g.input("x", [3, 5])
    g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (5, 7)).astype(np.float32))], ["mm"])
    g.node("Add", ["mm", g.init("c", rng.normal(0, 1, 7).astype(np.float32))], ["d"])
    g.node("Mul", ["d", g.init("s", rng.uniform(0.5, 2, 7).astype(np.float32))], ["e"])
    g.node("Add", ["e", g.init("t", rng.normal(0, 1, 7).astype(np.float32))], ["out"])
    g.output("out", shape=[3, 7])
    out = fold_checked(g, n_folded=1)
    assert ops(out) == ["Gemm"]


def test_matmul_then_bias_add_alone_stays(rng):
    """MatMul -> Add(c) is a layer with its bias: nothing to fold, nothing reported."""
    g = G(rng)
    g.input("x", [3, 5])
    g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (5, 7)).astype(np.float32))], ["mm"])
    g.node("Add", ["mm", g.init("c", rng.normal(0, 1, 7).astype(np.float32))], ["out"])
    g.output("out", shape=[3, 7])
    assert_untouched(g)


def test_layer_scale_after_a_rank3_linear_folds_into_its_weight(rng):
    """Linear on (B, N, C) -> Mul (C,): (C,) is on the last axis, the MatMul's features."""
    g = G(rng)
    g.input("x", [2, 5, 4])
    g.node("MatMul", ["x", g.init("B", rng.normal(0, 1, (4, 6)).astype(np.float32))], ["mm"])
    g.node("Mul", ["mm", g.init("gamma", rng.uniform(0.5, 2, 6).astype(np.float32))], ["y"])
    g.node("Add", ["y", g.init("beta", rng.normal(0, 1, 6).astype(np.float32))], ["out"])
    g.output("out", shape=[2, 5, 6])
    out = fold_checked(g, n_folded=1)
    assert ops(out) == ["MatMul", "Add"]


def test_vector_constant_on_a_4d_tensor_is_per_last_axis(rng):
    """(C,) on (N,C,H,W) scales W's axis, not channels (onnxslim folds it as per-channel)."""
    g = conv_then(rng, [("Mul", (7,), True)])
    assert_refused(g, SkipReason.CONSTANT_ON_LAST_AXIS, fragment="last axis")


def test_full_chw_constant_is_not_per_channel(rng):
    g = conv_then(rng, [("Add", (1, 6, 7, 7), True)])
    assert_refused(g, SkipReason.NOT_PER_CHANNEL, fragment="(1, 6, 7, 7)")


def test_division_by_zero_is_refused(rng):
    g = conv_then(rng, [("Div", (1, 6, 1, 1), True), ("Add", (1, 6, 1, 1), True)])
    k0 = next(t for t in g.inits if t.name == "k0")
    k0.CopyFrom(numpy_helper.from_array(np.array([1, 2, 0, 3, 4, 5], np.float32).reshape(1, 6, 1, 1), "k0"))
    assert_refused(g, SkipReason.DIVISION_BY_ZERO, fragment="zero")


def test_constant_divided_by_activation_is_not_a_chain(rng):
    g = conv_then(rng, [("Div", (1, 6, 1, 1), False)])
    assert_untouched(g)


def test_chain_after_a_layer_with_run_time_weights_is_not_reported(rng):
    """Attention's ``Q @ K^T / sqrt(d)``: a Div after a MatMul of two activations is no fold candidate."""
    g = G(rng)
    g.input("q", [2, 3, 4])
    g.input("k", [2, 4, 3])
    g.node("MatMul", ["q", "k"], ["s"])
    g.node("Div", ["s", g.init("d", np.array(2.0, np.float32))], ["out"])
    g.output("out", shape=[2, 3, 3])
    assert_untouched(g)


def test_mul_by_an_activation_is_not_a_chain(rng):
    """Squeeze-and-excitation's ``x * sigmoid(...)`` is not affine by a constant."""
    g = conv_then(rng, [])
    g.nodes.insert(-1, helper.make_node("Sigmoid", ["y0"], ["sg"]))
    g.nodes.insert(-1, helper.make_node("Mul", ["y0", "sg"], ["y9"]))
    g.nodes[-1].input[0] = "y9"
    assert_untouched(g)


# --------------------------------------------------------------------------- static metadata


def conv_with_computed_zero_bias(rng, *, shape_of: str, dynamic_batch: bool = False) -> G:
    """torch dynamo (optimize=False): bias = Expand(CastLike(0, x), Shape(<shape_of>, start, end))."""
    g = G(rng)
    g.input("x", [2, 4, 7, 7])
    if dynamic_batch:
        g.inputs[-1] = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 7])
    w = g.init("W", rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32))
    g.nodes.append(
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64)))
    )
    g.node("CastLike", ["zero", "x"], ["zero_f"])
    start, end = (0, 1) if shape_of == "W" else (1, 2)
    src = "W" if shape_of == "W" else "y_pre"
    if shape_of != "W":  # the Shape of an activation with 6 static channels
        g.node("Conv", ["x", w], ["y_pre"], pads=[1, 1, 1, 1])
        g.node("Relu", ["y_pre"], ["side"])
        g.output("side", shape=[None, 6, 7, 7])
    g.node("Shape", [src], ["dims"], start=start, end=end)
    g.node("Expand", ["zero_f", "dims"], ["bias"])
    g.node("Conv", ["x", w, "bias"], ["y"], pads=[1, 1, 1, 1])
    g.bn("y", 6, "z")
    g.output("z", shape=[None, 6, 7, 7])
    return g


@pytest.mark.parametrize("shape_of", ["W", "activation"])
def test_bias_from_castlike_and_shape_is_constant(rng, shape_of):
    """CastLike reads only its second input's element type; Shape a static shape."""
    g = conv_with_computed_zero_bias(rng, shape_of=shape_of)
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1, result.report.skipped
    assert count_bn(result.model) == 0
    assert not {"CastLike", "Expand"} & set(ops(result.model))
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))


def test_shape_of_a_dynamic_dimension_is_not_constant(rng):
    g = conv_with_computed_zero_bias(rng, shape_of="activation", dynamic_batch=True)
    g.nodes[[n.op_type for n in g.nodes].index("Shape")].attribute[0].i = 0  # start=0: the batch dim
    g.nodes[[n.op_type for n in g.nodes].index("Shape")].attribute[1].i = 1
    result = fold_onnx(g.model())
    assert [s.reason for s in result.report.skipped] == [SkipReason.NON_CONSTANT_WEIGHT]
    assert "not static" in result.report.skipped[0].detail


def gemm_bn_with_metadata_readers(rng, *, survivor: bool) -> G:
    """torch dynamo's BatchNorm1d(affine=False): gamma/beta are ``Expand(CastLike(1|0, y),
    Shape(y, start=1, end=2))``, so the Gemm output ``y`` has readers of its type and shape
    besides the BN. ``survivor``: one more ``Shape(y)`` feeds a Reshape that stays."""
    g = G(rng)
    g.input("x", [3, 5])
    g.node("Gemm", ["x", g.init("W", rng.normal(0, 1, (5, 4)).astype(np.float32))], ["y"])
    params = []
    for name, v in (("one", 1.0), ("zero", 0.0)):
        g.nodes.append(
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
        )
        g.node("CastLike", [name, "y"], [f"{name}_c"])
        g.node("Shape", ["y"], [f"{name}_dims"], start=1, end=2)
        g.node("Expand", [f"{name}_c", f"{name}_dims"], [f"{name}_vec"])
        params.append(f"{name}_vec")
    stats = [
        g.init("mean", rng.normal(0, 1, 4).astype(np.float32)),
        g.init("var", rng.uniform(0.5, 2, 4).astype(np.float32)),
    ]
    g.nodes.append(helper.make_node("BatchNormalization", ["y", *params, *stats], ["z"], name="bn"))
    out = "z"
    if survivor:
        g.node("Shape", ["y"], ["dims"])
        g.node("Reshape", ["z", "dims"], ["out"])
        out = "out"
    g.output(out, shape=[3, 4])
    return g


@pytest.mark.parametrize("survivor", [False, True], ids=["params-only", "shape-reused"])
def test_readers_of_type_and_shape_do_not_block_a_fold(rng, survivor):
    """Such a BN was left as producer-output-shared; the metadata readers now read the BN's
    output (same type and shape) and the model stays valid."""
    g = gemm_bn_with_metadata_readers(rng, survivor=survivor)
    out = fold_checked(g, n_folded=1)
    assert count_bn(out) == 0
    assert "y" not in {o for n in out.graph.node for o in n.output}
    if survivor:
        shape_node = next(n for n in out.graph.node if n.op_type == "Shape")
        assert shape_node.input[0] == "z"


# --------------------------------------------------------------------------- look-through paths


def gemm_path_bn(rng, op: str) -> G:
    """x (3, 5) -> Gemm (7) -> <op> -> BN -> out: the BN reads the Gemm's features through op."""
    g = G(rng)
    g.input("x", [3, 5])
    g.node("Gemm", ["x", g.init("W", rng.normal(0, 1, (5, 7)).astype(np.float32))], ["y"])
    shape = [3, 7]
    if op == "Unsqueeze":
        g.node("Unsqueeze", ["y", g.init("axes", np.array([2, 3], np.int64))], ["p"])
        shape = [3, 7, 1, 1]
    elif op == "Dropout-training":
        g.node(
            "Dropout",
            ["y", g.init("ratio", np.array(0.0, np.float32)), g.init("train", np.array(True))],
            ["p"],
        )
    else:
        g.node(op, ["y"], ["p"])
    g.bn("p", 7, "z")
    g.output("z", shape=shape)
    return g


@pytest.mark.parametrize("op", ["Identity", "Dropout", "Unsqueeze"])
def test_bn_folds_through_a_look_through_op(rng, op):
    g = gemm_path_bn(rng, op)
    out = fold_checked(g, n_folded=1)
    f = fold_onnx(g.model()).report.folded[0]
    assert (f.through, f.producer_op) == ((op,), "Gemm")
    writers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert writers["z"] == op and "y" not in writers and "p" not in writers


def test_dropout_in_training_mode_is_not_looked_through(rng):
    assert_refused(gemm_path_bn(rng, "Dropout-training"), SkipReason.UNSUPPORTED_PRODUCER, fragment="Dropout")


def test_transpose_whose_output_is_read_elsewhere_blocks_the_fold(rng):
    g = gemm_path_bn(rng, "Identity")
    g.nodes[1].op_type = "Transpose"
    g.nodes[1].attribute.extend([helper.make_attribute("perm", [0, 1])])
    g.node("Neg", ["p"], ["side"])
    g.output("side", shape=[3, 7])
    assert_refused(g, SkipReason.PRODUCER_OUTPUT_SHARED, fragment="Transpose")
