"""The row contract: every input row yields exactly `n` output rows per sampling configuration.

Output columns, in order: id, config, sample_index, completion, finish_reason (stop | length | error),
prompt_tokens, completion_tokens, error (null, or why the row failed), `model` in a sweep over models,
`token_logprobs` and `top_logprobs` where the job asks for log-probabilities, then the carried input columns.
A shard's rows are checked against the contract before its part file is written, and a shard that breaks it
raises (as Ray Data's LLM stages do) instead of publishing a file with a row missing or doubled.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import pyarrow as pa

from batchgen.errors import RowContractError

CONTRACT_COLUMNS = (
    "id",
    "config",
    "sample_index",
    "completion",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
)
FINISH_REASONS = ("stop", "length", "error")


@dataclasses.dataclass(frozen=True)
class OutputRecord:
    """One output row before it becomes Arrow: `row_index` is the input row's position in its shard."""

    row_index: int
    config: str
    sample_index: int
    completion: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # With log-probabilities asked for (sampling.logprobs or a row's override), one entry per generated token:
    # its log-prob, its text, and the top alternatives as (token text, token id, log-prob).
    token_logprobs: tuple[float, ...] | None = None
    tokens: tuple[str, ...] | None = None
    top_logprobs: tuple[tuple[tuple[str, int, float], ...], ...] | None = None

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.row_index, self.config, self.sample_index)


def error_record(row_index: int, config: str, sample_index: int, error: str, prompt_tokens: int = 0) -> OutputRecord:
    """The output row of a sample that could not be generated, saying why."""
    return OutputRecord(row_index, config, sample_index, None, "error", prompt_tokens, 0, error)


TOP_LOGPROB = pa.struct([("token", pa.string()), ("token_id", pa.int32()), ("logprob", pa.float32())])
LOGPROB_FIELDS = (
    pa.field("token_logprobs", pa.list_(pa.float32())),
    pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
)


def output_schema(
    id_type: pa.DataType, carried: Sequence[pa.Field], model_column: bool = False, logprobs: bool = False
) -> pa.Schema:
    """The part files' schema: the contract columns, `model` in a sweep over models, the log-probability
    columns where asked for (only then, so that other jobs' outputs keep their schema), then the carried input
    columns as they are typed."""
    fields = [
        pa.field("id", id_type),
        pa.field("config", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("error", pa.string()),
    ]
    if model_column:
        fields.append(pa.field("model", pa.string(), nullable=False))
    if logprobs:
        fields += LOGPROB_FIELDS
    return pa.schema(fields + list(carried))


def check_exactly_once(
    records: Sequence[OutputRecord],
    num_rows: int,
    samples: Sequence[tuple[str, int]],
    shard_id: str,
    row_n: Sequence[int | None] | None = None,
) -> None:
    """Raise RowContractError unless `records` hold each (row, config, sample) of the shard exactly once.

    `samples` lists (configuration name, n) pairs; the shard has `num_rows` input rows. `row_n`, where given,
    holds each row's own sample count (an OpenAI request's `n`), or None to keep the configuration's.
    """
    counts = collections.Counter(record.key for record in records)

    def samples_of(row: int, n: int) -> int:
        return n if row_n is None or row_n[row] is None else row_n[row]

    expected = {
        (row, name, index) for row in range(num_rows) for name, n in samples for index in range(samples_of(row, n))
    }
    missing = sorted(expected - counts.keys())
    duplicated = sorted(key for key, count in counts.items() if count > 1)
    unexpected = sorted(counts.keys() - expected)
    bad_reasons = sorted({r.finish_reason for r in records} - set(FINISH_REASONS))
    if missing or duplicated or unexpected or bad_reasons:
        raise RowContractError(
            f"shard {shard_id} breaks the row contract: {len(missing)} missing (row, config, sample) "
            f"{missing[:5]}, {len(duplicated)} duplicated {duplicated[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}, unknown finish_reason {bad_reasons}"
        )


def build_table(
    records: Sequence[OutputRecord],
    ids: pa.Array,
    carried: pa.Table,
    schema: pa.Schema,
    config_order: Sequence[str],
    model: str | None = None,
) -> pa.Table:
    """The shard's output table, sorted by (input row, configuration in spec order, sample index).

    `ids` and `carried` hold one entry per input row of the shard; each output row takes its input row's.
    """
    rank = {name: position for position, name in enumerate(config_order)}
    ordered = sorted(records, key=lambda r: (r.row_index, rank[r.config], r.sample_index))
    take = pa.array([r.row_index for r in ordered], pa.int64())
    columns: dict[str, pa.Array] = {
        "id": ids.take(take).cast(schema.field("id").type),
        "config": pa.array([r.config for r in ordered], pa.string()),
        "sample_index": pa.array([r.sample_index for r in ordered], pa.int32()),
        "completion": pa.array([r.completion for r in ordered], pa.string()),
        "finish_reason": pa.array([r.finish_reason for r in ordered], pa.string()),
        "prompt_tokens": pa.array([r.prompt_tokens for r in ordered], pa.int32()),
        "completion_tokens": pa.array([r.completion_tokens for r in ordered], pa.int32()),
        "error": pa.array([r.error for r in ordered], pa.string()),
    }
    if "model" in schema.names and "model" not in carried.column_names:
        columns["model"] = pa.array([model] * len(ordered), pa.string())
    if "token_logprobs" in schema.names:
        columns["token_logprobs"] = pa.array([r.token_logprobs for r in ordered], LOGPROB_FIELDS[0].type)
        columns["top_logprobs"] = pa.array([top_logprob_rows(r) for r in ordered], LOGPROB_FIELDS[1].type)
    for name in carried.column_names:
        columns[name] = carried.column(name).take(take).combine_chunks()
    return pa.Table.from_pydict(columns, schema=schema)


def top_logprob_rows(record: OutputRecord) -> list[list[dict[str, object]]] | None:
    """The record's top alternatives as the `top_logprobs` column holds them: per token, a list of
    {token, token_id, logprob}."""
    if record.top_logprobs is None:
        return None
    return [[{"token": t, "token_id": i, "logprob": lp} for t, i, lp in top] for top in record.top_logprobs]
