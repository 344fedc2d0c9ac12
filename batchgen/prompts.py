"""Input rows as prompts: which columns a job reads, and what each row asks for.

A row whose prompt cannot be used (null, empty, not a string, malformed chat messages) or whose per-row
override is out of range is not dropped and does not stop the shard: it becomes a `PromptRow` with `error`
set, and later one error output row per sample.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from batchgen.errors import InputError
from batchgen.spec import InputSpec, JobSpec

# Per-row overrides: a column of this name, where the input has one, replaces the sampling value for its row
# (a null keeps the spec's value).
OVERRIDE_COLUMNS: dict[str, str] = {"max_new_tokens": "integer", "temperature": "number", "seed": "integer"}


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One input row: its position in the shard, its id, its prompt (text or chat messages) and overrides."""

    index: int
    row_id: int | str | None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    error: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None


def prompt_column(spec: InputSpec) -> str:
    """The column that holds the prompts: the prompt column or the messages column."""
    column = spec.prompt_column or spec.messages_column
    assert column is not None  # parse_spec fills prompt_column when neither is set
    return column


def columns_to_read(spec: JobSpec, schema: pa.Schema) -> list[str]:
    """The input columns a worker reads: prompt, id, per-row overrides present in `schema`, carried columns."""
    wanted = [prompt_column(spec.input)]
    if spec.input.id_column:
        wanted.append(spec.input.id_column)
    wanted += [name for name in OVERRIDE_COLUMNS if name in schema.names]
    wanted += list(spec.output.carry_columns)
    return list(dict.fromkeys(wanted))


def check_schema(schema: pa.Schema, spec: JobSpec, url: str) -> list[str]:
    """Raise InputError if the file at `url` lacks a column the spec needs; return warnings about it.

    A prompt column of the wrong type is only a warning: its rows become error rows, per the row contract.
    """
    names = schema.names
    column = prompt_column(spec.input)
    key = "input.prompt_column" if spec.input.prompt_column else "input.messages_column"
    needed = [(key, column)]
    if spec.input.id_column:
        needed.append(("input.id_column", spec.input.id_column))
    needed += [("output.carry_columns", c) for c in spec.output.carry_columns]
    for where, name in needed:
        if name not in names:
            raise InputError(f"{url}: {where} names column {name!r}, which the file does not have (it has {names})")
    if spec.input.id_column:
        id_type = schema.field(spec.input.id_column).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise InputError(f"{url}: id column {spec.input.id_column!r} must be integers or strings, not {id_type}")
    for name, kind in OVERRIDE_COLUMNS.items():
        if name in names:
            type_ = schema.field(name).type
            ok = pa.types.is_integer(type_) or (kind == "number" and pa.types.is_floating(type_))
            if not ok:
                raise InputError(f"{url}: per-row override column {name!r} must hold {kind}s, not {type_}")
    warnings = []
    type_ = schema.field(column).type
    if spec.input.prompt_column and not (pa.types.is_string(type_) or pa.types.is_large_string(type_)):
        warnings.append(f"{url}: prompt column {column!r} is {type_}, not strings: every row will be an error row")
    if spec.input.messages_column and not _is_messages_type(type_):
        warnings.append(
            f"{url}: messages column {column!r} is {type_}, not a list of {{role, content}}: "
            "rows that are not such lists will be error rows"
        )
    return warnings


def prompt_rows(table: pa.Table, spec: JobSpec, first_position: int) -> list[PromptRow]:
    """One PromptRow per row of `table` (a shard's rows; `first_position` is its first row's input position)."""
    input = spec.input
    prompts = table.column(prompt_column(input)).to_pylist()
    if input.id_column:
        ids: list[Any] = table.column(input.id_column).to_pylist()
    else:
        ids = list(range(first_position, first_position + table.num_rows))
    overrides = {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        for name in OVERRIDE_COLUMNS
    }
    rows = []
    for index, (row_id, prompt) in enumerate(zip(ids, prompts)):
        values = {name: overrides[name][index] for name in OVERRIDE_COLUMNS}
        if input.messages_column:
            messages, error = _messages(prompt, input.messages_column)
            text = None
        else:
            text, error = _text(prompt, input.prompt_column or "prompt")
            messages = [{"role": "user", "content": text}] if input.apply_chat_template and text else None
            text = None if messages else text
        error = error or _check_overrides(values)
        if row_id is None:
            error = f"the id column {input.id_column!r} is null"
        if error:
            rows.append(PromptRow(index, row_id, error=error))
        else:
            rows.append(PromptRow(index, row_id, text=text, messages=messages, **values))
    return rows


def _text(value: Any, column: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, f"prompt column {column!r} is null"
    if not isinstance(value, str):
        return None, f"prompt column {column!r} holds {type(value).__name__} {value!r:.60}, not a string"
    if not value.strip():
        return None, f"prompt column {column!r} is empty"
    return value, None


def _messages(value: Any, column: str) -> tuple[list[dict[str, str]] | None, str | None]:
    if value is None:
        return None, f"messages column {column!r} is null"
    if not isinstance(value, (list, tuple)):
        return None, f"messages column {column!r} holds {type(value).__name__}, not a list of {{role, content}}"
    if not value:
        return None, f"messages column {column!r} is an empty list"
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            return None, f"messages[{position}] is {type(message).__name__}, not a {{role, content}} table"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return None, f"messages[{position}] has no role (got {role!r})"
        if not isinstance(content, str):
            return None, f"messages[{position}] ({role}) has no string content (got {content!r:.60})"
        messages.append({"role": role, "content": content})
    return messages, None


def _check_overrides(values: dict[str, Any]) -> str | None:
    max_new_tokens, temperature, seed = values["max_new_tokens"], values["temperature"], values["seed"]
    if max_new_tokens is not None and max_new_tokens < 1:
        return f"per-row max_new_tokens must be >= 1, got {max_new_tokens}"
    if temperature is not None and (math.isnan(temperature) or temperature < 0):
        return f"per-row temperature must be >= 0, got {temperature}"
    if seed is not None and seed < 0:
        return f"per-row seed must be >= 0, got {seed}"
    return None


def _is_messages_type(type_: pa.DataType) -> bool:
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)):
        return False
    item = type_.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}


def row_ids_type(schema: pa.Schema, spec: InputSpec) -> pa.DataType:
    """The type of the output `id` column: the id column's, or int64 positions when there is none."""
    if not spec.id_column:
        return pa.int64()
    type_ = schema.field(spec.id_column).type
    return pa.string() if pa.types.is_large_string(type_) else type_


def carried_fields(schema: pa.Schema, columns: Sequence[str]) -> list[pa.Field]:
    """The fields of the carried input columns, as typed in `schema`."""
    return [schema.field(name) for name in columns]
