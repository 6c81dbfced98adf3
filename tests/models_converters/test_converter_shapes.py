"""Each converter model is shaped as its builder's docstring says the converter writes it, and the
claims hold: hand-written float64 folds of the foldable shapes are exact, naive folds of the traps
change the outputs (onnxruntime at ORT_DISABLE_ALL both ways)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from converter_graph import (
    after,
    attr,
    bn_affine,
    build,
    bypass,
    constants,
    consumers,
    feeds,
    nodes,
    producer,
    rel_err,
    set_initializer,
)
from onnx import helper

from conftest import assert_close, run_ort

# --------------------------------------------------------------------------- torch dynamo exporter


def test_dynamo_bias_is_expand_castlike_of_static_shape_and_evaluates_to_zeros() -> None:
    """The bias torchlib writes for a bias-less conv: only the input's dtype and W's static shape."""
    model = build("torch-dynamo-resnet")
    prod, consts = producer(model), constants(model)
    convs = nodes(model, "Conv")
    assert len(convs) == 6 and len({prod[c.input[2]].input[0] for c in convs}) == 6
    zeros = set()
    for conv in convs:
        expand = prod[conv.input[2]]
        cast, shape = (prod[i] for i in expand.input)
        assert (expand.op_type, cast.op_type, shape.op_type) == ("Expand", "CastLike", "Expand")
        assert cast.input[1] == conv.input[0]  # the conv's data input, a graph input for the stem
        zeros.add(cast.input[0])
        dim0, one = (prod[i] for i in shape.input)
        assert dim0.op_type == "Shape" and dim0.input[0] == conv.input[1]
        assert (attr(dim0, "start"), attr(dim0, "end")) == (0, 1)
        assert one.op_type == "Constant" and list(consts[one.output[0]]) == [1]
        assert consumers(model, conv.output[0])[0].op_type == "BatchNormalization"
    assert len(zeros) == 1 and consts[zeros.pop()].shape == ()
    assert nodes(model, "Conv")[0].input[0] == "x"
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(c.input[2]) for c in convs)
    _, *biases = run_ort(probe, feeds("torch-dynamo-resnet"))
    for conv, bias in zip(convs, biases, strict=True):
        assert bias.shape == (consts[conv.input[1]].shape[0],) and not bias.any()


def test_dynamo_linear_forms() -> None:
    """On (N, F) a Linear is Gemm(transB=1); without a bias, a Gemm with no C (torch 2.13)."""
    model = build("torch-dynamo-linear-bn1d")
    gemms = nodes(model, "Gemm")
    assert [len(g.input) for g in gemms] == [3, 2]
    for gemm in gemms:
        attrs = (attr(gemm, "transA"), attr(gemm, "transB"), attr(gemm, "alpha"), attr(gemm, "beta"))
        assert attrs == (0, 1, 1.0, 1.0)
        assert [n.op_type for n in consumers(model, gemm.output[0])] == ["BatchNormalization"]


def test_levit_reshape_keeps_the_matmul_last_axis_and_folds_exactly() -> None:
    """Folding each BN into the MatMul (columns scaled, bias Add after it) is exact."""
    model, name = build("levit-linear-bn"), "levit-linear-bn"
    consts, prod = constants(model), producer(model)
    bns = nodes(model, "BatchNormalization")
    assert len(bns) == 2
    for bn in bns:
        reshape = prod[bn.input[0]]
        matmul = prod[reshape.input[0]]
        assert (reshape.op_type, matmul.op_type, attr(reshape, "allowzero")) == ("Reshape", "MatMul", 1)
        assert list(consts[reshape.input[1]]) == [10, 16]
        (after,) = consumers(model, bn.output[0])
        assert after.op_type == "Reshape" and list(consts[after.input[1]]) == [2, 5, 16]
    reference = run_ort(model, feeds(name))
    for k, bn in enumerate(bns):
        s, t = bn_affine(model, bn)
        matmul = prod[prod[bn.input[0]].input[0]]
        w = consts[matmul.input[1]].astype(np.float64)
        new_w = set_initializer(model, f"folded_w{k}", (w * s).astype(np.float32))
        bias = set_initializer(model, f"folded_b{k}", t.astype(np.float32))
        matmul.input[1] = new_w
        add = helper.make_node("Add", [f"mm{k}", bias], [matmul.output[0]], name=f"fold_add{k}")
        matmul.output[0] = f"mm{k}"
        model.graph.node.insert(list(model.graph.node).index(matmul) + 1, add)
        bypass(model, bn)
    assert_close(reference, run_ort(model, feeds(name)))


@pytest.mark.parametrize("name", ["mixnet-concat-bn", "trap-concat-branch-shared"])
def test_mixnet_split_fold_is_exact_only_when_each_branch_feeds_only_the_concat(name: str) -> None:
    """Splitting the BN per branch keeps ``silu`` exact; with the 3x3 branch also read by ``aux``
    (the trap), the same split changes ``aux``."""
    model, shared = build(name), name.startswith("trap")
    consts, prod = constants(model), producer(model)
    (bn,) = nodes(model, "BatchNormalization")
    concat = prod[bn.input[0]]
    assert concat.op_type == "Concat" and attr(concat, "axis") == 1
    convs = [prod[i] for i in concat.input]
    assert [list(attr(c, "kernel_shape")) for c in convs] == [[3, 3], [5, 5], [7, 7]]
    assert all(attr(c, "group") == 4 and len(c.input) == 2 for c in convs)
    readers = [[n.op_type for n in consumers(model, c.output[0])] for c in convs]
    assert readers == [["Concat", "GlobalAveragePool"] if shared else ["Concat"], ["Concat"], ["Concat"]]
    assert prod[convs[0].input[0]].op_type == "Split"
    reference = run_ort(model, feeds(name))
    s, t = bn_affine(model, bn)
    for k, conv in enumerate(convs):
        w = consts[conv.input[1]].astype(np.float64)
        part = slice(4 * k, 4 * k + 4)
        conv.input[1] = set_initializer(model, f"w{k}", (w * s[part, None, None, None]).astype(np.float32))
        conv.input.append(set_initializer(model, f"b{k}", t[part].astype(np.float32)))
    bypass(model, bn)
    folded = run_ort(model, feeds(name))
    assert_close(reference[:1], folded[:1])
    if shared:
        assert rel_err(reference[1], folded[1]) > 1e-2


# --------------------------------------------------------------------------- tf2onnx, keras 3


def test_keras3_export_leaves_bn_as_mul_add_after_depthwise_and_dense_only() -> None:
    """Regular convs arrive with BN merged (3 inputs); depthwise convs and the Dense keep Mul -> Add."""
    model = build("keras3-mobilenet")
    consts, prod = constants(model), producer(model)
    assert not nodes(model, "BatchNormalization")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "unk__66"
    merged = [c for c in nodes(model, "Conv") if len(c.input) == 3]
    assert [c.name for c in merged] == ["Conv__36", "Conv__46"]
    assert [n.op_type for n in consumers(model, merged[0].output[0])] == ["Clip"]
    assert list(attr(merged[0], "pads")) == [0, 0, 1, 1]  # TensorFlow's "same" at stride 2
    seen = []
    for mul in nodes(model, "Mul"):
        (add,) = consumers(model, mul.output[0])
        layer = prod[mul.input[0]]
        c = consts[mul.input[1]].size
        shape = (c,) if layer.op_type == "MatMul" else (1, c, 1, 1)
        assert add.op_type == "Add" and consts[mul.input[1]].shape == consts[add.input[1]].shape == shape
        assert not np.allclose(consts[mul.input[1]], 1.0) and not np.allclose(consts[add.input[1]], 0.0)
        seen.append((layer.op_type, attr(layer, "group")))
    assert seen == [("Conv", 8), ("Conv", 16), ("MatMul", None)]


def test_keras3_raw_writes_the_shift_as_a_bias_add_behind_a_transpose() -> None:
    model = build("keras3-tf2onnx-raw")
    consts, prod = constants(model), producer(model)
    chains = []
    for layer in [*nodes(model, "Conv"), *nodes(model, "MatMul")]:
        first, perm = after(model, layer.output[0], ("Transpose",))
        ops = [first.op_type]
        if first.op_type == "Mul":
            ops.append(consumers(model, first.output[0])[0].op_type)
        c = consts[first.input[1]].shape
        chains.append((layer.op_type, attr(layer, "group"), perm, ops, c))
    assert chains == [
        ("Conv", 1, [0, 2, 3, 1], ["Add"], (8,)),
        ("Conv", 8, [0, 2, 3, 1], ["Mul", "Add"], (8,)),
        ("Conv", 1, [0, 2, 3, 1], ["Add"], (16,)),
        ("Conv", 16, [0, 2, 3, 1], ["Mul", "Add"], (16,)),
        ("MatMul", None, [], ["Mul", "Add"], (10,)),
    ]
    dw = nodes(model, "Conv")[1]
    transpose = prod[dw.input[1]]
    reshape = prod[transpose.input[0]]
    assert (transpose.op_type, list(attr(transpose, "perm")), reshape.op_type) == (
        "Transpose",
        [3, 2, 0, 1],
        "Reshape",
    )
    assert consts[reshape.input[0]].shape == (3, 3, 8, 1) and list(consts[reshape.input[1]]) == [3, 3, 1, 8]


def test_keras3_raw_bias_add_behind_the_transpose_folds_exactly() -> None:
    """Absorbing ``Transpose -> Add (C,)`` into the conv's bias (and keeping the Transpose) is exact."""
    name = "keras3-tf2onnx-raw"
    model = build(name)
    consts = constants(model)
    reference = run_ort(model, feeds(name))
    for k, conv in enumerate(c for c in nodes(model, "Conv") if attr(c, "group") == 1):
        add, _ = after(model, conv.output[0], ("Transpose",))
        conv.input.append(set_initializer(model, f"bias{k}", consts[add.input[1]]))
        bypass(model, add)
    assert_close(reference, run_ort(model, feeds(name)))


@pytest.mark.parametrize("name", ["tf2onnx-raw-nhwc", "tf2onnx-raw-conv3d"])
def test_tf2onnx_raw_transposes_around_bn_compose_to_the_identity(name: str) -> None:
    model = build(name)
    prod = producer(model)
    rank = 5 if name.endswith("conv3d") else 4
    layers = []
    for bn in nodes(model, "BatchNormalization"):
        perm, node = list(range(rank)), prod[bn.input[0]]
        while node.op_type == "Transpose":
            perm = [perm[i] for i in attr(node, "perm")]
            node = prod[node.input[0]]
        assert perm == list(range(rank)), (bn.name, perm)
        after = consumers(model, bn.output[0])[0]
        assert after.op_type == "Transpose" and attr(bn, "epsilon") == pytest.approx(1e-3)
        weight = prod[node.input[1]]  # the layer's weight: a Transpose of the HWIO initializer
        assert weight.op_type == "Transpose" and weight.input[0] in constants(model)
        layers.append((node.op_type, len(node.input)))
    expected = {"tf2onnx-raw-nhwc": [("Conv", 3), ("Conv", 2), ("ConvTranspose", 3)]}
    assert layers == expected.get(name, [("Conv", 2)])
    assert [o.name for o in model.graph.output] == ["Identity:0"]


def test_resnetv2_preactivation_bn_producers() -> None:
    """The BN left after tf2onnx: one reads MaxPool, one an Add that the next block's Add also reads."""
    model = build("resnetv2-preact")
    prod = producer(model)
    kinds = []
    for bn in nodes(model, "BatchNormalization"):
        p = prod[bn.input[0]]
        kinds.append((p.op_type, sorted(n.op_type for n in consumers(model, p.output[0]))))
    assert kinds == [
        ("MaxPool", ["BatchNormalization"]),  # block 1 has a conv shortcut, reading the preact
        ("Add", ["Add", "BatchNormalization"]),
        ("Add", ["BatchNormalization"]),
    ]
    fused = [c for c in nodes(model, "Conv") if c.input[1].endswith("Conv2D_weights_fused_bn")]
    assert len(fused) == 2 and all(c.output[0].endswith("_1_bn/FusedBatchNormV3:0") for c in fused)


def test_paddle2onnx_bias_add_and_identities_before_bn() -> None:
    model = build("paddle2onnx-identity-bn")
    consts, prod = constants(model), producer(model)
    seen = []
    for bn in nodes(model, "BatchNormalization"):
        chain, node = [], prod[bn.input[0]]
        while node.op_type in ("Identity", "Add"):
            chain.append(node.op_type)
            if node.op_type == "Add":
                bias = consts[node.input[1]].shape
            node = prod[node.input[0]]
        seen.append((node.op_type, chain, bias))
    assert seen == [
        ("Conv", ["Identity", "Add"], (1, 8, 1, 1)),
        ("ConvTranspose", ["Identity", "Add", "Identity"], (1, 4, 1, 1)),
        ("MatMul", ["Identity", "Add"], (6,)),
    ]
    assert model.graph.name == "PaddlePaddle Graph in PIR mode" and model.opset_import[0].version == 11


# --------------------------------------------------------------------------- BN before a layer


def test_arcface_head_folds_forward_through_flatten_exactly() -> None:
    """bn2 -> Flatten -> Gemm: W' = W * s (repeated over H*W), b' = b + W @ t."""
    model, name = build("arcface-head"), "arcface-head"
    consts, prod = constants(model), producer(model)
    gemm = nodes(model, "Gemm")[0]
    chain = [prod[gemm.input[0]]]
    while chain[-1].op_type != "BatchNormalization":
        chain.append(prod[chain[-1].input[0]])
    assert [n.op_type for n in chain] == ["Flatten", "BatchNormalization"]
    bn2 = chain[-1]
    assert prod[bn2.input[0]].op_type == "Add"
    assert [n.op_type for n in consumers(model, gemm.output[0])] == ["BatchNormalization"]
    reference = run_ort(model, feeds(name))
    s, t = (np.repeat(a, 16) for a in bn_affine(model, bn2))  # (C,) -> (C*H*W,) in Flatten's order
    w, b = (consts[i].astype(np.float64) for i in gemm.input[1:])
    gemm.input[1] = set_initializer(model, "fc.weight", (w * s).astype(np.float32))
    gemm.input[2] = set_initializer(model, "fc.bias", (b + w @ t).astype(np.float32))
    bypass(model, bn2)
    assert_close(reference, run_ort(model, feeds(name)))


def _fold_forward_into_conv(model: onnx.ModelProto, bn: onnx.NodeProto) -> None:
    """W' = W * s on the input-channel axis, b' = b + sum W * t: exact only without padding."""
    consts = constants(model)
    (conv,) = consumers(model, bn.output[0])
    s, t = bn_affine(model, bn)
    w = consts[conv.input[1]].astype(np.float64)
    b = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else np.zeros(w.shape[0])
    conv.input[1] = set_initializer(model, conv.input[1], (w * s[None, :, None, None]).astype(np.float32))
    bias = set_initializer(
        model, f"{conv.name}_folded_bias", (b + np.einsum("oikl,i->o", w, t)).astype(np.float32)
    )
    conv.input[2:] = [bias]
    bypass(model, bn)


@pytest.mark.parametrize(
    ("bn_name", "exact"), [("stage1_unit1_bn3", True), ("bn_data", False)], ids=["unpadded", "padded"]
)
def test_mxnet_forward_fold_is_exact_only_into_the_unpadded_conv(bn_name: str, exact: bool) -> None:
    """Without padding the forward fold is exact; into conv0 (pads 3) the border changes."""
    model, name = build("mxnet-bn-data"), "mxnet-bn-data"
    bn = next(n for n in model.graph.node if n.name == bn_name)
    (conv,) = consumers(model, bn.output[0])
    assert set(attr(conv, "pads")) == ({0} if exact else {3})
    reference = run_ort(model, feeds(name))
    _fold_forward_into_conv(model, bn)
    err = rel_err(reference[0], run_ort(model, feeds(name))[0])
    assert err <= 1e-5 if exact else err > 1e-2, err


def test_tabular_bn_feeds_the_gemm_directly() -> None:
    model = build("tabular-bn-first")
    (bn,) = nodes(model, "BatchNormalization")
    assert bn.input[0] == "input"
    assert [(n.op_type, attr(n, "transB")) for n in consumers(model, bn.output[0])] == [("Gemm", 1)]


# --------------------------------------------------------------------------- bias Add and traps


def test_conv_bias_add_constants_broadcast_along_channels() -> None:
    model = build("conv-bias-add")
    consts, prod = constants(model), producer(model)
    adds = nodes(model, "Add")
    assert [consts[a.input[1]].shape for a in adds] == [(1, 8, 1, 1), (8, 1, 1)]
    assert all(prod[a.input[0]].op_type == "Conv" and len(prod[a.input[0]].input) == 2 for a in adds)


def test_trap_mul_by_c_vector_scales_the_last_axis_not_the_channels() -> None:
    """Folding the (C,) Mul as a per-channel scale (onnxslim's ConvMul) changes the outputs."""
    model, name = build("trap-mul-last-axis"), "trap-mul-last-axis"
    (mul,) = nodes(model, "Mul")
    scale = constants(model)[mul.input[1]]
    conv_shape = [d.dim_value for d in model.graph.value_info[0].type.tensor_type.shape.dim]
    assert scale.shape == (8,) and conv_shape == [1, 8, 8, 8]
    reference = run_ort(model, feeds(name))
    set_initializer(model, mul.input[1], scale.reshape(1, 8, 1, 1))
    assert rel_err(reference[0], run_ort(model, feeds(name))[0]) > 1e-2


def test_trap_grouped_conv_add_is_not_per_channel() -> None:
    model = build("trap-grouped-add-chw")
    (add,) = nodes(model, "Add")
    pos = constants(model)[add.input[1]]
    assert attr(producer(model)[add.input[0]], "group") == 4
    assert pos.shape == (1, 8, 6, 6) and np.ptp(pos, axis=(2, 3)).min() > 0.1


def test_trap_div_has_one_zero_divisor() -> None:
    model = build("trap-div-by-zero")
    (div,) = nodes(model, "Div")
    d = constants(model)[div.input[1]]
    assert d.shape == (1, 8, 1, 1) and (d == 0).sum() == 1 and d[0, 3, 0, 0] == 0
    assert [n.op_type for n in consumers(model, div.output[0])] == ["Add"]


def test_trap_reshape_merges_the_conv_channel_axis() -> None:
    model = build("trap-reshape-merges-channel")
    (bn,) = nodes(model, "BatchNormalization")
    reshape = producer(model)[bn.input[0]]
    assert reshape.op_type == "Reshape" and list(constants(model)[reshape.input[1]]) == [1, 32, 4]
    assert producer(model)[reshape.input[0]].op_type == "Conv"
    assert constants(model)[bn.input[1]].shape == (32,)
