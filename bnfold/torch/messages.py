"""Short messages for errors raised on the PyTorch path, and the guard around the user's code
(no torch import here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import BnfoldError, InputError


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or just the type), for one-line errors."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def few(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, with a count of the rest; ``none`` when empty."""
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@contextlib.contextmanager
def user_code(what: str, *, any_error: bool = True) -> Iterator[None]:
    """Run the user's code (a factory, a model's forward): ``SystemExit`` — and with
    ``any_error`` every other exception — becomes one InputError line ``what: why``, so that
    ``sys.exit()`` in a model file neither ends the process with exit 0 nor writes half a result.
    bnfold's own errors pass through; KeyboardInterrupt is left to the caller."""
    try:
        yield
    except BnfoldError:
        raise
    except SystemExit as exc:
        raise InputError(f"{what}: {first_line(exc)}") from exc
    except Exception as exc:
        if not any_error:
            raise
        raise InputError(f"{what}: {first_line(exc)}") from exc
