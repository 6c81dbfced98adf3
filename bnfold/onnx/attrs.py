"""The one typed reader of node attributes.

protobuf does not check that an attribute's type matches what the operator wants, so a model can
hold ``training_mode`` as a STRING or ``epsilon`` with no type at all. Every attribute the pass
acts on is read through :func:`attr`, which refuses such a model with an InputError naming the
node and the attribute.
"""

from __future__ import annotations

from typing import Any

from bnfold.onnxlib import onnx

from ..errors import InputError

_ATTR_READERS: dict[str, Any] = {
    "INT": lambda a: int(a.i),
    "FLOAT": lambda a: float(a.f),
    "INTS": lambda a: [int(v) for v in a.ints],
    "FLOATS": lambda a: [float(v) for v in a.floats],
    "TENSOR": lambda a: a.t,
    "STRING": lambda a: a.s.decode("utf-8"),
}


def attr(node: onnx.NodeProto, name: str, default: Any, kind: str) -> Any:
    """The value of ``node``'s attribute ``name`` (``default`` when absent), which must have type
    ``kind`` (``"INT"``, ``"FLOAT"``, ``"INTS"``, ``"FLOATS"``, ``"TENSOR"``, or ``"STRING"``, decoded
    as UTF-8).

    The one reader of the attributes the pass acts on: an attribute of another type, one with no
    type, or one that refers to a function's attribute (``ref_attr_name``: its value is the
    caller's, unknown here) raises InputError naming the node, instead of a wrong value or a
    ValueError deep in the pass."""
    for a in node.attribute:
        if a.name != name:
            continue
        label = node.name or (node.output[0] if node.output else "")
        where = f"node {label!r} ({node.op_type}): attribute {name!r}"
        if a.ref_attr_name:
            raise InputError(
                f"{where} takes its value from the function's attribute {a.ref_attr_name!r}, which bnfold "
                "does not resolve (inline the function first)"
            )
        found = (
            onnx.AttributeProto.AttributeType.Name(a.type) if a.type in _ATTR_TYPE_NUMBERS else str(a.type)
        )
        if found != kind:
            raise InputError(f"{where} has type {found}, expected {kind}")
        try:
            return _ATTR_READERS[kind](a)
        except UnicodeDecodeError:
            raise InputError(f"{where} is not valid UTF-8 ({a.s!r:.40})") from None
    return default


_ATTR_TYPE_NUMBERS = frozenset(onnx.AttributeProto.AttributeType.values())
