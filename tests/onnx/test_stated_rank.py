"""Ranks read from what a graph states (initializer dims, declared inputs, producer rules) equal
the ranks onnx's shape inference gives, and folding with them changes nothing (issue 14).

``Scope.rank`` answers from :meth:`~bnfold.onnx.graph.Scope.stated_rank` while no shape
inference has run, so a fold without verification need not import onnx. A wrong stated rank
would put a per-channel constant on the wrong axis: these tests compare every stated rank of the
converter-shaped and zoo models with the inferred one, and the whole fold (model bytes and
report) with the one that always infers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.onnx import graph
from bnfold.onnx.fold import fold_model
from models import converters, registry

CONVERTERS = registry.converter_names()
ZOO = [n for n in registry.names(large=False) if registry.get(n).source == "torch"]


def build_converter(name: str) -> onnx.ModelProto:
    return converters.build(name, 0)


def _scopes(model: onnx.ModelProto) -> list[graph.Scope]:
    return graph.collect_scopes(graph.ModelIndex(model, None, frozenset()))


def _compare_ranks(model: onnx.ModelProto) -> int:
    """Assert stated == inferred for every tensor of every graph scope; the number compared."""
    compared = 0
    for scope in _scopes(model):
        if scope.graph is None:
            continue
        names = {o for n in scope.nodes for o in n.output} | set(scope.initializers) | scope.formal_inputs
        stated = {n: scope.stated_rank(n) for n in sorted(names)}
        scope.index.ensure_types()
        for name, rank in stated.items():
            inferred = scope.shape(name)
            if rank is None or inferred is None:
                continue
            assert rank == len(inferred), f"{name}: stated rank {rank}, inferred {len(inferred)}"
            compared += 1
    return compared


@pytest.mark.parametrize("name", CONVERTERS)
def test_stated_ranks_of_converter_models_equal_inferred(name: str) -> None:
    assert _compare_ranks(build_converter(name)) > 0


@pytest.mark.parametrize("name", ZOO)
def test_stated_ranks_of_zoo_models_equal_inferred(name: str) -> None:
    assert _compare_ranks(onnx.load(str(registry.build_onnx(name)))) > 0


def _fold(model: onnx.ModelProto) -> tuple[bytes, list[str]]:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    report = fold_model(work, base_dir=None, exclude=frozenset())
    return work.SerializeToString(), [repr(x) for x in (*report.folded, *report.skipped)]


@pytest.mark.parametrize("name", CONVERTERS + ZOO)
def test_fold_with_stated_ranks_equals_fold_with_inference(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_converter(name) if name in CONVERTERS else onnx.load(str(registry.build_onnx(name)))
    fast = _fold(model)
    monkeypatch.setattr(graph.Scope, "stated_rank", lambda self, name, depth=0: None)
    slow = _fold(model)
    assert fast[1] == slow[1]
    assert fast[0] == slow[0]


def test_matmul_rank_rule_follows_numpy_matmul() -> None:
    """MatMul drops the axis of a 1-D operand; batched operands broadcast to the larger rank."""
    cases = [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((4,), (4,))]
    for a_shape, b_shape in cases:
        rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
        a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, list(a_shape))
        b = onnx.numpy_helper.from_array(rng.normal(size=b_shape).astype(np.float32), "b")
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        g = helper.make_graph([node], "g", [a], [helper.make_tensor_value_info("y", 1, None)], [b])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        scope = _scopes(model)[0]
        expected = np.matmul(np.zeros(a_shape), np.zeros(b_shape)).ndim
        assert scope.stated_rank("y") == expected, (a_shape, b_shape)


def _single_op_model(node: onnx.NodeProto, opset: int, *inits: onnx.TensorProto) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 1, 3, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    g = helper.make_graph([node], "g", [x], [y], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _axes(values: list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), "axes")


AXES_CASES = {
    "squeeze-attr-11": (helper.make_node("Squeeze", ["x"], ["y"], axes=[1, -1]), 11, ()),
    "squeeze-input-13": (helper.make_node("Squeeze", ["x", "axes"], ["y"]), 13, (_axes([1, 3]),)),
    "squeeze-all-13": (helper.make_node("Squeeze", ["x"], ["y"]), 13, ()),
    "unsqueeze-attr-11": (helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0, -1]), 11, ()),
    "unsqueeze-input-13": (helper.make_node("Unsqueeze", ["x", "axes"], ["y"]), 13, (_axes([0, 5]),)),
    "reducemean-keep-13": (helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3]), 13, ()),
    "reducemean-drop-13": (helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0), 13, ()),
    "reducemean-all-13": (helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0), 13, ()),
    "reducemean-input-18": (
        helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0),
        18,
        (_axes([-1]),),
    ),
    "reducesum-noop-13": (
        helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0, noop_with_empty_axes=1),
        13,
        (),
    ),
    "reducemax-empty-axes-18": (
        helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0),
        18,
        (_axes([]),),
    ),
}


@pytest.mark.parametrize("case", AXES_CASES)
def test_axes_rank_rules_agree_with_shape_inference(case: str) -> None:
    """Squeeze, Unsqueeze and the Reduce ops in their attribute and input forms: the stated
    rank is None (unknown) or exactly what onnx's shape inference says."""
    node, opset, inits = AXES_CASES[case]
    model = _single_op_model(node, opset, *inits)
    scope = _scopes(model)[0]
    stated = scope.stated_rank("y")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
    rank = len(inferred.type.tensor_type.shape.dim)
    if case == "squeeze-all-13":
        assert stated is None  # which axes are 1 is a shape question, not a rank one
    else:
        assert stated == rank, (stated, rank)
