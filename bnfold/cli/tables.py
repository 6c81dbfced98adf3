"""Plain aligned columns for the CLI's tables: one line per row, a header over every column,
no box, no trailing spaces, never a cell broken mid-word (piped output stays greppable: one item
per line). Cells are escaped so names cannot carry terminal control sequences."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.text import Text

from bnfold.cli.console import printable

Cell = str | Text


def columns(header: Sequence[str], rows: Sequence[Sequence[Cell]], *, right: Sequence[int] = ()) -> Group:
    """``header`` then ``rows`` as aligned lines indented by two spaces; columns in ``right``
    are right-aligned. Plain strings are escaped; Text cells are the caller's (already safe)."""
    texts = [[Text(h, style="bold") for h in header]]
    texts += [[c if isinstance(c, Text) else Text(printable(c)) for c in row] for row in rows]
    widths = [max(len(r[i].plain) for r in texts) for i in range(len(header))]
    lines = []
    for row in texts:
        line = Text("  ")
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - len(cell.plain))
            last = i == len(row) - 1
            piece = Text.assemble(pad, cell) if i in right else Text.assemble(cell, "" if last else pad)
            line.append_text(piece)
            if not last:
                line.append("  ")
        line.rstrip()
        lines.append(line)
    return Group(*lines)
