"""Generated inputs (issue 13): a rank-0 bool input (an If condition) crashed input generation
(onnxruntime rejects a numpy.bool scalar), so verification was not-run; now every such input takes
both values, and a fault in either branch is seen."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold import VerifyStatus
from bnfold.verify import make_inputs, verify

F32 = TensorProto.FLOAT


def if_model(else_scale: float = -1.0, *, cond_shape=()) -> onnx.ModelProto:
    """out = If(cond) then Relu(x) else x * else_scale."""
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", F32, [2, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", F32, [2, 4])],
        [helper.make_tensor("k", F32, [], [else_scale])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("x", F32, [2, 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, list(cond_shape)),
        ],
        [helper.make_tensor_value_info("out", F32, [2, 4])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("cond_shape", [(), (1,)], ids=["rank-0", "one-element"])
def test_a_bool_condition_takes_both_values_and_the_report_says_so(cond_shape):
    model = if_model(cond_shape=cond_shape)
    report = verify(model, model, samples=1)
    assert report.passed and report.samples == 2  # one sample asked, two needed for both branches
    assert "bool input(s) ['cond'] took True and False: If ['branch'] ran both branches" in report.message
    conds = [s["cond"] for s in make_inputs(model, samples=3)]
    assert [bool(c) for c in conds] == [True, False, True] and all(isinstance(c, np.ndarray) for c in conds)
    assert conds[0].shape == cond_shape


def test_a_fault_in_the_branch_a_random_draw_would_skip_is_caught():
    report = verify(if_model(), if_model(else_scale=-1.001), samples=1)
    assert report.status is VerifyStatus.FAILED


def test_bool_tensors_stay_random():
    a = helper.make_tensor_value_info("mask", TensorProto.BOOL, [4, 8])
    g = helper.make_graph(
        [helper.make_node("Not", ["mask"], ["y"])],
        "g",
        [a],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, [4, 8])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (first,) = make_inputs(model, samples=1)
    assert 0 < first["mask"].sum() < first["mask"].size


@pytest.mark.parametrize(
    ("dims", "words"),
    [([-1, 3, 8, 8], "negative"), ([1, 3, 1 << 40, 8], "elements per sample")],
    ids=["negative", "huge"],
)
def test_hostile_declared_input_shapes_are_input_errors(dims, words):
    """An input declared [-1, 3, 8, 8] crashed input generation (ValueError, exit 3) and one
    declared [1, 3, 2**40, 8] raised MemoryError: both are bad input, refused before allocating."""
    import onnx
    from onnx import TensorProto, helper

    from bnfold import InputError, verify

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match=words):
        verify(model, onnx.ModelProto.FromString(model.SerializeToString()))


def test_api_refuses_inputs_whose_cast_changes_values():
    """The API cast float64 inputs to float32 silently (only the CLI refused lossy casts), so a
    comparison could run on values nobody gave. A cast that keeps every value is still taken."""
    from onnx import TensorProto, helper

    from bnfold import InputError
    from bnfold.verify.inputs import declared_inputs, user_samples

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    decls = declared_inputs(graph)
    exact, _ = user_samples({"x": np.array([0.5, 2.0])}, decls)
    assert exact[0]["x"].dtype == np.float32
    with pytest.raises(InputError, match="1 of its 2 values change"):
        user_samples({"x": np.array([0.1, 2.0])}, decls)
