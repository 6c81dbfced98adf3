"""Large folds computed before they are decided, checked where they are written.

A fold into a weight whose bytes are in a file is decided on a read pass
(:func:`bnfold.fold_math.scale_weight_planned`) and computed while saving. For a large weight
the read pass is a second read of every byte; :func:`scale_weight_undecided` skips it and makes
the recipe undecided (:class:`~bnfold.fold_math.ScaledWeight` with a
:class:`~bnfold.fold_math.Ticket`). Whoever then computes its values checks them:

- the save, a block at a time, with :func:`rows_accepted`: every value finite and no non-zero
  value rounded to zero. The decision refuses only a new inf or NaN, or a channel rounded
  *entirely* to zero, so a block that passes is one it accepts (a partly flushed channel, a
  zero scale or a NaN already in the weight fail the test although the decision may accept
  them: the fold is then simply redone, never taken on a weaker test);
- ``ScaledWeight.apply`` (reads, embedded saves, a second fold into the same weight), with the
  decision itself (:func:`bnfold.fold_math.scale_weight_exact`);
- :meth:`Tickets.settle` at the end of the pass, with the decision, for a recipe whose plan was
  not taken (the decision's refusal could have changed which plan was, or the reason reported).

Each raises :class:`~bnfold.fold_math.Undecided`; ``bnfold.api.fold_path`` catches it once and
redoes the whole fold with every decision made first, so its output, report and bytes are those
of the decided fold. If no check fails, every recipe is one the decision accepts, each of them
gave the pass the same answer as the decision would have, and the values are computed by the
same multiply and rounding: the result is the decided fold's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from . import fold_math
from .fold_math import ScaledWeight, Ticket, Undecided, scale_weight_planned

OPTIMISTIC_MIN_BYTES = 1 << 20
"""Smaller weights are decided first: their read pass costs little."""


class Tickets:
    """The undecided recipes made in one :func:`undecided_folds` block."""

    def __init__(self) -> None:
        self.items: list[Ticket] = []

    def settle(self, written: set[int]) -> None:
        """Decide every recipe no one will check. ``written``: the ids of the tickets of the
        deferred tensors still in the model (its save checks them). Raises
        :class:`~bnfold.fold_math.Undecided` unless the decision accepts all the others."""
        for ticket in self.items:
            if ticket.is_checked:
                continue
            if ticket.is_deferred:
                if id(ticket) not in written:  # deferred, then dropped: checked nowhere
                    raise Undecided("a deferred fold left the model before it was written")
                continue
            if ticket.weight is None:  # pragma: no cover - kept until checked or deferred
                raise Undecided("an undecided fold lost its weight")
            out, why = scale_weight_planned(ticket.weight, ticket.scale, axis=0)
            if out is None:
                raise Undecided(f"a fold not taken is one the decision refuses: {why}")
            ticket.checked()


_TICKETS: ContextVar[Tickets | None] = ContextVar("bnfold_undecided_folds", default=None)


@contextmanager
def undecided_folds(enabled: bool) -> Iterator[Tickets | None]:
    """Within the block, when ``enabled``, :func:`scale_weight_undecided` makes recipes and
    records them in the :class:`Tickets` yielded (None when not enabled)."""
    if not enabled:
        yield None
        return
    tickets = Tickets()
    token = _TICKETS.set(tickets)
    try:
        yield tickets
    finally:
        _TICKETS.reset(token)


def scale_weight_undecided(
    weight: np.ndarray, scale: np.ndarray, *, axis: int, groups: int = 1
) -> ScaledWeight | None:
    """``weight * scale`` as an undecided recipe, without reading ``weight``: inside
    :func:`undecided_folds`, for a float weight of at least :data:`OPTIMISTIC_MIN_BYTES`
    scaled on axis 0 by a finite scale. None otherwise: decide with ``scale_weight_planned``."""
    tickets = _TICKETS.get()
    if tickets is None or groups != 1 or axis != 0:
        return None
    w = np.asarray(weight)
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if (
        w.nbytes < max(OPTIMISTIC_MIN_BYTES, fold_math.DEFER_MIN_BYTES)
        or w.dtype not in (np.float16, np.float32, np.float64)
        or w.ndim == 0
        or s.shape[0] != w.shape[0]
        or not np.isfinite(s).all()
    ):
        return None
    ticket = Ticket(w, s)
    tickets.items.append(ticket)
    return ScaledWeight(s, axis, groups, w.dtype, tuple(w.shape), w, ticket)


_BITS = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00)}
"""float16 is checked on its bits (numpy's float16 reductions are slow): magnitude mask, +inf."""


def rows_accepted(w: np.ndarray, out: np.ndarray) -> bool:
    """Whether ``out``, computed from ``w`` by an undecided recipe, is one the decision accepts,
    by a stricter test: every value finite, and as many non-zero values as in ``w``."""
    out = out.reshape(-1)
    bits = _BITS.get(out.dtype)
    if bits is not None:
        kind, mask, inf = bits
        magnitude = np.bitwise_and(out.view(kind), kind(mask))
        if magnitude.max() >= inf:
            return False
        if magnitude.min() > 0:
            return True
        source = np.bitwise_and(np.asarray(w).reshape(-1).view(kind), kind(mask))
        return np.count_nonzero(magnitude) == np.count_nonzero(source)
    if not np.isfinite(out).all():
        return False
    return bool(out.all()) or np.count_nonzero(out) == np.count_nonzero(np.asarray(w).reshape(-1))
