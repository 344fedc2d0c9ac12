"""Scoring jobs' rows ([task] kind = "score" or "perplexity"): continuations in, log-likelihoods out.

One output row per input row and model, whose list columns are aligned with the row's continuations:
`logprobs` (sum of log-probabilities of each continuation given the context), `continuation_tokens`,
`is_greedy` (every token of the continuation was the model's argmax), optionally `token_logprobs`, and
`prediction` (the index of the most likely continuation). A "perplexity" row scores its prompt column's text
alone, as one continuation with no context. A row that cannot be scored is an error row with `error` set and
null lists, as for generation: never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

SCORE_COLUMNS = (
    "id", "config", "prediction", "logprobs", "continuation_tokens", "is_greedy", "prompt_tokens", "error",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ScoreRecord:
    """One scored output row before it becomes Arrow: `row_index` is the input row's position in its shard."""

    row_index: int
    config: str
    logprobs: tuple[float, ...] | None
    continuation_tokens: tuple[int, ...] | None
    is_greedy: tuple[bool, ...] | None
    prompt_tokens: int  # the context's tokens (0 for a document)
    error: str | None = None
    token_logprobs: tuple[tuple[float, ...], ...] | None = None
    sample_index: int = 0

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.row_index, self.config, self.sample_index)

    @property
    def finish_reason(self) -> str:
        """As the row contract counts rows: "error", or "stop" (scored in full)."""
        return "error" if self.error is not None else "stop"

    @property
    def completion_tokens(self) -> int:
        """Continuation tokens scored (they are inputs too: a scoring job's throughput counts them as prompt)."""
        return sum(self.continuation_tokens or ())

    @property
    def prediction(self) -> int | None:
        if not self.logprobs:
            return None
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i])


def continuations_of(value: Any, column: str) -> tuple[list[str] | None, str | None]:
    """A row's continuations from `column`: one string or a list of strings; else (None, why)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"continuations column {column!r} holds {value!r:.60}, not a string or a non-empty list of strings"
    if not all(isinstance(item, str) and item for item in value):
        return None, f"continuations column {column!r} holds an empty or non-string continuation: {value!r:.80}"
    return list(value), None


def score_schema(id_type: pa.DataType, carried: Sequence[pa.Field], model_column: bool, per_token: bool) -> pa.Schema:
    fields = [pa.field("id", id_type)]
    if model_column:
        fields.append(pa.field("model", pa.string(), nullable=False))
    fields += [
        pa.field("config", pa.string(), nullable=False),
        pa.field("prediction", pa.int32()),
        pa.field("logprobs", pa.list_(pa.float64())),
        pa.field("continuation_tokens", pa.list_(pa.int32())),
        pa.field("is_greedy", pa.list_(pa.bool_())),
    ]
    if per_token:
        fields.append(pa.field("token_logprobs", pa.list_(pa.list_(pa.float32()))))
    fields += [pa.field("prompt_tokens", pa.int32(), nullable=False), pa.field("error", pa.string())]
    return pa.schema(fields + list(carried))


def build_score_table(
    records: Sequence[ScoreRecord], ids: pa.Array, carried: pa.Table, schema: pa.Schema, model: str
) -> pa.Table:
    """The shard's scored rows, in input order; `ids` and `carried` hold one entry per input row."""
    ordered = sorted(records, key=lambda r: r.row_index)
    take = pa.array([r.row_index for r in ordered], pa.int64())
    columns: dict[str, Any] = {"id": ids.take(take).cast(schema.field("id").type)}
    if "model" in schema.names:
        columns["model"] = pa.array([model] * len(ordered), pa.string())
    columns.update(
        config=pa.array([r.config for r in ordered], pa.string()),
        prediction=pa.array([r.prediction for r in ordered], pa.int32()),
        logprobs=pa.array([r.logprobs for r in ordered], pa.list_(pa.float64())),
        continuation_tokens=pa.array([r.continuation_tokens for r in ordered], pa.list_(pa.int32())),
        is_greedy=pa.array([r.is_greedy for r in ordered], pa.list_(pa.bool_())),
    )
    if "token_logprobs" in schema.names:
        columns["token_logprobs"] = pa.array([r.token_logprobs for r in ordered], pa.list_(pa.list_(pa.float32())))
    columns["prompt_tokens"] = pa.array([r.prompt_tokens for r in ordered], pa.int32())
    columns["error"] = pa.array([r.error for r in ordered], pa.string())
    for name in carried.column_names:
        columns[name] = carried.column(name).take(take).combine_chunks()
    return pa.Table.from_pydict(columns, schema=schema)
