"""A worker: loads the model once, then turns shards into part files, one shard at a time.

`ShardWorker` is a plain class, so a test can run it in-process; the driver runs it as a Ray actor
(`ray.remote(ShardWorker)`), one per replica, each holding its own model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pyarrow as pa

from batchgen.faults import FaultPlan
from batchgen.model_runner import ModelRunner
from batchgen.planning import Shard
from batchgen.prompts import carried_fields, columns_to_read, prompt_rows, row_ids_type
from batchgen.rows import OutputRecord, check_exactly_once, output_schema
from batchgen.shard_io import WRITE_BATCH_ROWS, read_shard, write_shard  # noqa: F401 (WRITE_BATCH_ROWS re-exported)
from batchgen.sink import Sink, part_name
from batchgen.spec import JobSpec


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What a worker reports for a shard it wrote; the driver commits it as the shard's manifest entry."""

    shard_id: str
    index: int
    attempt: int
    file_url: str
    row_start: int
    row_stop: int
    input_rows: int
    output_rows: int
    ok_rows: int
    error_rows: int
    prompt_tokens: int  # of the rows that were generated
    completion_tokens: int
    seconds: float
    worker_pid: int
    part_file: str
    # Of the error rows: prompts that were tokenized (e.g. too long for the context) but never run.
    error_prompt_tokens: int = 0

    def manifest_entry(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ShardWorker:
    """Holds one loaded model; `run_shard` generates a shard and publishes its part file.

    Args:
        spec: the job.
        input_schema: the input's Arrow schema (from planning), which fixes the output schema.
        faults: test-only fault injection (batchgen.faults); empty in real jobs.
        runner: an already loaded model; by default the worker loads `spec.model` itself and warms it up.
    """

    def __init__(
        self, spec: JobSpec, input_schema: pa.Schema, faults: FaultPlan | None = None, runner: ModelRunner | None = None
    ) -> None:
        self.spec = spec
        self.faults = faults or FaultPlan()
        self.columns = columns_to_read(spec, input_schema)
        carried = carried_fields(input_schema, spec.output.carry_columns)
        self.schema = output_schema(row_ids_type(input_schema, spec.input), carried)
        self.sink = Sink(spec.output.url, spec.output.storage_options, spec.output.compression, spec.output.format)
        if runner is None:
            runner = ModelRunner.load(spec.model, spec.execution.max_slots, spec.execution.compilation_cache)
            runner.warm_up(spec.sampling)
        self.runner = runner

    def ready(self) -> int:
        """The worker's process id, once the model is loaded (the driver waits on this before sending work)."""
        return os.getpid()

    def run_shard(self, shard: Shard, attempt: int) -> ShardResult:
        """Read the shard's rows, generate every sample, check the row contract, and publish the part file."""
        started = time.monotonic()
        self.faults.at_shard_start(shard.index, attempt)
        source = read_shard(self.spec, shard, self.columns)
        rows = prompt_rows(source.table if source.table is not None else source.columns, self.spec, shard.first_position, source.row_errors)
        expected = sum(row.samples(config.n) for row in rows for config in self.spec.sampling)
        records: list[OutputRecord] = []
        for record in self.runner.run(rows, self.spec.sampling):
            records.append(record)
            if len(records) == max(expected // 2, 1):
                self.faults.at_shard_middle(shard.index, attempt)
        samples = [(config.name, config.n) for config in self.spec.sampling]
        check_exactly_once(records, len(rows), samples, shard.shard_id, [row.n for row in rows])

        wrap = lambda items: self.faults.wrap_batches(items, shard.index, attempt)  # noqa: E731
        part = write_shard(self.spec, self.sink, shard, source, records, self.schema, wrap)

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
            ok_rows=len(records) - errors,
            error_rows=errors,
            prompt_tokens=sum(r.prompt_tokens for r in records if r.finish_reason != "error"),
            error_prompt_tokens=sum(r.prompt_tokens for r in records if r.finish_reason == "error"),
            completion_tokens=sum(r.completion_tokens for r in records),
            seconds=time.monotonic() - started,
            worker_pid=os.getpid(),
            part_file=part.rsplit("/", 1)[-1] if part else part_name(shard.shard_id, self.sink.suffix),
        )
