"""The reference's second run, whose difference from the first calibrates the tolerances.

The reference runs once more at ``CALIBRATION_LEVEL`` (onnxruntime's ``ORT_ENABLE_BASIC``), where
onnxruntime folds Conv+BN itself: a correct fold, differing from the ``ORT_DISABLE_ALL`` run
only in float rounding. Per sample and fetched tensor, the largest difference per channel is the
noise a correct fold makes there (:func:`bnfold.verify.compare.noise_of`).

Memory
    That session holds its own folded copy of the weights (2x the weights, against 1x mapped
    for an ``ORT_DISABLE_ALL`` session). So it runs alone, before the comparison sessions, and
    its tensors are kept for the comparison -- unless they would take more memory than the
    weights themselves (``KEEP_BUDGET``: large activations, small weights). Then the reference's
    ``ORT_DISABLE_ALL`` session is built beside it, the noise is computed at once (a few floats
    per channel), and that session is handed on to the comparison. Either way the peak is the
    smaller of "calibration alone plus its tensors" and "both reference sessions".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .compare import noise_of
from .models import NotRun, OrtModel, run, session

__all__ = ["CALIBRATION_LEVEL", "KEEP_BUDGET", "Calibration", "calibrate", "weight_bytes"]

CALIBRATION_LEVEL = "ORT_ENABLE_BASIC"
"""The level of the reference's second run: basic folds Conv+BN and constants (a correct fold) at
half the memory of ``ORT_ENABLE_ALL`` (+2x against +4x the weights on large-100), whose layout
changes only add noise."""
KEEP_BUDGET = 1.0
"""The calibration run's tensors (all samples) are kept while they take at most this many times
the reference's weight bytes; past that, the noise is computed sample by sample."""


@dataclass
class Calibration:
    """Per sample, the calibration run's tensors (``kept``) or the noise already computed."""

    outputs: frozenset[str]
    """The reference's graph outputs (one noise per tensor; intermediates: one per channel)."""
    kept: list[dict[str, np.ndarray]] | None = None
    noises: list[dict[str, Any]] | None = None
    reference_session: Any = field(default=None, repr=False)
    """The reference's ``ORT_DISABLE_ALL`` session, when it was built to compute the noise."""

    @property
    def calibrated(self) -> bool:
        return self.kept is not None or self.noises is not None

    def kind(self, name: str) -> str:
        return "output" if name in self.outputs else "intermediate"

    def noise(self, sample: int, name: str, values: np.ndarray) -> Any:
        """The noise at the reference's tensor ``name`` in ``sample`` (whose ``ORT_DISABLE_ALL``
        values are ``values``); None when not calibrated there."""
        if self.noises is not None:
            return self.noises[sample].get(name)
        if self.kept is None or name not in self.kept[sample]:
            return None
        return noise_of(values, self.kept[sample][name], self.kind(name))


def calibrate(
    ref: OrtModel,
    ref_extra: Sequence[onnx.ValueInfoProto],
    feeds: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    outputs: frozenset[str],
    notes: list[str],
) -> Calibration:
    """Run the reference at ``CALIBRATION_LEVEL`` on every feed (see module docstring); a model
    onnxruntime cannot load or run there is compared uncalibrated, with a note saying why."""
    cal = Calibration(outputs)
    try:
        sess = session(ref, ref_extra, CALIBRATION_LEVEL)
        runs: list[dict[str, Any]] = []
        for i, feed in enumerate(feeds):
            k = {n: a for n, a in zip(names, run(sess, ref, feed)) if a.dtype.kind in "fc"}
            if i == 0 and len(feeds) * sum(a.nbytes for a in k.values()) > KEEP_BUDGET * weight_bytes(ref):
                cal.reference_session = session(ref, ref_extra, "ORT_DISABLE_ALL")
            if cal.reference_session is not None:
                r = dict(zip(names, run(cal.reference_session, ref, feed)))
                k = {n: noise_of(r[n], a, cal.kind(n)) for n, a in k.items()}
            runs.append(k)
    except NotRun as e:
        notes.append(f"tolerances not calibrated: {e}")
        return Calibration(outputs)
    if cal.reference_session is None:
        cal.kept = runs
    else:
        cal.noises = runs
    return cal


def weight_bytes(model: OrtModel) -> int:
    """Bytes of the initializers of the model's main graph (stubs and external data included)."""
    total = 0
    for t in model.graph.initializer:
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):  # an undefined or unknown type: count 4 bytes
            itemsize = 4
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total
