"""A worker: loads the model once, then turns shards into part files, one shard at a time.

`ShardWorker` is a plain class, so a test can run it in-process; the driver runs it as a Ray actor
(`ray.remote(ShardWorker)`), one per replica, each holding its own model.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Any

import pyarrow as pa

from batchgen import metrics
from batchgen.manifest import ShardResult
from batchgen.model_runner import ModelRunner
from batchgen.planning import Shard
from batchgen.prompts import carried_fields, columns_to_read, prompt_rows, row_ids_type
from batchgen.rows import OutputRecord, check_exactly_once, output_schema
from batchgen.score_rows import build_score_table, continuations_of, score_schema
from batchgen.shard_io import WRITE_BATCH_ROWS, read_shard, write_shard  # noqa: F401 (WRITE_BATCH_ROWS re-exported)
from batchgen.sink import Sink, part_name
from batchgen.spec import JobSpec


class ShardWorker:
    """Holds one loaded model; `run_shard` generates a shard and publishes its part file.

    Args:
        spec: the job.
        input_schema: the input's Arrow schema (from planning), which fixes the output schema.
        runner: an already loaded model; by default the worker loads `spec.model` itself and warms it up.
    """

    def __init__(self, spec: JobSpec, input_schema: pa.Schema, runner: ModelRunner | None = None) -> None:
        self.spec = spec
        task = spec.task
        self.columns = columns_to_read(spec, input_schema)
        self.columns += [c for c in (task.continuations_column, task.reference_column) if c and c not in self.columns]
        carried = carried_fields(input_schema, spec.output.carry_columns)
        id_type = row_ids_type(input_schema, spec.input)
        if task.kind == "generate":
            self.logprobs = logprob_columns(spec, input_schema)
            self.schema = output_schema(id_type, carried, model_column=spec.model_sweep, logprobs=self.logprobs)
        else:
            self.schema = score_schema(id_type, carried, spec.model_sweep, task.per_token_logprobs)
        self.sink = Sink.for_output(spec.output)
        self.model_name = spec.models[0].name
        self.runner = runner if runner is not None else self._load(spec.models[0])

    def _load(self, model: Any) -> ModelRunner:
        runner = ModelRunner.load(model, model.max_slots, self.spec.execution.compilation_cache)
        if self.spec.task.kind == "generate":
            runner.warm_up(self.spec.sampling)
        return runner

    def _hold(self, name: str) -> None:
        """Hold the model `name` (a sweep's [model.configs.NAME]), dropping the one held before: one at a time."""
        if name != self.model_name:
            self.runner = None  # type: ignore[assignment]  # the old weights and cache go before the new load
            gc.collect()
            self.runner = self._load(self.spec.model_named(name))
            self.model_name = name

    def ready(self) -> int:
        """The worker's process id, once the model is loaded (the driver waits on this before sending work)."""
        return os.getpid()

    def run_shard(self, shard: Shard, attempt: int) -> ShardResult:
        """Read the shard's rows, generate every sample, check the row contract, and publish the part file."""
        started = time.monotonic()
        self._hold(shard.model)
        source = read_shard(self.spec, shard, self.columns)
        table = source.table  # None for JSONL input (scoring jobs read Parquet only: the spec checks it)
        rows = prompt_rows(table if table is not None else source.columns, self.spec, shard.first_position, source.row_errors)
        generate = self.spec.task.kind == "generate"
        if generate and not self.logprobs:
            rows = [_without_logprob_columns(row) for row in rows]
        computed_before = self.runner.prompt_tokens_computed
        records: list[Any] = list(self._records(rows, table))
        if generate:
            samples = [(config.name, config.n) for config in self.spec.sampling]
            check_exactly_once(records, len(rows), samples, shard.shard_id, [row.n for row in rows])
        else:
            check_exactly_once(records, len(rows), [(self.spec.sampling[0].name, 1)], shard.shard_id)

        if generate:
            part = write_shard(self.spec, self.sink, shard, source, records, self.schema, shard.model)
        else:
            ids = pa.array(source.ids(self.spec, shard.first_position), self.schema.field("id").type)
            carried = table.select(list(self.spec.output.carry_columns))
            output = build_score_table(records, ids, carried, self.schema, shard.model)
            part = self.sink.write_part(shard.shard_id, self.schema, output.to_batches(max_chunksize=WRITE_BATCH_ROWS))

        errors = sum(1 for r in records if r.finish_reason == "error")
        return ShardResult(
            shard_id=shard.shard_id,
            index=shard.index,
            attempt=attempt,
            file_url=shard.file_url,
            row_start=shard.row_start,
            row_stop=shard.row_stop,
            input_rows=len(rows),
            output_rows=len(records),
            rows_ok=len(records) - errors,
            rows_error=errors,
            # Scoring: every token run through the model is a prompt token (a context once per continuation).
            prompt_tokens=sum(_input_tokens(r) for r in records if r.finish_reason != "error"),
            error_prompt_tokens=sum(r.prompt_tokens for r in records if r.finish_reason == "error"),
            completion_tokens=0 if self.spec.task.kind != "generate" else sum(r.completion_tokens for r in records),
            seconds=time.monotonic() - started,
            worker_pid=os.getpid(),
            part_file=part.rsplit("/", 1)[-1] if part else part_name(shard.shard_id, self.sink.suffix),
            model=shard.model,
            metrics=self._metrics(records, table, shard.model),
            prompt_tokens_computed=self.runner.prompt_tokens_computed - computed_before if generate else None,
        )

    def _records(self, rows: list[Any], table: pa.Table) -> Any:
        """The shard's output records: generated completions, or scored continuations / documents."""
        task = self.spec.task
        if task.kind == "generate":
            return self.runner.run(rows, self.spec.sampling)
        if task.kind == "perplexity":
            conts: list[Any] = [None] * len(rows)
            errors: list[Any] = [None] * len(rows)
        else:
            assert task.continuations_column is not None  # the spec requires it for "score"
            cells = [continuations_of(v, task.continuations_column) for v in table.column(task.continuations_column).to_pylist()]
            conts, errors = [c for c, _ in cells], [e for _, e in cells]
        return self.runner.score(rows, conts, errors, self.spec.sampling[0].name, task.per_token_logprobs)

    def _metrics(self, records: list[Any], table: pa.Table, model: str) -> dict[str, Any]:
        """This shard's sums of the job's metric, per (model, configuration); {} without a metric."""
        task = self.spec.task
        if task.metric == "none":
            return {}
        sums = metrics.MetricSums(task.metric)
        references = table.column(task.reference_column).to_pylist() if task.reference_column else None
        continuations = (
            table.column(task.continuations_column).to_pylist() if task.continuations_column else None
        )
        for record in records:
            key = metrics.metric_key(model, record.config)
            if task.metric == "exact_match":
                value = metrics.exact_match(record.completion, references[record.row_index])
            elif task.metric == "accuracy":
                conts = continuations[record.row_index]
                conts = [conts] if isinstance(conts, str) else list(conts or [])
                value = metrics.accuracy(record.logprobs, references[record.row_index], conts)
            else:  # mean_loglikelihood, perplexity: per token, over every scored continuation
                if record.logprobs is not None:
                    sums.add(key, sum(record.logprobs), sum(record.continuation_tokens))
                continue
            if value is not None:
                sums.add(key, value)
        return sums.to_dict()


def logprob_columns(spec: JobSpec, input_schema: pa.Schema) -> bool:
    """Whether a generation job's output has the log-probability columns: where a sampling configuration asks
    for them, or a Parquet input has the per-row `logprobs` column (JSONL's schema comes from its first rows
    only, so it cannot promise the columns; an OpenAI Batch output has a place for them in every line)."""
    if any(config.logprobs for config in spec.sampling) or spec.output.format == "openai_batch":
        return True
    return spec.input.format == "parquet" and "logprobs" in input_schema.names


def _without_logprob_columns(row: Any) -> Any:
    """A row that asks for log-probabilities where the output has no columns for them becomes an error row."""
    if row.overrides.get("logprobs") is None:
        return row
    return dataclasses.replace(row, error=(
        f"row {row.row_id!r}: column 'logprobs' asks for log-probabilities, but this job's output has no columns "
        "for them: set sampling.logprobs (or read Parquet input with a logprobs column)"
    ), overrides={})


def _input_tokens(record: Any) -> int:
    if isinstance(record, OutputRecord):
        return record.prompt_tokens
    return record.prompt_tokens * len(record.logprobs or ()) + record.completion_tokens
