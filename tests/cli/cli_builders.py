"""Helpers of the CLI tests: tiny ONNX models (Conv -> BN -> Relu [-> BN] with non-trivial BN
statistics; the `rng` fixture is conftest's), a PyTorch factory module's source, and the
one-error-line assertion every usage-error test makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _bn_params(rng: np.random.Generator, c: int, prefix: str) -> list[TensorProto]:
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32)
    beta = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    mean = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    var = rng.uniform(0.2, 3.0, c).astype(np.float32)
    return [
        numpy_helper.from_array(a, f"{prefix}_{n}")
        for a, n in ((gamma, "scale"), (beta, "bias"), (mean, "mean"), (var, "var"))
    ]


def conv_bn_model(
    rng: np.random.Generator,
    *,
    second_bn: bool = False,
    training_mode: bool = False,
    weight_delta: float = 0.0,
) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu (-> BN2, left: its producer is Relu) -> y.

    ``training_mode`` makes the first BN use batch statistics (never foldable);
    ``weight_delta`` perturbs the conv weight (a model that is *not* equivalent)."""
    c = 4
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.5 + np.float32(weight_delta)
    b = rng.standard_normal(c).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv_w"), numpy_helper.from_array(b, "conv_b")]
    inits += _bn_params(rng, c, "bn1")
    bn_attrs = {"epsilon": 1e-3}
    if training_mode:
        bn_attrs["training_mode"] = 1
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
            ["bn1_out"],
            name="bn1",
            **bn_attrs,
        ),
        helper.make_node("Relu", ["bn1_out"], ["relu_out" if second_bn else "y"], name="relu1"),
    ]
    if second_bn:
        inits += _bn_params(rng, c, "bn2")
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                ["relu_out", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"],
                ["y"],
                name="bn2",
            )
        )
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, str(path))
    return str(path)


FACTORY_SOURCE = """
import sys
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    bn = net[1]
    with torch.no_grad():  # non-trivial statistics
        bn.weight.uniform_(0.5, 2.0); bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.2, 3.0)
    return net

def leave():
    sys.exit(0)
"""
"""A module with ``make()`` (Conv -> BN -> Relu, non-trivial statistics) and ``leave()`` (calls sys.exit)."""


def one_error_line(stderr: str, *needles: str) -> None:
    """``stderr`` is exactly one ``bnfold: error:`` line, without a traceback, naming every needle."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
