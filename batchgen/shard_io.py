"""A shard's rows in, its part file out, whatever the input and output formats.

Input: Parquet (`batchgen.inputs`), JSONL or an OpenAI Batch file (`batchgen.jsonl_input`,
`batchgen.openai_batch`) all become a `ShardInput`: the job's columns as Python lists, plus the rows already
known bad. Output: the shard's checked records become a Parquet part (the row contract's columns), a JSONL
part (one object per output row, the same columns) or an OpenAI Batch output part (one line per request).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from batchgen.errors import InputError
from batchgen.inputs import read_rows
from batchgen.jsonl_input import columns_of, read_objects
from batchgen.openai_batch import output_lines, request_columns
from batchgen.planning import Shard
from batchgen.prompts import row_ids
from batchgen.rows import CONTRACT_COLUMNS, OutputRecord, build_table, top_logprob_rows
from batchgen.spec import JobSpec

# Rows per record batch of a Parquet part file (and per Parquet row group written).
WRITE_BATCH_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class ShardInput:
    """A shard's input rows: columns by name (one value per row), and each row's known error or None."""

    columns: Mapping[str, Sequence[Any]]
    row_errors: Sequence[str | None] | None
    num_rows: int
    table: pa.Table | None = None  # the Arrow rows, for Parquet input

    def ids(self, spec: JobSpec, first_position: int) -> list[Any]:
        """Each row's id: the id column's value, or its input position (prompts.row_ids)."""
        return row_ids(self.columns, spec.input, first_position, self.num_rows)


def read_shard(spec: JobSpec, shard: Shard, columns: Sequence[str]) -> ShardInput:
    """The `columns` of the shard's rows, read as the input format says."""
    storage = spec.input.storage_options
    if spec.input.format == "parquet":
        table = read_rows(shard.file_url, shard.row_start, shard.row_stop, columns, storage)
        return ShardInput({n: table.column(n).to_pylist() for n in table.column_names}, None, table.num_rows, table)
    rows = read_objects(shard.file_url, shard.row_start, shard.row_stop, shard.byte_start, storage)
    if spec.input.format == "openai_batch":
        values, errors = request_columns(rows)
        values.update(columns_of(rows, list(spec.output.carry_columns))[0])
    else:
        values, errors = columns_of(rows, columns)
    return ShardInput(values, errors, len(rows))


def write_shard(
    spec: JobSpec,
    sink: Any,
    shard: Shard,
    source: ShardInput,
    records: Sequence[OutputRecord],
    schema: pa.Schema,
    model: str | None = None,
) -> str:
    """Publish the shard's part file in the output format; returns its URL. `model` is
    the model configuration the shard ran under (a column of its own in a sweep over models)."""
    ids = source.ids(spec, shard.first_position)
    config_order = [config.name for config in spec.sampling]
    if spec.output.format == "openai_batch":
        lines = output_lines(records, ids, spec.model.preset, spec.fingerprint(), int(time.time()))
        return sink.write_lines(shard.shard_id, lines)
    if spec.output.format == "jsonl":
        logprobs = "token_logprobs" in schema.names
        return sink.write_lines(shard.shard_id, _jsonl_rows(records, ids, source, spec, config_order, logprobs))
    id_array = _array(ids, schema.field("id").type, "id")
    carried = pa.table(
        {name: _array(source.columns[name], schema.field(name).type, name) for name in spec.output.carry_columns},
        schema=pa.schema([schema.field(name) for name in spec.output.carry_columns]),
    ) if source.table is None else source.table.select(list(spec.output.carry_columns))
    output = build_table(records, id_array, carried, schema, config_order, model)
    return sink.write_part(shard.shard_id, schema, output.to_batches(max_chunksize=WRITE_BATCH_ROWS))


def _jsonl_rows(
    records: Sequence[OutputRecord],
    ids: Sequence[Any],
    source: ShardInput,
    spec: JobSpec,
    config_order: Sequence[str],
    logprobs: bool = False,
) -> Iterable[str]:
    rank = {name: position for position, name in enumerate(config_order)}
    for r in sorted(records, key=lambda r: (r.row_index, rank[r.config], r.sample_index)):
        values = [ids[r.row_index], r.config, r.sample_index, r.completion, r.finish_reason, r.prompt_tokens,
                  r.completion_tokens, r.error]
        row = dict(zip(CONTRACT_COLUMNS, values))
        if logprobs:  # the Parquet output's columns, under the same names
            row.update(token_logprobs=r.token_logprobs, top_logprobs=top_logprob_rows(r))
        row.update({name: source.columns[name][r.row_index] for name in spec.output.carry_columns})
        yield json.dumps(row, ensure_ascii=False, default=str)


def _array(values: Sequence[Any], type_: pa.DataType, column: str) -> pa.Array:
    """JSONL values as the Arrow type planning inferred; a value that does not fit names the column."""
    try:
        return pa.array(list(values), type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(
            f"column {column!r}: a value does not fit the type {type_} inferred from the first rows ({error}); "
            "write JSONL output (output.format = \"jsonl\") to carry values of mixed types"
        ) from error
