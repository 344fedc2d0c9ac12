"""TOML tables to typed dataclasses, for the job spec: key checks (with a "did you mean"), type conversion and
sections of named configurations, each error naming the spec file and the key.

Nothing here knows the spec's sections (batchgen/spec.py) or its value ranges (batchgen/spec_checks.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from batchgen.errors import SpecError

# The name of a section's one configuration when it has no [SECTION.configs.NAME] tables.
DEFAULT_CONFIG_NAME = "default"
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def config_key(section: str, name: str) -> str:
    """Where a named configuration's keys live: `section`, or `section.configs.NAME`."""
    return section if name == DEFAULT_CONFIG_NAME else f"{section}.configs.{name}"


def as_table(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{source}: {where} must be a table ([{where}]), got {value!r}")
    return value


def check_keys(table: Mapping[str, Any], known: Mapping[str, Any] | Sequence[str], prefix: str, source: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(known)}"
            raise SpecError(f"{source}: unknown key {prefix}{key}{hint}")


def build(cls: type, table: Mapping[str, Any], section: str, source: str, hidden: Sequence[str] = ()) -> Any:
    """An instance of the dataclass `cls` from a TOML table: unknown keys and values of the wrong type raise
    SpecError naming `section.key`; fields in `hidden` cannot be set from the table."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in hidden]
    check_keys(table, [f.name for f in fields], f"{section}.", source)
    values: dict[str, Any] = {}
    for field in fields:
        key = f"{section}.{field.name}"
        if field.name not in table:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SpecError(f"{source}: {key} is required")
            continue
        values[field.name] = convert(table[field.name], hints[field.name], key, source)
    return cls(**values)


def build_configs(cls: type, table: Mapping[str, Any], section: str, source: str, check_shared: bool) -> tuple[Any, ...]:
    """[section] alone (one instance named DEFAULT_CONFIG_NAME), or [section] merged with each
    [section.configs.NAME], in spec order; `cls` has a `name` field. `check_shared`: the shared keys alone must
    make a valid instance too (a sweep over checkpoints may leave the preset to each configuration)."""
    base = {k: v for k, v in table.items() if k != "configs"}
    configs = as_table(table.get("configs", {}), f"{section}.configs", source)
    if check_shared or not configs:
        shared = build(cls, base, section, source, hidden=("name",))
        if not configs:
            return (shared,)
    result = []
    for name, overrides in configs.items():
        where = config_key(section, name)
        if not _CONFIG_NAME.match(name):
            raise SpecError(f"{source}: configuration name {name!r} ({where}) may use only letters, digits, _ . -")
        config = build(cls, {**base, **as_table(overrides, where, source)}, where, source, hidden=("name",))
        result.append(dataclasses.replace(config, name=name))
    return tuple(result)


def field_type_of(cls: type, rest: Sequence[str], hidden: Sequence[str] = ()) -> Any:
    """The type of field `rest[0]` of `cls` (Any deeper inside a table field), or None when there is none."""
    hints = typing.get_type_hints(cls)
    if len(rest) != 1:
        # Deeper than a field: inside a table such as storage_options, anything goes.
        return Any if rest and hints.get(rest[0]) is not None else None
    return None if rest[0] in hidden else hints.get(rest[0])


def move_keys(raw: Mapping[str, Any], moved: Mapping[tuple[str, str], tuple[str, str]], source: str) -> dict[str, Any]:
    """`raw` with every key of `moved` (old (section, key) -> new) in its new place; SpecError when a spec sets
    both places."""
    result = dict(raw)
    for (old_section, old_key), (section, key) in moved.items():
        old_table = result.get(old_section)
        if isinstance(old_table, Mapping) and old_key in old_table:
            table = result.get(section, {})
            if isinstance(table, Mapping) and key in table:
                raise SpecError(
                    f"{source}: {old_section}.{old_key} is the old place of {section}.{key}; set only {section}.{key}"
                )
            result[old_section] = {k: v for k, v in old_table.items() if k != old_key}
            result[section] = {**(table if isinstance(table, Mapping) else {}), key: old_table[old_key]}
    return result


def moved_assignment(assignment: str, moved: Mapping[tuple[str, str], tuple[str, str]]) -> str:
    """A `--set` assignment with an old key path of `moved` rewritten to the new one."""
    for (old_section, old_key), (section, key) in moved.items():
        if assignment.replace(" ", "").startswith(f"{old_section}.{old_key}="):
            return f"{section}.{key}=" + assignment.split("=", 1)[1]
    return assignment


def convert(value: Any, tp: Any, key: str, source: str) -> Any:
    converted = _try_convert(value, tp)
    if converted is _INVALID:
        raise SpecError(f"{source}: {key} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
    return converted


_INVALID = object()


def _try_convert(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null, so an empty string stands for "unset" in optional keys.
        if type(None) in typing.get_args(tp) and value in (None, ""):
            return None
        for option in typing.get_args(tp):
            converted = _try_convert(value, option)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else _INVALID
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if tp is str:
        return value if isinstance(value, str) else _INVALID
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _INVALID
        items = [_try_convert(item, typing.get_args(tp)[0]) for item in value]
        return _INVALID if any(item is _INVALID for item in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _INVALID
    raise TypeError(f"no conversion for spec type {tp!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "empty"}
    if tp in names:
        return names[tp]
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a table"
    return repr(tp)
