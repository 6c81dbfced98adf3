"""The six verification options, grouped once: what to feed both models and how close is equal.

Public functions keep their documented keywords (``inputs=``, ``shapes=``, ``seed=``,
``samples=``, ``atol=``, ``rtol=``) and also accept ``options=VerifyOptions(...)``;
:func:`verify_options` turns either form into one :class:`VerifyOptions`, which is what every
internal signature takes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

Sample = Mapping[str, np.ndarray]
InputsLike = Sample | Sequence[Sample] | str | os.PathLike
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class VerifyOptions:
    """What both models are fed and the tolerances they are compared with.

    ``inputs``: one sample (name -> array), a list of samples, an ``.npz`` file or a folder of
    ``.pb`` tensors; None draws ``samples`` seeded samples from ``seed``. ``shapes`` fixes
    symbolic dimensions (``{"input": (1, 3, 224, 224)}``). ``atol``/``rtol`` replace the
    per-dtype defaults (:data:`bnfold.verify.DEFAULT_RTOL`) for float tensors, and loosen
    (never tighten) the static weights check.
    """

    inputs: Any = None
    shapes: Shapes | None = None
    seed: int = 0
    samples: int = 3
    atol: float | None = None
    rtol: float | None = None


DEFAULT = VerifyOptions()


def verify_options(
    options: VerifyOptions | None = None,
    *,
    inputs: InputsLike | None = None,
    shapes: Shapes | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyOptions:
    """``options``, or the keywords as a VerifyOptions; raises InputError when both are given
    (a keyword set to anything but its default beside ``options``)."""
    if options is None:
        return VerifyOptions(inputs, shapes, seed, samples, atol, rtol)
    if not isinstance(options, VerifyOptions):
        raise InputError(f"options must be a VerifyOptions, not {type(options).__name__}")
    defaults = (inputs, shapes, atol, rtol) == (None, None, None, None)
    if not defaults or (seed, samples) != (DEFAULT.seed, DEFAULT.samples):
        raise InputError(
            "pass the verification options either as options=VerifyOptions(...) or as keywords, not both"
        )
    return options
