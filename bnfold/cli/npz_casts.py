"""``--inputs data.npz`` whose arrays have another dtype than the model's inputs: the verifier
casts them; the command line says so, and refuses a cast that would change a value (a float64
array with more precision than float32 holds, an int64 past int32's range): the comparison would
then run on inputs nobody gave."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import typer

from bnfold.onnxlib import onnx


@dataclass(frozen=True)
class InputCast:
    """One ``--inputs`` array cast to the dtype its model input takes; every value survives."""

    input: str
    source: str
    """The array's dtype in the file."""
    target: str
    """The model input's dtype."""

    def to_dict(self) -> dict[str, str]:
        return {"input": self.input, "from": self.source, "to": self.target}


def npz_casts(
    model: onnx.ModelProto, inputs: str | None, *, option: str = "--inputs"
) -> tuple[InputCast, ...]:
    """The casts an ``.npz`` of ``inputs`` needs for ``model``; raises a usage error for one
    that changes a value. Other input forms (``.pb`` folders) carry the model's dtypes already."""
    if not inputs or not inputs.lower().endswith(".npz") or not os.path.isfile(inputs):
        return ()
    initializers = {t.name for t in model.graph.initializer}
    wanted = {
        i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        for i in model.graph.input
        if i.name not in initializers and i.type.HasField("tensor_type") and i.type.tensor_type.elem_type
    }
    casts: list[InputCast] = []
    try:
        npz = np.load(inputs, allow_pickle=False)
    except Exception:  # noqa: BLE001 - unreadable: the verifier says why, in its words
        return ()
    with npz:
        for name in npz.files:
            target = wanted.get(name)
            if target is None:
                continue  # an unknown name: the verifier's message lists the inputs
            array = npz[name]
            if (
                array.dtype == target
                or array.dtype.kind not in "biufc"
                or np.dtype(target).kind not in "biufc"
            ):
                continue
            with np.errstate(all="ignore"):
                back = array.astype(target).astype(array.dtype)
            changed = int(np.size(array) - np.count_nonzero(_same(array, back)))
            if changed:
                raise typer.BadParameter(
                    f"'{name}' in {inputs} is {array.dtype}, the model takes {np.dtype(target).name}, and "
                    f"{changed} of its {array.size} values change in that cast; save it as "
                    f"{np.dtype(target).name} (array.astype(np.{np.dtype(target).name}))",
                    param_hint=option,
                )
            casts.append(InputCast(name, str(array.dtype), np.dtype(target).name))
    return tuple(casts)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise equality, NaN equal to NaN."""
    same = a == b
    if a.dtype.kind in "fc":
        same |= np.isnan(a) & np.isnan(b)
    return same
