"""Minimum inputs and outputs of a default-domain ONNX operator, without importing onnx.

:func:`min_arity` answers what ``onnx.defs.get_schema(op_type, opset, "")`` would, as
``(min_input, min_output)``, or None where get_schema raises (an unknown op, an opset before the
op's first version, an opset below 1), from the table :mod:`.arity_table` that
``scripts/gen_arity.py`` generates from onnx's schemas. An opset above the table's
:data:`MAX_OPSET` is asked of the installed onnx instead, which may be newer than the table.
"""

from __future__ import annotations

from functools import cache

from bnfold.onnxlib import onnx

from .arity_table import ARITY, MAX_OPSET

__all__ = ["ARITY", "MAX_OPSET", "live_min_arity", "min_arity"]


def min_arity(op_type: str, opset: int) -> tuple[int, int] | None:
    """``(min inputs, min outputs)`` of the default-domain operator ``op_type`` at ``opset``, as
    ``onnx.defs.get_schema(op_type, opset, "")`` gives them; None where get_schema raises."""
    if opset > MAX_OPSET:
        return live_min_arity(op_type, opset)
    for since, min_input, min_output in reversed(ARITY.get(op_type, ())):
        if since <= opset:
            return min_input, min_output
    return None


@cache
def live_min_arity(op_type: str, opset: int) -> tuple[int, int] | None:
    """:func:`min_arity` asked of the installed onnx's schemas (imports the onnx package)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:  # noqa: BLE001 - an unknown op, an opset out of range: no answer
        return None
    return schema.min_input, schema.min_output
