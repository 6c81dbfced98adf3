"""Seeded models shaped where float32 noise of a correct fold exceeds a fixed relative tolerance.

- :func:`yolo_head`: an ultralytics-style detect head. The class branch ends in a 1x1 Conv whose
  bias starts very negative (``log(5 / nc / (640 / stride) ** 2)``, about -8.8 for 80 classes),
  then Sigmoid: every class score is ~1.5e-4, and the absolute noise of the logits (a few ulps of
  sums of large activations) becomes a relative error of the score far above 1e-4.
- :func:`attention_stack`: a visformer-style stack of Conv+BN, Erf-GELU and sharp Softmax
  attention: near-ties between large logits turn float32 noise into large changes of attention
  weights deep in the graph, while the output stays close.
BN statistics are random (conftest.bn_stats), never near the identity.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from onnx_builders import G


def _conv_bn_silu(g: G, x: str, cin: int, cout: int, name: str, *, k: int = 3, stride: int = 1) -> str:
    w = g.init(
        f"{name}_W", (g.rng.normal(0, 1, (cout, cin, k, k)) / math.sqrt(cin * k * k) * 3).astype(np.float32)
    )
    g.node("Conv", [x, w], [f"{name}_c"], pads=[k // 2] * 4, strides=[stride, stride])
    g.bn(f"{name}_c", cout, f"{name}_bn", prefix=f"{name}_norm")
    g.node("Sigmoid", [f"{name}_bn"], [f"{name}_sig"])
    g.node("Mul", [f"{name}_bn", f"{name}_sig"], [f"{name}_out"])
    return f"{name}_out"


def yolo_head(rng: np.random.Generator, *, classes: int = 80, width: int = 32, depth: int = 4) -> G:
    """x (1,3,32,32) -> depth x [Conv+BN+SiLU] -> box branch (4) and class branch (``classes``,
    Sigmoid) -> Concat on channels -> (1, 4 + classes, H*W)."""
    g = G(rng)
    h = g.input("images", [1, 3, 32, 32])
    cin = 3
    for i in range(depth):
        h = _conv_bn_silu(g, h, cin, width, f"backbone{i}", stride=2 if i == 0 else 1)
        cin = width
    box = _conv_bn_silu(g, h, width, width, "box0")
    g.node("Conv", [box, g.init("box_W", rng.normal(0, 0.1, (4, width, 1, 1)).astype(np.float32))], ["box"])
    cls = _conv_bn_silu(g, h, width, width, "cls0")
    bias = np.full(classes, math.log(5 / classes / (640 / 8) ** 2), np.float32)
    w = g.init("cls_W", rng.normal(0, 0.05, (classes, width, 1, 1)).astype(np.float32))
    g.node("Conv", [cls, w, g.init("cls_B", bias)], ["cls_logits"])
    g.node("Sigmoid", ["cls_logits"], ["cls_scores"])
    g.node("Concat", ["box", "cls_scores"], ["head"], axis=1)
    g.node("Reshape", ["head", g.init("flat", np.array([1, 4 + classes, -1], np.int64))], ["output0"])
    g.output("output0", TensorProto.FLOAT, [1, 4 + classes, None])
    return g


def _conv_bn(g: G, x: str, cin: int, cout: int, name: str) -> str:
    w = g.init(f"{name}_W", (g.rng.normal(0, 1, (cout, cin, 1, 1)) / math.sqrt(cin)).astype(np.float32))
    g.node("Conv", [x, w], [f"{name}_c"])
    g.bn(f"{name}_c", cout, f"{name}_bn", prefix=f"{name}_norm")
    return f"{name}_bn"


def _gelu(g: G, x: str, name: str) -> str:
    """GELU as torch's exporter writes it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    g.node("Div", [x, g.init(f"{name}_sqrt2", np.array(math.sqrt(2), np.float32))], [f"{name}_d"])
    g.node("Erf", [f"{name}_d"], [f"{name}_erf"])
    g.node("Add", [f"{name}_erf", g.init(f"{name}_one", np.array(1, np.float32))], [f"{name}_1p"])
    g.node("Mul", [x, f"{name}_1p"], [f"{name}_m"])
    g.node("Mul", [f"{name}_m", g.init(f"{name}_half", np.array(0.5, np.float32))], [f"{name}_out"])
    return f"{name}_out"


def attention_stack(
    rng: np.random.Generator,
    *,
    dim: int = 32,
    heads: int = 2,
    side: int = 6,
    blocks: int = 3,
    sharpness: float = 8.0,
) -> G:
    """x (1,dim,side,side) -> blocks x [q/k/v 1x1 Conv+BN -> Softmax(sharpness * q k^T) v -> proj
    Conv+BN -> residual Add -> Conv+BN -> GELU(Erf) -> Conv+BN -> residual Add] -> out."""
    g = G(rng)
    h = g.input("x", [1, dim, side, side])
    n, hd = side * side, dim // heads
    tokens = g.init("tokens", np.array([1, heads, hd, n], np.int64))
    image = g.init("image", np.array([1, dim, side, side], np.int64))
    for b in range(blocks):
        p = f"block{b}"
        q, k, v = (_conv_bn(g, h, dim, dim, f"{p}_{t}") for t in "qkv")
        for t, name in (("q", q), ("k", k), ("v", v)):
            g.node("Reshape", [name, tokens], [f"{p}_{t}_tok"])  # (1, heads, hd, n)
        g.node("Transpose", [f"{p}_q_tok"], [f"{p}_qt"], perm=[0, 1, 3, 2])  # (1, heads, n, hd)
        g.node("MatMul", [f"{p}_qt", f"{p}_k_tok"], [f"{p}_logits"])  # (1, heads, n, n)
        scale = g.init(f"{p}_scale", np.array(sharpness / math.sqrt(hd), np.float32))
        g.node("Mul", [f"{p}_logits", scale], [f"{p}_scaled"])
        g.node("Softmax", [f"{p}_scaled"], [f"{p}_attn"], axis=-1)
        g.node("Transpose", [f"{p}_v_tok"], [f"{p}_vt"], perm=[0, 1, 3, 2])  # (1, heads, n, hd)
        g.node("MatMul", [f"{p}_attn", f"{p}_vt"], [f"{p}_mix"])
        g.node("Transpose", [f"{p}_mix"], [f"{p}_mixt"], perm=[0, 1, 3, 2])
        g.node("Reshape", [f"{p}_mixt", image], [f"{p}_img"])
        proj = _conv_bn(g, f"{p}_img", dim, dim, f"{p}_proj")
        g.node("Add", [h, proj], [f"{p}_res1"])
        mlp = _gelu(g, _conv_bn(g, f"{p}_res1", dim, 2 * dim, f"{p}_fc1"), f"{p}_gelu")
        g.node("Add", [f"{p}_res1", _conv_bn(g, mlp, 2 * dim, dim, f"{p}_fc2")], [f"{p}_out"])
        h = f"{p}_out"
    g.node("Identity", [h], ["out"])
    g.output("out", TensorProto.FLOAT, [1, dim, side, side])
    return g
