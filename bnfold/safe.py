# SHIM: removed at integration
"""Moved to :mod:`bnfold.verify.rollback` (options grouped in :class:`bnfold.verify.VerifyOptions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .verify import rollback
from .verify.options import VerifyOptions
from .verify.rollback import MAX_ROUNDS, Make, Verified

__all__ = ["MAX_ROUNDS", "Make", "Verified", "fold_verified"]


def fold_verified(
    make: Make,
    reference: Any,
    *,
    exclude: frozenset[str] = frozenset(),
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    samples: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
) -> Verified:
    """Today's signature, for callers not yet moved to :func:`bnfold.verify.fold_verified`."""
    options = VerifyOptions(inputs, shapes, seed, samples, atol, rtol)
    return rollback.fold_verified(make, reference, options=options, exclude=exclude, force=force)
