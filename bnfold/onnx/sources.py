"""What yields a per-channel affine map: BatchNormalization in inference mode.

ONNX BatchNormalization (all opsets) normalizes axis 1 of its input ``X``::

    Y = scale * (X - mean) / sqrt(var + epsilon) + B      (epsilon defaults to 1e-5)
      = s * X + t,   s = scale / sqrt(var + epsilon),  t = B - mean * s

(see :func:`bnfold.fold_math.bn_affine`). It is an affine map only with running statistics:
``training_mode=1``, opset <= 6 ``is_test=0``, statistics outputs declared before opset 14
(onnxruntime then normalizes with batch statistics) and opset <= 8 ``spatial=0``
(per-element statistics) are refused, as are parameters that are not constant.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import fold_math
from ..report import SkipReason
from .constants import NotConstant
from .graph import Scope, attr, is_op
from .plan import Reject, Source


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return is_op(node, "BatchNormalization")


def bn_label(bn: onnx.NodeProto) -> str:
    return bn.name or f"BatchNormalization({bn.output[0]})"


def inference_problem(bn: onnx.NodeProto, opset: int, *, used: bool) -> Reject | None:
    """Why ``bn`` is not an inference-mode, per-channel BN, or None.

    ``used``: whether one of its statistics outputs is consumed. This is the single place of
    the training-mode policy.
    """
    if opset <= 6 and int(attr(bn, "is_test", 0)) != 1:
        return Reject(
            SkipReason.TRAINING_MODE, "is_test is not 1 (opset <= 6 default is training: batch statistics)"
        )
    if int(attr(bn, "training_mode", 0)) != 0:
        return Reject(SkipReason.TRAINING_MODE, "training_mode=1: the node normalizes with batch statistics")
    if used:
        return Reject(SkipReason.EXTRA_OUTPUTS_USED, "an output with running/saved statistics is consumed")
    if opset < 14 and any(bn.output[1:]):
        return Reject(
            SkipReason.TRAINING_MODE,
            f"opset {opset} BN declares {sum(1 for o in bn.output if o)} outputs, which is training mode: "
            "onnxruntime normalizes with batch statistics even when they are unused",
        )
    if opset <= 8 and int(attr(bn, "spatial", 1)) != 1:
        return Reject(SkipReason.SPATIAL_0, "spatial=0: statistics are per element, not per channel")
    return None


def bn_problem(scope: Scope, bn: onnx.NodeProto) -> Reject | None:
    """Why ``bn`` is not an inference-mode BN with the inputs of one (parameters not read yet)."""
    used = next((e for e in bn.output[1:] if e and scope.uses(e) > 0), None)
    problem = inference_problem(bn, scope.index.opset, used=used is not None)
    if problem is not None and problem.reason is SkipReason.EXTRA_OUTPUTS_USED:
        return Reject(problem.reason, f"output {used!r} (running/saved statistics) is consumed")
    if problem is None and (len(bn.input) < 5 or not bn.input[0]):
        return Reject(SkipReason.SHAPE_MISMATCH, "BatchNormalization needs five inputs")
    return problem


def bn_source(scope: Scope, bn: onnx.NodeProto) -> Source | Reject:
    """``bn`` (which passed :func:`bn_problem`) as an affine map on axis 1 of its input."""
    try:
        gamma, beta, mean, var = (
            scope.constant(n, what=f"BN {w}") for n, w in zip(bn.input[1:5], ("scale", "bias", "mean", "var"))
        )
    except NotConstant as e:
        return Reject(e.reason, e.detail)
    if not all(_is_float(a) for a in (gamma, beta, mean, var)):
        return Reject(SkipReason.UNSUPPORTED_DTYPE, "BN parameters are not floating point")
    shapes = {np.asarray(a).shape for a in (gamma, beta, mean, var)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return Reject(SkipReason.SHAPE_MISMATCH, f"BN parameters have shapes {sorted(shapes)}, expected (C,)")
    eps = float(attr(bn, "epsilon", fold_math.DEFAULT_EPSILON))
    return Source(
        kind="batchnorm",
        label=bn_label(bn),
        input=bn.input[0],
        output=bn.output[0],
        affine=fold_math.bn_affine(gamma, beta, mean, var, eps),
        nodes=(bn,),
        axis=1,
    )


def _is_float(a: np.ndarray) -> bool:
    dtype = np.asarray(a).dtype
    return dtype.kind == "f" or str(dtype) == "bfloat16"
