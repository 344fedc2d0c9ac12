"""`--set section.key=value` overrides of a job spec, with values coerced to the type the key expects.

A value is read as a TOML value first (`7`, `0.5`, `true`, `[2, 3]`, `"text"`, `{a = 1}`), so numbers, lists
and tables can be set; text that is not valid TOML is taken as a string, so `--set output.url=s3://b/out`
needs no quotes. Where the key expects a string and the TOML value is not one (`--set input.date=2024-05-01`
reads as a TOML date, `--set input.id_column=42` as an integer), the text as typed is used.
"""

from __future__ import annotations

import copy
import datetime
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batchgen.errors import SpecError

# Maps a key path to the type the spec expects there, or None when the path is not a known key.
FieldTypeLookup = Callable[[Sequence[str]], Any]


def parse_assignment(assignment: str, field_type: FieldTypeLookup) -> tuple[tuple[str, ...], Any]:
    """Split `a.b.c=value` into its key path and its value, coerced to the type `field_type` gives.

    Example:
        >>> parse_assignment("sampling.seed=7", lambda path: int)
        (('sampling', 'seed'), 7)
    """
    key, sep, text = assignment.partition("=")
    key = key.strip()
    path = tuple(part.strip() for part in key.split("."))
    if not sep or not key or any(not part for part in path):
        raise SpecError(f"--set expects section.key=value, got {assignment!r}")
    return path, _coerce(text.strip(), field_type(path))


def apply_overrides(raw: Mapping[str, Any], assignments: Sequence[str], field_type: FieldTypeLookup) -> dict[str, Any]:
    """A copy of the raw spec table `raw` with each `section.key=value` of `assignments` set in it."""
    result = copy.deepcopy(dict(raw))
    for assignment in assignments:
        path, value = parse_assignment(assignment, field_type)
        table = result
        for depth, part in enumerate(path[:-1]):
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise SpecError(f"--set {assignment!r}: {where} is {child!r}, not a table, so it has no keys")
            table = child
        table[path[-1]] = value
    return result


def _coerce(text: str, expected: Any) -> Any:
    value = _parse_toml_value(text)
    if expected is None or expected is Any:
        return value
    options = _type_options(expected)
    if isinstance(value, (datetime.date, datetime.time)) or (str in options and not _fits_any(value, options)):
        return text
    return value


def _parse_toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _type_options(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _fits_any(value: Any, options: tuple[Any, ...]) -> bool:
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, bool):
            continue
        if origin is tuple and isinstance(value, list):
            return True
        if isinstance(origin, type) and isinstance(value, origin):
            return True
    return False
