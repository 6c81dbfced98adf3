"""Names on the command line checked against the model, in the command line's words:
``--exclude NAME`` (the names people see in reports: BN node names, or ``BatchNormalization(OUT)``
for an unnamed one, and the tensor names the pass takes: a BN's output; a name that is no
BatchNormalization is a usage error) and ``--shape NAME=...`` (an input of the model)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import typer

from bnfold.onnx.graph import is_op, walk_graphs
from bnfold.onnxlib import onnx


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


def check_shape_names(model: onnx.ModelProto, names: Iterable[str], *, path: str) -> None:
    """Refuse a ``--shape`` for a name that is not one of the model's inputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    for name in names:
        if name not in inputs:
            listed = ", ".join(inputs) if inputs else "none"
            raise typer.BadParameter(
                f"'{name}' is not an input of {path} (its inputs: {listed})", param_hint="--shape"
            )
