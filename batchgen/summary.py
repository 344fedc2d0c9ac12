"""The job summary: printed at the end of `batchgen run` and written to `_summary.json`.

Row and token counts cover the whole output (`prompt_tokens` counts the prompts of generated rows only; the
prompts of error rows, which were tokenized but never run, are `error_prompt_tokens`) (shards committed by earlier runs included); throughput and
wall time cover this run, which is also given without its start-up (until the first worker had loaded and
compiled its model). The error rate is the share of expected output rows that are error rows or belong
to failed shards; the job succeeds when it is at most `execution.max_error_rate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from batchgen import metrics as metric_sums
from batchgen.driver import DriverReport
from batchgen.errors import EXIT_JOB_FAILED, EXIT_OK
from batchgen.manifest import ShardResult
from batchgen.planning import Plan
from batchgen.spec import JobSpec


@dataclasses.dataclass(frozen=True)
class JobSummary:
    """Counts and figures of a job run; `exit_code` is what `batchgen run` exits with."""

    status: str  # "succeeded" | "failed"
    exit_code: int
    output_url: str
    fingerprint: str
    input_rows: int
    expected_rows: int
    rows_ok: int
    rows_error: int
    prompt_tokens: int
    error_prompt_tokens: int
    completion_tokens: int
    shards_total: int
    shards_committed: int
    shards_skipped: int
    shards_run: int
    shards_failed: int
    shards_retried: int
    workers_replaced: int
    error_rate: float
    max_error_rate: float
    wall_seconds: float
    startup_seconds: float
    run_completion_tokens: int
    tokens_per_second: float
    generation_tokens_per_second: float
    failed_shards: tuple[dict[str, Any], ...] = ()
    task: str = "generate"
    run_prompt_tokens: int = 0
    prompt_tokens_per_second: float = 0.0  # this run's, after start-up: a scoring job's throughput
    # {"model/config": {"metric", "value", "count"}} over every committed shard (batchgen/metrics.py).
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Of prompt_tokens: those the model computed. Prompt tokens already in a worker's KV cache within a shard (the
    # n samples of a row, a shared system prompt's full pages) are copied, not computed (model.generation.prefix_cache).
    prompt_tokens_computed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        """A short human-readable table."""
        lines = [
            f"job {self.status} (exit {self.exit_code}) -> {self.output_url}",
            f"  rows        {self.rows_ok} ok, {self.rows_error} error, of {self.expected_rows} expected "
            f"({self.input_rows} input rows)",
            f"  tokens      {self.prompt_tokens} prompt ({self.prompt_tokens_computed} computed, the rest shared), "
            f"{self.completion_tokens} generated; {self.error_prompt_tokens} prompt tokens in error rows, not run",
            f"  throughput  {self.tokens_per_second:.1f} generated tokens/s over {self.wall_seconds:.1f} s wall "
            f"({self.run_completion_tokens} tokens this run); {self.generation_tokens_per_second:.1f} tokens/s "
            f"after {self.startup_seconds:.1f} s of start-up (Ray, model load, compilation)",
            f"  shards      {self.shards_committed}/{self.shards_total} committed ({self.shards_skipped} from "
            f"earlier runs), {self.shards_failed} failed, {self.shards_retried} retries, "
            f"{self.workers_replaced} workers replaced",
            f"  error rate  {self.error_rate:.4f} (budget {self.max_error_rate:.4f})",
        ]
        if self.task != "generate":
            lines[3] = (
                f"  throughput  {self.prompt_tokens_per_second:.1f} prompt tokens/s scored after "
                f"{self.startup_seconds:.1f} s of start-up ({self.run_prompt_tokens} tokens this run, "
                f"{self.wall_seconds:.1f} s wall)"
            )
        lines += metric_sums.render(self.metrics)
        for failed in self.failed_shards:
            lines.append(f"  failed shard {failed['index']} ({failed['shard_id']}): {failed['errors'][-1]}")
        return "\n".join(lines)


def summarize(
    spec: JobSpec,
    plan: Plan,
    committed: Mapping[str, Mapping[str, Any]],
    skipped: int,
    report: DriverReport,
    started: float,
    ended: float,
) -> JobSummary:
    """The summary of a run, from the committed manifest entries of the plan and this run's driver report.

    `started` and `ended` are the run's `time.monotonic()` bounds.
    """
    done = {s.shard_id for s in plan.shards if s.shard_id in committed}
    entries = [ShardResult.from_entry(committed[s.shard_id]) for s in plan.shards if s.shard_id in done]
    # Committed shards say how many rows they wrote (OpenAI requests choose their own n); the rest are estimated.
    pending_rows = sum(s.num_rows for s in plan.shards if s.shard_id not in done)
    expected = sum(e.output_rows for e in entries) + pending_rows * spec.outputs_per_row
    rows_error = sum(e.rows_error for e in entries)
    failed_rows = sum(f.shard.num_rows for f in report.failed) * spec.outputs_per_model  # a shard: one model
    error_rate = (rows_error + failed_rows) / expected if expected else 0.0
    ok = error_rate <= spec.execution.max_error_rate
    run_tokens = sum(r.completion_tokens for r in report.results)
    run_prompt_tokens = sum(r.prompt_tokens for r in report.results)
    wall_seconds = ended - started
    startup_seconds = (report.first_ready - started) if report.first_ready is not None else 0.0
    generating_seconds = wall_seconds - startup_seconds
    return JobSummary(
        status="succeeded" if ok else "failed",
        exit_code=EXIT_OK if ok else EXIT_JOB_FAILED,
        output_url=spec.output.url,
        fingerprint=spec.fingerprint(),
        input_rows=plan.total_rows,
        expected_rows=expected,
        rows_ok=sum(e.rows_ok for e in entries),
        rows_error=rows_error,
        prompt_tokens=sum(e.prompt_tokens for e in entries),
        # Shards committed before this counter existed have none (their prompt_tokens include error rows).
        error_prompt_tokens=sum(e.error_prompt_tokens for e in entries),
        completion_tokens=sum(e.completion_tokens for e in entries),
        shards_total=len(plan.shards),
        shards_committed=len(entries),
        shards_skipped=skipped,
        shards_run=len(report.results),
        shards_failed=len(report.failed),
        shards_retried=report.retries,
        workers_replaced=report.workers_replaced,
        error_rate=error_rate,
        max_error_rate=spec.execution.max_error_rate,
        wall_seconds=wall_seconds,
        startup_seconds=startup_seconds,
        run_completion_tokens=run_tokens,
        tokens_per_second=run_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        generation_tokens_per_second=run_tokens / generating_seconds if generating_seconds > 0 else 0.0,
        failed_shards=tuple(
            {
                "shard_id": f.shard.shard_id,
                "index": f.shard.index,
                "file_url": f.shard.file_url,
                "row_start": f.shard.row_start,
                "row_stop": f.shard.row_stop,
                "attempts": f.attempts,
                "errors": list(f.errors),
            }
            for f in report.failed
        ),
        task=spec.task.kind,
        run_prompt_tokens=run_prompt_tokens,
        prompt_tokens_per_second=run_prompt_tokens / generating_seconds if generating_seconds > 0 else 0.0,
        metrics=metric_sums.merge(e.metrics for e in entries),
        prompt_tokens_computed=sum(e.computed_prompt_tokens for e in entries),
    )
