"""Numbers as people read them: one formatter per kind of quantity, used by every command."""

from __future__ import annotations


def percent(value: float | None) -> str:
    """A fraction in [0, 1] as ``12.3 %``; ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.1f} %"


def text_table(header: tuple, rows: list[tuple]) -> list[str]:
    """An aligned text table, header first, one string per line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def binary_size(count: float) -> str:
    """A number of bytes as people read it: ``512 B``, ``1.5 KiB``, ``3.2 GiB``, ``1.3e+05 PiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB" if abs(count) < 1e4 else f"{count:.2g} PiB"
