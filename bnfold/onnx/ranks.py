"""Ranks a graph states without shape inference.

Shape inference imports onnx's package (0.5 s with ml_dtypes 0.7) and costs a pass over the
model, while most rank questions the pass asks (is a ``(C, 1, 1)`` constant per-channel on this
tensor?) are answered by the graph itself: a weight's dims, a declared graph input, or an
operator whose output rank its inputs fix. :meth:`Scope.rank <bnfold.onnx.graph.Scope.rank>` asks
here first; ``tests/onnx/test_stated_rank.py`` checks every answer against shape inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bnfold.onnxlib import onnx

from ..errors import InputError
from .attrs import attr
from .protos import DEFAULT_DOMAINS

if TYPE_CHECKING:
    from .graph import Scope

_STATED_DEPTH = 32
_RANK_OF_FIRST_INPUT = frozenset(
    ("BatchNormalization", "Identity", "Dropout", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh")
    + ("HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Softsign", "Gelu", "Mish", "Neg", "Abs")
    + ("Exp", "Sqrt", "Erf", "Cast", "Transpose", "GlobalAveragePool", "GlobalMaxPool", "MaxPool")
    + ("AveragePool", "LpPool")
)
"""Operators whose first output has the rank of their first input."""


_REDUCE_OPS = frozenset(
    ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2")
    + ("ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
)


def stated_rank(scope: Scope, name: str, depth: int = 0) -> int | None:
    """A rank the graph states without shape inference (which imports onnx and costs a pass):
    an initializer's dims, the main graph's declared input, or an operator whose output rank
    its inputs fix (Conv and ConvTranspose: the weight's; Gemm: 2; BatchNormalization and
    elementwise unary ops: the input's; Add/Sub/Mul/Div: the larger input's). None otherwise."""
    if depth > _STATED_DEPTH or not name:
        return None
    outer: Scope | None = scope
    while outer is not None:  # initializers of this graph and the enclosing ones
        tensor = outer.initializers.get(name)
        if tensor is not None:
            return len(tensor.dims)
        if name in outer.producer or name in outer.formal_inputs:
            break
        outer = outer.parent
    if scope.parent is None and name in scope.formal_inputs and scope.graph is not None:
        for v in scope.graph.input:
            if v.name == name and v.type.tensor_type.HasField("shape"):
                return len(v.type.tensor_type.shape.dim)
    node = scope.producer.get(name)
    if node is None or node.domain not in DEFAULT_DOMAINS or node.output[0] != name:
        return None
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
        return stated_rank(scope, node.input[1], depth + 1)
    if op in ("Gemm", "Flatten"):
        return 2
    if op in _RANK_OF_FIRST_INPUT:
        return stated_rank(scope, node.input[0], depth + 1)
    if op == "MatMul" and len(node.input) == 2:  # numpy matmul: 1-D operands lose their axis
        a, b = (stated_rank(scope, i, depth + 1) for i in node.input)
        if a is None or b is None or min(a, b) < 1:
            return None
        return max(a, b) if min(a, b) >= 2 else max(a, b) - 1
    if op in ("Squeeze", "Unsqueeze") or op in _REDUCE_OPS:
        return _axes_rank(scope, node, depth)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
        a, b = (stated_rank(scope, i, depth + 1) for i in node.input)
        return None if a is None or b is None else max(a, b)
    return None


def _axes_rank(scope: Scope, node: onnx.NodeProto, depth: int) -> int | None:
    """Output rank of Squeeze, Unsqueeze or a Reduce op whose ``axes`` are known (an attribute,
    or a constant second input); None when they are not, or are malformed."""
    rank = stated_rank(scope, node.input[0], depth + 1)
    if rank is None:
        return None
    reduce = node.op_type in _REDUCE_OPS
    try:
        if reduce and attr(node, "keepdims", 1, "INT"):
            return rank
        axes = attr(node, "axes", None, "INTS")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = scope.constant_or_none(node.input[1])
            if value is None:
                return None
            axes = [int(a) for a in np.asarray(value).reshape(-1)]
        if reduce and not axes:  # all axes, or none at all
            return rank if attr(node, "noop_with_empty_axes", 0, "INT") else 0
    except InputError:  # a malformed attribute: shape inference decides
        return None
    if not axes:
        return None  # Squeeze of every 1-sized axis, or an Unsqueeze without axes
    out_rank = rank + len(axes) if node.op_type == "Unsqueeze" else rank
    unique = {a % out_rank for a in axes if -out_rank <= a < out_rank}
    if len(unique) != len(axes):
        return None
    return out_rank if node.op_type == "Unsqueeze" else rank - len(unique)
