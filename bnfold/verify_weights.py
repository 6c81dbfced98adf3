# SHIM: removed at integration
"""Moved to :mod:`bnfold.verify.weights`."""

from .verify.weights import WEIGHT_ULPS, WeightCheck, check_weights

__all__ = ["WEIGHT_ULPS", "WeightCheck", "check_weights"]
