"""Input rows as prompts: which columns a job reads, and what each row asks for.

A row whose prompt cannot be used (null, empty, not a string, malformed chat messages) or whose per-row
override is out of range is not dropped and does not stop the shard: it becomes a `PromptRow` with `error`
set, and later one error output row per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from batchgen.errors import InputError
from batchgen.row_sampling import OVERRIDE_COLUMNS, check_row_overrides
from batchgen.spec import InputSpec, JobSpec

# Override columns whose Parquet type is checked up front (the others are checked per value, row by row).
_SCALAR_KINDS = ("integer", "number")
# A column of per-row sample counts; only OpenAI Batch requests (their `n`) fill it.
N_COLUMN = "n"


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One input row: its position in the shard, its id, its prompt (text or chat messages) and overrides.

    `overrides` holds the row's checked, non-null per-row sampling values (batchgen.row_sampling); `n`, when
    set, replaces every configuration's samples per prompt for this row.
    """

    index: int
    row_id: int | str | None
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    error: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    n: int | None = None

    def samples(self, configured_n: int) -> int:
        """How many samples this row gets under a configuration of `configured_n`."""
        return configured_n if self.n is None else self.n


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
    # JSONL's schema comes from its first rows only: a key that appears later must still be read.
    wanted += [name for name in OVERRIDE_COLUMNS if name in schema.names or spec.input.format != "parquet"]
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
        if name in names and kind in _SCALAR_KINDS:
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


def prompt_rows(
    table: pa.Table | Mapping[str, Sequence[Any]],
    spec: JobSpec,
    first_position: int,
    row_errors: Sequence[str | None] | None = None,
) -> list[PromptRow]:
    """One PromptRow per row of `table` (a shard's rows; `first_position` is its first row's input position).

    `table` is an Arrow table or its columns as Python lists (JSONL input). `row_errors` marks rows already
    known bad (a line that is not JSON, a malformed OpenAI request): they become error rows with that reason.
    """
    input = spec.input
    columns = _pylists(table)
    num_rows = len(columns[prompt_column(input)])
    prompts = columns[prompt_column(input)]
    ids = row_ids(columns, input, first_position, num_rows)
    names = list(OVERRIDE_COLUMNS) + ([N_COLUMN] if input.format == "openai_batch" else [])
    overrides = {name: columns[name] for name in names if name in columns}
    rows = []
    for index, (row_id, prompt) in enumerate(zip(ids, prompts)):
        if row_errors is not None and row_errors[index] is not None:
            rows.append(PromptRow(index, row_id, error=row_errors[index]))
            continue
        values, override_error = check_row_overrides({name: v[index] for name, v in overrides.items()}, row_id)
        if input.messages_column:
            messages, error = _messages(prompt, input.messages_column)
            text = None
        else:
            text, error = _text(prompt, input.prompt_column or "prompt")
            messages = [{"role": "user", "content": text}] if input.apply_chat_template and text else None
            text = None if messages else text
        if messages and input.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": input.system_prompt}, *messages]
        error = error or override_error
        if row_id is None:
            error = f"the id column {input.id_column!r} is null"
        if error:
            rows.append(PromptRow(index, row_id, error=error))
        else:
            n = values.pop(N_COLUMN, None)
            rows.append(PromptRow(index, row_id, text=text, messages=messages, overrides=values, n=n))
    return rows


def _pylists(table: pa.Table | Mapping[str, Sequence[Any]]) -> Mapping[str, Sequence[Any]]:
    if isinstance(table, pa.Table):
        return {name: table.column(name).to_pylist() for name in table.column_names}
    return table


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


def _is_messages_type(type_: pa.DataType) -> bool:
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)):
        return False
    item = type_.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}


def row_ids(columns: Mapping[str, Sequence[Any]], spec: InputSpec, first_position: int, num_rows: int) -> list[Any]:
    """The ids of a shard's rows (`first_position`: its first row's input position): the id column's values, or
    the rows' positions in the input when there is none. A row's seed and its output `id` both come from here."""
    if spec.id_column:
        return list(columns[spec.id_column])
    return list(range(first_position, first_position + num_rows))


def row_ids_type(schema: pa.Schema, spec: InputSpec) -> pa.DataType:
    """The type of the output `id` column: the id column's, or int64 positions when there is none."""
    if not spec.id_column:
        return pa.int64()
    type_ = schema.field(spec.id_column).type
    return pa.string() if pa.types.is_large_string(type_) else type_


def carried_fields(schema: pa.Schema, columns: Sequence[str]) -> list[pa.Field]:
    """The fields of the carried input columns, as typed in `schema`."""
    return [schema.field(name) for name in columns]
