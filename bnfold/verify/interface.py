"""What a model accepts and returns is part of what it computes: the candidate's interface against
the reference's.

Inputs
    Every input the reference needs must be an input of the candidate, with the same element type
    and rank; a dimension symbolic in the reference must stay symbolic (a dynamic batch fixed to 1
    is a different model); a static one must keep its size. The candidate may not need an input
    the reference does not have.
Outputs
    Element types and ranks, where both models declare them (outputs are paired in
    :mod:`bnfold.verify.correspond`).
Overridable initializers
    An initializer the reference also lists as a graph input (IR >= 4) can be fed at run time.
    It must stay an input of the candidate, and one that still changes its result: both models
    run once more with every such float input perturbed (:func:`overrides`), and must agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..onnx.io import read_array
from .inputs import InputDecl
from .models import OrtModel

__all__ = ["interface_problems", "overrides"]

OVERRIDE_SCALE = 0.1
"""Overridable float initializers are fed ``value * (1 + OVERRIDE_SCALE * n) + OVERRIDE_SCALE * std * n``."""


def interface_problems(
    ref: OrtModel, cand: OrtModel, ref_inputs: Sequence[InputDecl], cand_inputs: Sequence[InputDecl]
) -> list[str]:
    """Sentences naming each way the candidate's interface differs from the reference's."""
    problems = []
    theirs = {d.name: d for d in cand_inputs}
    ours = {d.name for d in ref_inputs}
    strangers = [d.name for d in cand_inputs if d.name not in ours]
    if strangers:
        problems.append(f"candidate input(s) {strangers} are not inputs of the reference")
    for d in ref_inputs:
        c = theirs.get(d.name)
        if c is None:
            problems.append(f"input '{d.name}' of the reference is not an input of the candidate")
            continue
        if c.elem_type != d.elem_type:
            problems.append(
                f"input '{d.name}' is {_type(d.elem_type)} in the reference, {_type(c.elem_type)} in the candidate"
            )
        problems += _dims_problem(f"input '{d.name}'", d.dims, c.dims)
    for r, c in zip(ref.graph.output, cand.graph.output):
        rt, ct = _declared(r), _declared(c)
        if rt[0] and ct[0] and rt[0] != ct[0]:
            problems.append(
                f"output '{r.name}' is {_type(rt[0])} in the reference, {_type(ct[0])} in the candidate"
            )
        if rt[1] is not None and ct[1] is not None and len(rt[1]) != len(ct[1]):
            problems.append(
                f"output '{r.name}' has rank {len(rt[1])} in the reference, {len(ct[1])} in the candidate"
            )
    inputs = {vi.name for vi in cand.graph.input}
    lost = [name for name in overridable(ref) if name not in inputs]
    if lost:
        problems.append(
            f"initializer(s) {lost} can be fed to the reference at run time but are no longer "
            "inputs of the candidate"
        )
    return problems


def _dims_problem(what: str, ref: tuple | None, cand: tuple | None) -> list[str]:
    if ref is None or cand is None:
        return []
    if len(ref) != len(cand):
        return [f"{what} has rank {len(ref)} in the reference, {len(cand)} in the candidate"]
    for i, (r, c) in enumerate(zip(ref, cand)):
        if not isinstance(r, int) and isinstance(c, int):
            return [
                f"{what} dimension {i} is dynamic ('{r or '?'}') in the reference, fixed to {c} in the candidate"
            ]
        if isinstance(r, int) and isinstance(c, int) and r != c:
            return [f"{what} dimension {i} is {r} in the reference, {c} in the candidate"]
    return []


def _declared(vi: onnx.ValueInfoProto) -> tuple[int, tuple | None]:
    if vi.type.WhichOneof("value") != "tensor_type":
        return 0, None
    tt = vi.type.tensor_type
    return tt.elem_type, (tuple(tt.shape.dim) if tt.HasField("shape") else None)


def _type(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def overridable(model: OrtModel) -> list[str]:
    """Float initializers of the main graph that are also graph inputs (IR >= 4)."""
    if model.proto.ir_version < 4:
        return []
    inputs = {vi.name for vi in model.graph.input}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    return [t.name for t in model.graph.initializer if t.name in inputs and t.data_type in floats]


def overrides(model: OrtModel, seed: int) -> dict[str, np.ndarray]:
    """A perturbed value for each overridable float initializer of ``model`` (seeded)."""
    rng = np.random.default_rng(seed + 1)
    by_name = {t.name: t for t in model.graph.initializer}
    out = {}
    for name in overridable(model):
        value = np.asarray(read_array(by_name[name], model.directory))
        noise = rng.standard_normal(value.shape)
        spread = (
            float(np.std(value))
            if value.size > 1
            else abs(float(value.reshape(-1)[0]))
            if value.size
            else 0.0
        )
        perturbed = value * (1 + OVERRIDE_SCALE * noise) + OVERRIDE_SCALE * max(spread, 1e-3) * noise
        out[name] = perturbed.astype(value.dtype)
    return out
