"""Typed fields of the configuration records, checked the same way wherever a value comes from.

Two checks, both raising :class:`ConfigError` with the field named:

- :func:`check_record` on a frozen dataclass the library just built (from options, a pipeline
  file or a stored manifest): integers where integers are due (``True`` and 1.7 are not),
  every float finite (NaN and infinities are never a valid rate, time or weight) and within
  float32's range (the tensors it scales are float32: --kd-lr 1e300 overflows in Adam), strings
  where strings are due;
- :func:`check_table` on a plain dict that is about to become such a record (a run
  manifest's ``config``): the same rules, plus unknown keys, nested tables and lists.

Type hints are read from the dataclass itself (``typing.get_type_hints``), so a field added
to a record is checked without touching this module.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError

NONE_TYPE = type(None)
FLOAT32_MAX = 3.4028234663852886e38  # the tensors are float32: a larger setting overflows in them


def _alternatives(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _problem(hint: Any, value: Any) -> str | None:
    """Why ``value`` is not of type ``hint`` (None when it is). Tuples may arrive as lists."""
    options = _alternatives(hint)
    if value is None:
        return None if NONE_TYPE in options else "is missing (null)"
    problems = []
    for option in options:
        if option is NONE_TYPE:
            continue
        problem = _problem_one(option, value)
        if problem is None:
            return None
        problems.append(problem)
    return problems[0]


def _problem_one(hint: Any, value: Any) -> str | None:
    if hint is bool:
        return None if isinstance(value, bool) else "is not true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "is not an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not math.isfinite(value):
            return "is not a finite number"
        return None if abs(value) <= FLOAT32_MAX else f"is beyond float32's range (+-{FLOAT32_MAX:.3g})"
    if hint is str:
        return None if isinstance(value, str) else "is not a string"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, (hint, Mapping)) else "is not a table"
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            return "is not a list"
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return f"has {len(value)} entries, expected {len(items)}"
        for item_hint, item in zip(items, value):
            problem = _problem(item_hint, item)
            if problem is not None:
                return f"has an entry {item!r} that {problem}"
        return None
    return None  # a type this checker does not know: the record's own __post_init__ decides


def check_record(record: Any, where: str = "", flags: Mapping[str, str] | None = None) -> None:
    """Every field of the dataclass ``record`` against its type hint (not recursive: each
    record checks itself). ``flags`` maps a field to the option users know it by."""
    hints = typing.get_type_hints(type(record))
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if dataclasses.is_dataclass(value):
            continue
        problem = _problem(hints[field.name], value)
        if problem is not None:
            flag = (flags or {}).get(field.name, field.name.replace("_", "-"))
            raise ConfigError(f"{where}--{flag} {value!r} {problem}: give a valid value (see --help)")


def check_table(record_type: type, table: Any, where: str, required: tuple[str, ...] = (),
                nested_required: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """A dict that should become ``record_type``: a table, no unknown keys, the ``required``
    keys present, every value of its field's type; nested records are checked recursively
    (``nested_required`` names their required keys). Errors name ``where.key``."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} is not a table")
    hints = typing.get_type_hints(record_type)
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}.{key} is missing")
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key} is not a known setting (written by another version?)")
        hint = hints[key]
        nested = next((option for option in _alternatives(hint) if dataclasses.is_dataclass(option)), None)
        if nested is not None and isinstance(value, Mapping):
            check_table(nested, value, f"{where}.{key}", (nested_required or {}).get(key, ()), nested_required)
            continue
        problem = _problem(hint, value)
        if problem is not None:
            raise ConfigError(f"{where}.{key} = {value!r} {problem}")
