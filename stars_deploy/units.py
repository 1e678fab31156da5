"""Numbers as people read them: one formatter per kind of quantity, used by every command."""

from __future__ import annotations


def percent(value: float | None) -> str:
    """A fraction in [0, 1] as ``12.3 %``; ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.1f} %"


def text_table(header: tuple, rows: list[tuple]) -> list[str]:
    """An aligned text table, header first, one string per line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def byte_size(count: int) -> str:
    """A byte count as people read it: ``512 B``, ``3.2 MiB``, ``24.0 GiB`` (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
