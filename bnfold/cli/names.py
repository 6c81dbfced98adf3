"""``--exclude NAME``: the names people see in reports (BN node names, or
``BatchNormalization(OUT)`` for an unnamed one) and the tensor names the pass takes (a BN's
output), both accepted; a name that is no BatchNormalization is a usage error."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import typer

from bnfold.onnx.graph import is_op, walk_graphs


def exclude_outputs(model: onnx.ModelProto, names: Sequence[str], *, path: str) -> tuple[str, ...]:
    """The output tensor of each BatchNormalization ``names`` designates, in order."""
    by_name: dict[str, str] = {}
    other: dict[str, str] = {}
    for site in walk_graphs(model):
        for node in site.body.node:
            if is_op(node, "BatchNormalization") and node.output:
                for key in (node.name, node.output[0], f"BatchNormalization({node.output[0]})"):
                    if key:
                        by_name.setdefault(key, node.output[0])
            else:
                for key in (node.name, *node.output):
                    if key:
                        other.setdefault(key, node.op_type)
    out: list[str] = []
    for name in names:
        if name in by_name:
            out.append(by_name[name])
        elif name in other:
            raise typer.BadParameter(
                f"'{name}' in {path} is a {other[name]} node or its output, not a BatchNormalization",
                param_hint="--exclude",
            )
        else:
            raise typer.BadParameter(
                f"{path} has no BatchNormalization node or output named '{name}'", param_hint="--exclude"
            )
    return tuple(dict.fromkeys(out))
