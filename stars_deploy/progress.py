"""Progress and log lines go to stderr, so that ``--json`` output on stdout stays clean."""

from __future__ import annotations

import sys

from tqdm import tqdm

_quiet = False
_verbose = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def set_verbose(value: bool) -> None:
    global _verbose
    _verbose = value


def verbose() -> bool:
    return _verbose


def debug(message: str) -> None:
    """One line on stderr only with -v/--verbose."""
    if _verbose and not _quiet:
        print(message, file=sys.stderr, flush=True)


def log(message: str) -> None:
    """One line on stderr (suppressed by ``--quiet``)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def progress_bar(total: float | None, description: str, unit: str) -> tqdm:
    """A tqdm bar on stderr; hidden when quiet or when stderr is not a terminal."""
    # a budget in seconds advances by fractions: show whole seconds, not 89.70065362599416/90.0
    bar_format = "{l_bar}{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}{postfix}]" \
        if unit == "s" else None
    # a bar is for a person watching: in a log (stderr not a terminal) its \r frames are noise
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=_quiet or not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False, bar_format=bar_format)
