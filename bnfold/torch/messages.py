"""Short messages for errors raised on the PyTorch path (no torch import here)."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or just the type), for one-line errors."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def few(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, comma-separated, with a count of the rest; ``none`` when empty."""
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
