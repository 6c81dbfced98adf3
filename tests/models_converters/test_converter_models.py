"""The converter-shaped models (models.converters, issue 12): valid, runnable, seeded, non-trivial, and
shaped exactly as their docstrings say the converters write them.

These tests do not fold with bnfold (the pass is being rewritten); they check the models themselves,
and, with small hand-written folds in float64, that the claims the docstrings make are true: the
foldable shapes fold exactly, and the traps really change the outputs when folded naively.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import assert_close, run_ort
from models import converters, registry
from models.__main__ import main as zoo_main

NAMES = registry.converter_names()


def _build(name: str, seed: int = 0) -> onnx.ModelProto:
    return converters.build(name, seed)


def _feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    return registry.example_arrays(name, seed=seed)


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node values, by name."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            attr = n.attribute[0]
            value = helper.get_attribute_value(attr)
            out[n.output[0]] = numpy_helper.to_array(value) if attr.name == "value" else np.array(value)
    return out


def _producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def _attr(node: onnx.NodeProto, name: str) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _rel_err(ref: np.ndarray, out: np.ndarray) -> float:
    r, o = ref.astype(np.float64), out.astype(np.float64)
    return float(np.abs(r - o).max() / max(np.abs(r).max(), 1e-30))


def _bn_affine(model: onnx.ModelProto, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """BN as ``y = x * s + t`` in float64."""
    c = _constants(model)
    gamma, beta, mean, var = (c[i].astype(np.float64) for i in bn.input[1:])
    eps = _attr(bn, "epsilon")
    s = gamma / np.sqrt(var + (1e-5 if eps is None else eps))
    return s, beta - mean * s


def _set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
            return name
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Remove a one-input-one-output node, its consumers reading its input instead."""
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name == node.output[0]:
                n.input[i] = node.input[0]
    model.graph.node.remove(node)


# --------------------------------------------------------------------------- every model


def test_every_builder_has_one_registry_entry() -> None:
    assert list(converters.BUILDERS) == NAMES and len(set(NAMES)) == len(NAMES)
    assert not set(NAMES) & set(registry.REGISTRY)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_passes_the_full_checker_and_matches_its_registry_entry(name: str) -> None:
    model = _build(name)
    onnx.checker.check_model(model, full_check=True)
    spec = registry.get(name)
    assert spec.source == "converter" and name not in registry.REGISTRY
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    # a symbolic batch (keras' ``unk__66``) is fed as 1
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    shapes = {k: tuple(d.dim_value if d.HasField("dim_value") else 1 for d in v) for k, v in dims.items()}
    assert shapes == spec.inputs
    assert registry.count_bn(model) == spec.bn_count


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_runs_at_disable_all_with_finite_outputs(name: str) -> None:
    model = _build(name)
    outs = run_ort(model, _feeds(name))
    assert len(outs) == len(model.graph.output)
    for out, info in zip(outs, model.graph.output, strict=True):
        expected = tuple(
            d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim
        )
        assert out.shape == expected and out.dtype == np.float32 and out.size > 0
    out = outs[0]
    if name == "trap-div-by-zero":  # channel 3 is divided by zero, the others are finite
        assert not np.isfinite(out[:, 3]).any() and np.isfinite(np.delete(out, 3, axis=1)).all()
    else:
        assert all(np.isfinite(o).all() for o in outs) and np.abs(out).max() > 0.1


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_is_small_float32_and_deterministic_in_its_seed(name: str) -> None:
    data = _build(name, 3).SerializeToString()
    assert len(data) < 1 << 20
    assert _build(name, 3).SerializeToString() == data
    assert _build(name, 4).SerializeToString() != data
    model = _build(name)
    floats = [
        t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    ]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT for t in floats)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).bn_count], ids=str)
def test_bn_statistics_are_non_trivial(name: str) -> None:
    model = _build(name)
    consts = _constants(model)
    for bn in _nodes(model, "BatchNormalization"):
        gamma, beta, mean, var = (consts[i] for i in bn.input[1:])
        assert not np.allclose(gamma, 1.0) and (np.abs(gamma) >= 0.5).all(), bn.name
        assert not np.allclose(beta, 0.0) and not np.allclose(mean, 0.0), bn.name
        assert (var >= 0.5).all() and np.ptp(var) > 0.05, bn.name
        assert _attr(bn, "training_mode") in (None, 0), bn.name


def test_cli_builds_a_converter_model_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zoo_main(["build", "--out", str(tmp_path), "tf2onnx-raw-nhwc", "keras3-mobilenet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " 3 BN " in lines[0] and " 0 BN " in lines[1]
    assert (tmp_path / "tf2onnx-raw-nhwc.onnx").read_bytes() == _build("tf2onnx-raw-nhwc").SerializeToString()
    cached = registry.build_onnx("mixnet-concat-bn", cache_dir=tmp_path / "cache", seed=2)
    assert cached.read_bytes() == _build("mixnet-concat-bn", 2).SerializeToString()
    with pytest.raises(registry.ZooError, match="no PyTorch module"):
        registry.build_torch("levit-linear-bn")


# --------------------------------------------------------------------------- torch dynamo exporter


def test_dynamo_bias_is_expand_castlike_of_static_shape_and_evaluates_to_zeros() -> None:
    """The bias torchlib writes for a bias-less conv: only the input's dtype and W's static shape."""
    model = _build("torch-dynamo-resnet")
    prod, consts = _producer(model), _constants(model)
    convs = _nodes(model, "Conv")
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
        assert (_attr(dim0, "start"), _attr(dim0, "end")) == (0, 1)
        assert one.op_type == "Constant" and list(consts[one.output[0]]) == [1]
        assert _consumers(model, conv.output[0])[0].op_type == "BatchNormalization"
    assert len(zeros) == 1 and consts[zeros.pop()].shape == ()
    assert _nodes(model, "Conv")[0].input[0] == "x"
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(c.input[2]) for c in convs)
    _, *biases = run_ort(probe, _feeds("torch-dynamo-resnet"))
    for conv, bias in zip(convs, biases, strict=True):
        assert bias.shape == (consts[conv.input[1]].shape[0],) and not bias.any()


def test_dynamo_linear_forms() -> None:
    """On (N, F) a Linear is Gemm(transB=1); without a bias, a Gemm with no C (torch 2.13)."""
    model = _build("torch-dynamo-linear-bn1d")
    gemms = _nodes(model, "Gemm")
    assert [len(g.input) for g in gemms] == [3, 2]
    for gemm in gemms:
        attrs = (_attr(gemm, "transA"), _attr(gemm, "transB"), _attr(gemm, "alpha"), _attr(gemm, "beta"))
        assert attrs == (0, 1, 1.0, 1.0)
        assert [n.op_type for n in _consumers(model, gemm.output[0])] == ["BatchNormalization"]


def test_levit_reshape_keeps_the_matmul_last_axis_and_folds_exactly() -> None:
    """Folding each BN into the MatMul (columns scaled, bias Add after it) is exact."""
    model, name = _build("levit-linear-bn"), "levit-linear-bn"
    consts, prod = _constants(model), _producer(model)
    bns = _nodes(model, "BatchNormalization")
    assert len(bns) == 2
    for bn in bns:
        reshape = prod[bn.input[0]]
        matmul = prod[reshape.input[0]]
        assert (reshape.op_type, matmul.op_type, _attr(reshape, "allowzero")) == ("Reshape", "MatMul", 1)
        assert list(consts[reshape.input[1]]) == [10, 16]
        (after,) = _consumers(model, bn.output[0])
        assert after.op_type == "Reshape" and list(consts[after.input[1]]) == [2, 5, 16]
    reference = run_ort(model, _feeds(name))
    for k, bn in enumerate(bns):
        s, t = _bn_affine(model, bn)
        matmul = prod[prod[bn.input[0]].input[0]]
        w = consts[matmul.input[1]].astype(np.float64)
        new_w = _set_initializer(model, f"folded_w{k}", (w * s).astype(np.float32))
        bias = _set_initializer(model, f"folded_b{k}", t.astype(np.float32))
        matmul.input[1] = new_w
        add = helper.make_node("Add", [f"mm{k}", bias], [matmul.output[0]], name=f"fold_add{k}")
        matmul.output[0] = f"mm{k}"
        model.graph.node.insert(list(model.graph.node).index(matmul) + 1, add)
        _bypass(model, bn)
    assert_close(reference, run_ort(model, _feeds(name)))


@pytest.mark.parametrize("name", ["mixnet-concat-bn", "trap-concat-branch-shared"])
def test_mixnet_split_fold_is_exact_only_when_each_branch_feeds_only_the_concat(name: str) -> None:
    """Splitting the BN per branch keeps ``silu`` exact; with the 3x3 branch also read by ``aux``
    (the trap), the same split changes ``aux``."""
    model, shared = _build(name), name.startswith("trap")
    consts, prod = _constants(model), _producer(model)
    (bn,) = _nodes(model, "BatchNormalization")
    concat = prod[bn.input[0]]
    assert concat.op_type == "Concat" and _attr(concat, "axis") == 1
    convs = [prod[i] for i in concat.input]
    assert [list(_attr(c, "kernel_shape")) for c in convs] == [[3, 3], [5, 5], [7, 7]]
    assert all(_attr(c, "group") == 4 and len(c.input) == 2 for c in convs)
    readers = [[n.op_type for n in _consumers(model, c.output[0])] for c in convs]
    assert readers == [["Concat", "GlobalAveragePool"] if shared else ["Concat"], ["Concat"], ["Concat"]]
    assert prod[convs[0].input[0]].op_type == "Split"
    reference = run_ort(model, _feeds(name))
    s, t = _bn_affine(model, bn)
    for k, conv in enumerate(convs):
        w = consts[conv.input[1]].astype(np.float64)
        part = slice(4 * k, 4 * k + 4)
        conv.input[1] = _set_initializer(model, f"w{k}", (w * s[part, None, None, None]).astype(np.float32))
        conv.input.append(_set_initializer(model, f"b{k}", t[part].astype(np.float32)))
    _bypass(model, bn)
    folded = run_ort(model, _feeds(name))
    assert_close(reference[:1], folded[:1])
    if shared:
        assert _rel_err(reference[1], folded[1]) > 1e-2


# --------------------------------------------------------------------------- tf2onnx, keras 3


def _after(model: onnx.ModelProto, tensor: str, through: tuple[str, ...]) -> tuple[onnx.NodeProto, list[int]]:
    """The single reader of ``tensor`` past ``through`` ops, and the composed Transpose permutation."""
    perm: list[int] = []
    while True:
        (node,) = _consumers(model, tensor)
        if node.op_type not in through:
            return node, perm
        if node.op_type == "Transpose":
            p = list(_attr(node, "perm"))
            perm = [perm[i] for i in p] if perm else p
        tensor = node.output[0]


def test_keras3_export_leaves_bn_as_mul_add_after_depthwise_and_dense_only() -> None:
    """Regular convs arrive with BN merged (3 inputs); depthwise convs and the Dense keep Mul -> Add."""
    model = _build("keras3-mobilenet")
    consts, prod = _constants(model), _producer(model)
    assert not _nodes(model, "BatchNormalization")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "unk__66"
    merged = [c for c in _nodes(model, "Conv") if len(c.input) == 3]
    assert [c.name for c in merged] == ["Conv__36", "Conv__46"]
    assert [n.op_type for n in _consumers(model, merged[0].output[0])] == ["Clip"]
    assert list(_attr(merged[0], "pads")) == [0, 0, 1, 1]  # TensorFlow's "same" at stride 2
    seen = []
    for mul in _nodes(model, "Mul"):
        (add,) = _consumers(model, mul.output[0])
        layer = prod[mul.input[0]]
        c = consts[mul.input[1]].size
        shape = (c,) if layer.op_type == "MatMul" else (1, c, 1, 1)
        assert add.op_type == "Add" and consts[mul.input[1]].shape == consts[add.input[1]].shape == shape
        assert not np.allclose(consts[mul.input[1]], 1.0) and not np.allclose(consts[add.input[1]], 0.0)
        seen.append((layer.op_type, _attr(layer, "group")))
    assert seen == [("Conv", 8), ("Conv", 16), ("MatMul", None)]


def test_keras3_raw_writes_the_shift_as_a_bias_add_behind_a_transpose() -> None:
    model = _build("keras3-tf2onnx-raw")
    consts, prod = _constants(model), _producer(model)
    chains = []
    for layer in [*_nodes(model, "Conv"), *_nodes(model, "MatMul")]:
        first, perm = _after(model, layer.output[0], ("Transpose",))
        ops = [first.op_type]
        if first.op_type == "Mul":
            ops.append(_consumers(model, first.output[0])[0].op_type)
        c = consts[first.input[1]].shape
        chains.append((layer.op_type, _attr(layer, "group"), perm, ops, c))
    assert chains == [
        ("Conv", 1, [0, 2, 3, 1], ["Add"], (8,)),
        ("Conv", 8, [0, 2, 3, 1], ["Mul", "Add"], (8,)),
        ("Conv", 1, [0, 2, 3, 1], ["Add"], (16,)),
        ("Conv", 16, [0, 2, 3, 1], ["Mul", "Add"], (16,)),
        ("MatMul", None, [], ["Mul", "Add"], (10,)),
    ]
    dw = _nodes(model, "Conv")[1]
    transpose = prod[dw.input[1]]
    reshape = prod[transpose.input[0]]
    assert (transpose.op_type, list(_attr(transpose, "perm")), reshape.op_type) == (
        "Transpose",
        [3, 2, 0, 1],
        "Reshape",
    )
    assert consts[reshape.input[0]].shape == (3, 3, 8, 1) and list(consts[reshape.input[1]]) == [3, 3, 1, 8]


def test_keras3_raw_bias_add_behind_the_transpose_folds_exactly() -> None:
    """Absorbing ``Transpose -> Add (C,)`` into the conv's bias (and keeping the Transpose) is exact."""
    name = "keras3-tf2onnx-raw"
    model = _build(name)
    consts = _constants(model)
    reference = run_ort(model, _feeds(name))
    for k, conv in enumerate(c for c in _nodes(model, "Conv") if _attr(c, "group") == 1):
        add, _ = _after(model, conv.output[0], ("Transpose",))
        conv.input.append(_set_initializer(model, f"bias{k}", consts[add.input[1]]))
        _bypass(model, add)
    assert_close(reference, run_ort(model, _feeds(name)))


@pytest.mark.parametrize("name", ["tf2onnx-raw-nhwc", "tf2onnx-raw-conv3d"])
def test_tf2onnx_raw_transposes_around_bn_compose_to_the_identity(name: str) -> None:
    model = _build(name)
    prod = _producer(model)
    rank = 5 if name.endswith("conv3d") else 4
    layers = []
    for bn in _nodes(model, "BatchNormalization"):
        perm, node = list(range(rank)), prod[bn.input[0]]
        while node.op_type == "Transpose":
            perm = [perm[i] for i in _attr(node, "perm")]
            node = prod[node.input[0]]
        assert perm == list(range(rank)), (bn.name, perm)
        after = _consumers(model, bn.output[0])[0]
        assert after.op_type == "Transpose" and _attr(bn, "epsilon") == pytest.approx(1e-3)
        weight = prod[node.input[1]]  # the layer's weight: a Transpose of the HWIO initializer
        assert weight.op_type == "Transpose" and weight.input[0] in _constants(model)
        layers.append((node.op_type, len(node.input)))
    expected = {"tf2onnx-raw-nhwc": [("Conv", 3), ("Conv", 2), ("ConvTranspose", 3)]}
    assert layers == expected.get(name, [("Conv", 2)])
    assert [o.name for o in model.graph.output] == ["Identity:0"]


def test_resnetv2_preactivation_bn_producers() -> None:
    """The BN left after tf2onnx: one reads MaxPool, one an Add that the next block's Add also reads."""
    model = _build("resnetv2-preact")
    prod = _producer(model)
    kinds = []
    for bn in _nodes(model, "BatchNormalization"):
        p = prod[bn.input[0]]
        kinds.append((p.op_type, sorted(n.op_type for n in _consumers(model, p.output[0]))))
    assert kinds == [
        ("MaxPool", ["BatchNormalization"]),  # block 1 has a conv shortcut, reading the preact
        ("Add", ["Add", "BatchNormalization"]),
        ("Add", ["BatchNormalization"]),
    ]
    fused = [c for c in _nodes(model, "Conv") if c.input[1].endswith("Conv2D_weights_fused_bn")]
    assert len(fused) == 2 and all(c.output[0].endswith("_1_bn/FusedBatchNormV3:0") for c in fused)


def test_paddle2onnx_bias_add_and_identities_before_bn() -> None:
    model = _build("paddle2onnx-identity-bn")
    consts, prod = _constants(model), _producer(model)
    seen = []
    for bn in _nodes(model, "BatchNormalization"):
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
    model, name = _build("arcface-head"), "arcface-head"
    consts, prod = _constants(model), _producer(model)
    gemm = _nodes(model, "Gemm")[0]
    chain = [prod[gemm.input[0]]]
    while chain[-1].op_type != "BatchNormalization":
        chain.append(prod[chain[-1].input[0]])
    assert [n.op_type for n in chain] == ["Flatten", "BatchNormalization"]
    bn2 = chain[-1]
    assert prod[bn2.input[0]].op_type == "Add"
    assert [n.op_type for n in _consumers(model, gemm.output[0])] == ["BatchNormalization"]
    reference = run_ort(model, _feeds(name))
    s, t = (np.repeat(a, 16) for a in _bn_affine(model, bn2))  # (C,) -> (C*H*W,) in Flatten's order
    w, b = (consts[i].astype(np.float64) for i in gemm.input[1:])
    gemm.input[1] = _set_initializer(model, "fc.weight", (w * s).astype(np.float32))
    gemm.input[2] = _set_initializer(model, "fc.bias", (b + w @ t).astype(np.float32))
    _bypass(model, bn2)
    assert_close(reference, run_ort(model, _feeds(name)))


def _fold_forward_into_conv(model: onnx.ModelProto, bn: onnx.NodeProto) -> None:
    """W' = W * s on the input-channel axis, b' = b + sum W * t: exact only without padding."""
    consts = _constants(model)
    (conv,) = _consumers(model, bn.output[0])
    s, t = _bn_affine(model, bn)
    w = consts[conv.input[1]].astype(np.float64)
    b = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else np.zeros(w.shape[0])
    conv.input[1] = _set_initializer(model, conv.input[1], (w * s[None, :, None, None]).astype(np.float32))
    bias = _set_initializer(
        model, f"{conv.name}_folded_bias", (b + np.einsum("oikl,i->o", w, t)).astype(np.float32)
    )
    conv.input[2:] = [bias]
    _bypass(model, bn)


@pytest.mark.parametrize(
    ("bn_name", "exact"), [("stage1_unit1_bn3", True), ("bn_data", False)], ids=["unpadded", "padded"]
)
def test_mxnet_forward_fold_is_exact_only_into_the_unpadded_conv(bn_name: str, exact: bool) -> None:
    """Without padding the forward fold is exact; into conv0 (pads 3) the border changes."""
    model, name = _build("mxnet-bn-data"), "mxnet-bn-data"
    bn = next(n for n in model.graph.node if n.name == bn_name)
    (conv,) = _consumers(model, bn.output[0])
    assert set(_attr(conv, "pads")) == ({0} if exact else {3})
    reference = run_ort(model, _feeds(name))
    _fold_forward_into_conv(model, bn)
    err = _rel_err(reference[0], run_ort(model, _feeds(name))[0])
    assert err <= 1e-5 if exact else err > 1e-2, err


def test_tabular_bn_feeds_the_gemm_directly() -> None:
    model = _build("tabular-bn-first")
    (bn,) = _nodes(model, "BatchNormalization")
    assert bn.input[0] == "input"
    assert [(n.op_type, _attr(n, "transB")) for n in _consumers(model, bn.output[0])] == [("Gemm", 1)]


# --------------------------------------------------------------------------- bias Add and traps


def test_conv_bias_add_constants_broadcast_along_channels() -> None:
    model = _build("conv-bias-add")
    consts, prod = _constants(model), _producer(model)
    adds = _nodes(model, "Add")
    assert [consts[a.input[1]].shape for a in adds] == [(1, 8, 1, 1), (8, 1, 1)]
    assert all(prod[a.input[0]].op_type == "Conv" and len(prod[a.input[0]].input) == 2 for a in adds)


def test_trap_mul_by_c_vector_scales_the_last_axis_not_the_channels() -> None:
    """Folding the (C,) Mul as a per-channel scale (onnxslim's ConvMul) changes the outputs."""
    model, name = _build("trap-mul-last-axis"), "trap-mul-last-axis"
    (mul,) = _nodes(model, "Mul")
    scale = _constants(model)[mul.input[1]]
    conv_shape = [d.dim_value for d in model.graph.value_info[0].type.tensor_type.shape.dim]
    assert scale.shape == (8,) and conv_shape == [1, 8, 8, 8]
    reference = run_ort(model, _feeds(name))
    _set_initializer(model, mul.input[1], scale.reshape(1, 8, 1, 1))
    assert _rel_err(reference[0], run_ort(model, _feeds(name))[0]) > 1e-2


def test_trap_grouped_conv_add_is_not_per_channel() -> None:
    model = _build("trap-grouped-add-chw")
    (add,) = _nodes(model, "Add")
    pos = _constants(model)[add.input[1]]
    assert _attr(_producer(model)[add.input[0]], "group") == 4
    assert pos.shape == (1, 8, 6, 6) and np.ptp(pos, axis=(2, 3)).min() > 0.1


def test_trap_div_has_one_zero_divisor() -> None:
    model = _build("trap-div-by-zero")
    (div,) = _nodes(model, "Div")
    d = _constants(model)[div.input[1]]
    assert d.shape == (1, 8, 1, 1) and (d == 0).sum() == 1 and d[0, 3, 0, 0] == 0
    assert [n.op_type for n in _consumers(model, div.output[0])] == ["Add"]


def test_trap_reshape_merges_the_conv_channel_axis() -> None:
    model = _build("trap-reshape-merges-channel")
    (bn,) = _nodes(model, "BatchNormalization")
    reshape = _producer(model)[bn.input[0]]
    assert reshape.op_type == "Reshape" and list(_constants(model)[reshape.input[1]]) == [1, 32, 4]
    assert _producer(model)[reshape.input[0]].op_type == "Conv"
    assert _constants(model)[bn.input[1]].shape == (32,)
