"""bnfold.onnx.graph and rewrite: namespaces, the one walker, and apply's name-rule guard."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import count_bn, fold_onnx
from bnfold.fold_math import Affine
from bnfold.onnx.graph import ModelIndex, collect_scopes, main_scope, walk_graphs
from bnfold.onnx.plan import NewValue, Plan, Source
from bnfold.onnx.rewrite import apply
from conftest import assert_close, run_ort
from onnx_builders import conv_bn, conv_bn_in_function, conv_bn_in_subgraph


def with_function_reusing_names(rng: np.random.Generator, *, reads: list[str]):
    """conv_bn's model plus a model-local function whose body reads names equal to main-graph
    names (``reads``), called once from the main graph on its own input."""
    g = conv_bn(rng)
    g.input("x2", [2, 3])
    body = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.ones(3, np.float32), n))
        for n in reads
    ]
    prev = "X"
    for i, n in enumerate(reads):
        body.append(helper.make_node("Add", [prev, n], [f"a{i}"]))
        prev = f"a{i}"
    body.append(helper.make_node("Identity", [prev], ["Z"]))
    g.functions.append(
        helper.make_function("local", "Reader", ["X"], ["Z"], body, [helper.make_opsetid("", 17)])
    )
    g.domains.append("local")
    g.nodes.append(helper.make_node("Reader", ["x2"], ["out2"], domain="local", name="call"))
    g.output("out2", shape=[2, 3])
    return g


def test_function_names_do_not_count_as_main_graph_uses(rng):
    """A function body reading its own "y" once counted as a second use of the main graph's
    Conv output "y": a spurious producer-output-shared skip."""
    g = with_function_reusing_names(rng, reads=["y"])
    model = g.model()
    result = fold_onnx(model)
    assert len(result.report.folded) == 1, result.report.skipped
    assert_close(run_ort(model, g.feeds), run_ort(result.model, g.feeds))


def test_dead_initializers_go_even_when_a_function_reuses_their_names(rng):
    """BN parameters of the main graph died with the fold but stayed in the model because a
    function body used the same names (one use counter for every namespace)."""
    g = with_function_reusing_names(rng, reads=["bn_scale", "bn_var"])
    result = fold_onnx(g.model())
    assert len(result.report.folded) == 1
    assert not {t.name for t in result.model.graph.initializer} & {"bn_scale", "bn_bias", "bn_mean", "bn_var"}
    onnx.checker.check_model(result.model, full_check=True)
    assert_close(run_ort(g.model(), g.feeds), run_ort(result.model, g.feeds))


def test_walk_graphs_visits_main_subgraphs_and_functions_parents_first(rng):
    g = conv_bn_in_subgraph(rng, op="If")
    g.functions.extend(conv_bn_in_function(rng).functions)
    g.domains.append("local")
    model = g.model()
    labels = [site.label for site in walk_graphs(model)]
    assert labels[0] == "" and labels[-1] == "function:local.ConvBN"
    assert sorted(labels[1:3]) == ["if/else_branch", "if/then_branch"]
    assert count_bn(model) == 3
    index = ModelIndex(model, None)
    scopes = collect_scopes(index)
    assert [s.label for s in scopes] == labels
    assert scopes[1].parent is scopes[0] and scopes[3].parent is None
    assert scopes[3].ns is not scopes[0].ns and scopes[1].ns is scopes[0].ns


def test_main_scope_resolves_constants_and_shapes(rng):
    model = conv_bn(rng).model()
    scope = main_scope(model, None)
    w = scope.constant("W", what="weight")
    assert w.shape == (6, 4, 3, 3)
    assert scope.shape("x") == (2, 4, 7, 7) and scope.rank("y") == 4
    assert scope.elem_type("x") == onnx.TensorProto.FLOAT


def test_apply_refuses_a_plan_that_changes_a_node_outside_its_chain(rng):
    """The name rule's guard: a plan may change values only along its chain, whose outputs
    apply renames; anything else would keep a name for new values."""
    model = conv_bn(rng).model()
    scope = main_scope(model, None)
    conv, bn, relu = scope.nodes
    source = Source("batchnorm", "bn", "y", "z", Affine(np.ones(6), np.zeros(6)), (bn,))
    plan = Plan(
        source=source, absorber=conv, chain=(conv,), values=(NewValue(relu, 0, np.ones(1, np.float32), "x"),)
    )
    with pytest.raises(ValueError, match="name rule"):
        apply(scope, plan)


def test_bn_params_shared_by_a_subgraph_and_the_main_graph_stay_while_used(rng):
    """Main-graph Conv -> BN folds; an If branch still reads the same BN parameters: they stay."""
    g = conv_bn(rng)
    names = [n for n in g.nodes[1].input[1:]]
    then = helper.make_graph(
        [helper.make_node("Add", ["bn_mean", "bn_var"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)],
    )
    g.input("cond", [], np.bool_)
    g.feeds["cond"] = np.array(True)
    g.nodes.append(helper.make_node("If", ["cond"], ["side"], then_branch=then, else_branch=then, name="if"))
    g.output("side", shape=None)
    result = fold_onnx(g.model())
    assert len(result.report.folded) == 1
    kept = {t.name for t in result.model.graph.initializer}
    assert {"bn_mean", "bn_var"} <= kept and not {"bn_scale", "bn_bias"} & kept
    assert set(names) >= {"bn_mean", "bn_var"}
    assert_close(run_ort(g.model(), g.feeds), run_ort(result.model, g.feeds))
