"""Property test of forward folds and Concat splits (issue 12 items 7 and 8): random maps
(BN or per-channel Mul/Add) before Gemm/MatMul/Conv (padded or not, grouped, through
Identity/Flatten), and random Conv branches joined by a Concat before a BN.

For every graph: onnxruntime (ORT_DISABLE_ALL) outputs of the folded model match the original,
every tensor name present before and after keeps its values (the name rule), and a shift
before a padded Conv is never folded.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold import SkipReason, fold_onnx
from conftest import bn_stats, run_ort
from onnx_builders import expose_intermediates

EXAMPLES = max(1, int(os.environ.get("BNFOLD_HYPOTHESIS_EXAMPLES", "300")) // 5)
DERANDOMIZE = os.environ.get("BNFOLD_HYPOTHESIS_EXPLORE", "") != "1"
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow],
)


def _model(nodes, inits, x_shape, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "prop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@st.composite
def map_then_layer(draw: st.DrawFn):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["Gemm", "MatMul", "Conv", "FlattenGemm"]))
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    use_bn = draw(st.booleans())
    c = draw(st.integers(1 if use_bn else 2, 4))  # a one-channel Mul/Add is by scalars: not BN-like
    if kind in ("Gemm", "MatMul"):
        x_shape = [draw(st.integers(1, 3)), c]
    else:
        x_shape = [draw(st.integers(1, 2)), c, draw(st.integers(3, 5)), draw(st.integers(3, 5))]
    nodes = []
    if use_bn:
        names = [init(f"bn{i}", a) for i, a in enumerate(bn_stats(rng, c))]
        nodes.append(helper.make_node("BatchNormalization", ["x", *names], ["n"], name="bn"))
    else:
        shape = (c,) if len(x_shape) == 2 else (1, c, 1, 1)
        nodes.append(helper.make_node("Mul", ["x", init("s", rng.uniform(0.5, 1.5, shape))], ["m"]))
        shift = rng.normal(0, 1, shape) if draw(st.booleans()) else np.zeros(shape)
        nodes.append(helper.make_node("Add", ["m", init("t", shift)], ["n"]))
    prev = "n"
    if draw(st.booleans()):
        nodes.append(helper.make_node("Identity", [prev], ["ident"]))
        prev = "ident"
    padded = False
    if kind == "Conv":
        group = draw(st.sampled_from([1, c]))
        cout = group * draw(st.integers(1, 2))
        k = draw(st.integers(1, 3))
        padded = draw(st.booleans())
        w = rng.normal(0, 1, (cout, c // group, k, k))
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, init("W", w), init("B", rng.normal(0, 1, cout))],
                ["y"],
                group=group,
                pads=[1 if padded else 0] * 4,
            )
        )
        pad = 2 if padded else 0
        out_shape = [x_shape[0], cout, x_shape[2] + pad - k + 1, x_shape[3] + pad - k + 1]
    else:
        features = c
        if kind == "FlattenGemm":
            nodes.append(helper.make_node("Flatten", [prev], ["flat"], axis=1))
            prev, features = "flat", c * x_shape[2] * x_shape[3]
        n_out = draw(st.integers(1, 4))
        trans_b = draw(st.integers(0, 1))
        w = rng.normal(0, 1, (n_out, features) if trans_b else (features, n_out))
        if kind == "MatMul":
            nodes.append(
                helper.make_node("MatMul", [prev, init("W", rng.normal(0, 1, (features, n_out)))], ["y"])
            )
        else:
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [prev, init("W", w), init("C", rng.normal(0, 1, n_out))],
                    ["y"],
                    transB=trans_b,
                    alpha=draw(st.sampled_from([1.0, 0.5])),
                    beta=draw(st.sampled_from([1.0, 2.0])),
                )
            )
        out_shape = [x_shape[0], n_out]
    nodes.append(helper.make_node("Relu", ["y"], ["out"]))
    feeds = {"x": rng.normal(0, 1, x_shape).astype(np.float32)}
    return _model(nodes, inits, x_shape, out_shape), feeds, {"kind": kind, "padded": padded}


@st.composite
def concat_then_bn(draw: st.DrawFn):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inits: list[onnx.TensorProto] = []
    x_shape = [draw(st.integers(1, 2)), 2, 4, 4]
    nodes, parts = [], []
    for i in range(draw(st.integers(1, 3))):
        width = draw(st.integers(1, 3))
        k = draw(st.sampled_from([1, 3]))
        ins = ["x", f"W{i}"]
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (width, 2, k, k)).astype(np.float32), f"W{i}"))
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(rng.normal(0, 1, width).astype(np.float32), f"B{i}"))
            ins.append(f"B{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], pads=[k // 2] * 4))
        parts.append((f"c{i}", width))
    total = sum(w for _, w in parts)
    nodes.append(helper.make_node("Concat", [p for p, _ in parts], ["cat"], axis=1))
    names = []
    for j, a in enumerate(bn_stats(rng, total)):
        inits.append(numpy_helper.from_array(a, f"bn{j}"))
        names.append(f"bn{j}")
    nodes.append(helper.make_node("BatchNormalization", ["cat", *names], ["z"], name="bn"))
    nodes.append(helper.make_node("Relu", ["z"], ["out"]))
    feeds = {"x": rng.normal(0, 1, x_shape).astype(np.float32)}
    return (
        _model(nodes, inits, x_shape, [x_shape[0], total, 4, 4]),
        feeds,
        {"kind": "concat", "padded": False},
    )


def _check(case) -> None:
    model, feeds, facts = case
    onnx.checker.check_model(model, full_check=True)
    result = fold_onnx(model)
    report = result.report
    onnx.checker.check_model(result.model, full_check=True)
    before, names_before = expose_intermediates(model)
    after, names_after = expose_intermediates(result.model)
    ref = dict(zip(names_before, run_ort(before, feeds)))
    got = dict(zip(names_after, run_ort(after, feeds)))
    # magnitude of the terms a folded layer sums: |inputs| * |weights| (float32 cancellation)
    inits = {t.name: np.abs(numpy_helper.to_array(t)).astype(np.float64) for t in model.graph.initializer}
    terms = max(float(np.abs(a).max()) for a in ref.values()) * max(float(w.sum()) for w in inits.values())
    for name in sorted(set(ref) & set(got)):
        r, o = ref[name].astype(np.float64), got[name].astype(np.float64)
        assert r.shape == o.shape, name
        err = float(np.abs(r - o).max()) / max(float(np.abs(r).max()), 1e-6)
        assert err < 2e-5 or float(np.abs(r - o).max()) < 2e-7 * terms, (
            f"{facts}: {name!r} changed ({err:.3g})"
        )
    if facts["padded"] and report.skipped:
        assert all(s.reason is SkipReason.FORWARD_PADDING for s in report.skipped), report.skipped
    if not facts["padded"]:
        assert not report.skipped and len(report.folded) == 1, report


@SETTINGS
@given(map_then_layer())
def test_random_maps_before_a_layer_fold_forward_exactly(case):
    _check(case)


@SETTINGS
@given(concat_then_bn())
def test_random_concat_bn_splits_fold_exactly(case):
    _check(case)
