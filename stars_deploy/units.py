"""Numbers as people read them: one formatter per kind of quantity, used by every command and
the report (accuracies as percentages, energies and times with SI prefixes, counts with
their denominators)."""

from __future__ import annotations

import math

SI_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n"),
               (1e-12, "p"), (1e-15, "f"))
NOT_AVAILABLE = "n/a"


def percent(value: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as ``12.3 %``; ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_AVAILABLE
    return f"{100 * value:.{digits}f} %"


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """``value`` in ``unit`` with an SI prefix and ``digits`` significant digits:
    ``si(9.994915e-05, "J")`` is ``99.9 µJ``, ``si(0.0021, "s")`` is ``2.10 ms``."""
    if value is None or not math.isfinite(value):
        return NOT_AVAILABLE
    if value == 0:
        return f"0 {unit}"
    magnitude = abs(value)
    scale, prefix = next(((s, p) for s, p in SI_PREFIXES if magnitude >= s * (1 - 1e-12)), SI_PREFIXES[-1])
    scaled = value / scale
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(scaled)))))
    return f"{scaled:.{decimals}f} {prefix}{unit}"


def count(value: float | None) -> str:
    """A count with thousands separators (a mean count keeps one decimal)."""
    if value is None:
        return NOT_AVAILABLE
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def of(part: float | None, total: float | None) -> str:
    """``24,132 of 1,433,600 (1.7 %)``."""
    if part is None or not total:
        return count(part)
    return f"{count(part)} of {count(total)} ({percent(part / total)})"


def steps_and_time(steps: int | None, dt_s: float | None) -> str:
    """``9 steps (9.00 ms at dt = 1.00 ms)``; steps alone when dt is unknown."""
    if steps is None:
        return NOT_AVAILABLE
    if not dt_s:
        return f"{steps} steps"
    return f"{steps} steps ({si(steps * dt_s, 's')} at dt = {si(dt_s, 's')})"


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
