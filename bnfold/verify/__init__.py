"""Prove a folded model computes what the original computes, with onnxruntime at ``ORT_DISABLE_ALL``.

- :mod:`~bnfold.verify.options`: :class:`VerifyOptions`, the six options grouped once.
- :mod:`~bnfold.verify.inputs`: the inputs both models are fed (seeded draws, ``.npz``, ``.pb``).
- :mod:`~bnfold.verify.models`: loading the models into onnxruntime sessions.
- :mod:`~bnfold.verify.compare`: the metric, the default tolerances, where divergence starts.
- :mod:`~bnfold.verify.calibrate`: the reference's second run, the noise a correct fold makes.
- :mod:`~bnfold.verify.weights`: the static check of each fold point's weights.
- :mod:`~bnfold.verify.run`: :func:`verify` itself.
- :mod:`~bnfold.verify.rollback`: fold, verify, revert the folds that diverge, verify again.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .options import VerifyOptions, verify_options

if TYPE_CHECKING:
    from .compare import CHANNEL_SCALE_FLOOR, DEFAULT_RTOL
    from .inputs import load_inputs, make_inputs
    from .rollback import Verified, fold_verified
    from .run import verify, verify_with
    from .weights import WEIGHT_ULPS, WeightCheck, check_weights

_LAZY = {
    "CHANNEL_SCALE_FLOOR": "compare",
    "DEFAULT_RTOL": "compare",
    "load_inputs": "inputs",
    "make_inputs": "inputs",
    "Verified": "rollback",
    "fold_verified": "rollback",
    "verify": "run",
    "verify_with": "run",
    "WEIGHT_ULPS": "weights",
    "WeightCheck": "weights",
    "check_weights": "weights",
}
"""Names served from their modules on first use: they import onnx and onnxruntime, which a
fold without verification (``import bnfold.verify.options`` included) must not pay for."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CHANNEL_SCALE_FLOOR",
    "DEFAULT_RTOL",
    "WEIGHT_ULPS",
    "Verified",
    "VerifyOptions",
    "WeightCheck",
    "check_weights",
    "fold_verified",
    "load_inputs",
    "make_inputs",
    "verify",
    "verify_options",
    "verify_with",
]
