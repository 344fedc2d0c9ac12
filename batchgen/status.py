"""`batchgen status OUTPUT`: how far a job's output is, read from the output location alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from batchgen import metrics as metric_sums
from batchgen.manifest import ShardResult
from batchgen.sink import Sink


@dataclasses.dataclass(frozen=True)
class OutputStatus:
    """Shards done / pending / failed, rows and tokens of the job writing at `url`.

    `failed` lists the shards the last finished run reported as failed that are still not committed;
    `status` is "succeeded", "failed" (the last run ended over its error budget), "incomplete" (running,
    killed, or not run to the end) or "empty" (no job here).
    """

    url: str
    status: str
    fingerprint: str | None
    spec_source: str | None
    shards_total: int
    shards_committed: int
    shards_pending: int
    shards_failed: int
    rows_ok: int
    rows_error: int
    prompt_tokens: int  # of generated rows
    completion_tokens: int
    error_prompt_tokens: int = 0  # of error rows: tokenized, never run
    failed: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # over the committed shards

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        if self.status == "empty":
            return f"{self.url}: no batchgen job here"
        lines = [
            f"{self.url}: {self.status} (job {self.fingerprint} from {self.spec_source})",
            f"  shards  {self.shards_committed} done, {self.shards_pending} pending, {self.shards_failed} failed, "
            f"of {self.shards_total}",
            f"  rows    {self.rows_ok} ok, {self.rows_error} error",
            f"  tokens  {self.prompt_tokens} prompt, {self.completion_tokens} generated; "
            f"{self.error_prompt_tokens} prompt tokens in error rows, not run",
        ]
        lines += metric_sums.render(self.metrics)
        lines += [f"  failed shard {f['index']} ({f['shard_id']}): {f['errors'][-1]}" for f in self.failed]
        return "\n".join(lines)


def read_status(url: str, storage_options: Mapping[str, Any] | None = None) -> OutputStatus:
    """The status of the job output at `url` (any fsspec URL)."""
    sink = Sink(url, storage_options)
    job = sink.read_job()
    if job is None:
        return OutputStatus(url, "empty", None, None, 0, 0, 0, 0, 0, 0, 0, 0)
    # Part files are named by the job's output format (.parquet or .jsonl[.gz]); its spec says which.
    output = job.get("spec", {}).get("output", {})
    sink = Sink(url, storage_options, output.get("compression", "zstd"), output.get("format", "parquet"))
    planned = [shard["shard_id"] for shard in job["shards"]]
    committed = sink.committed()
    entries = [ShardResult.from_entry(committed[shard_id]) for shard_id in planned if shard_id in committed]
    summary = sink.read_summary() or {}
    reported = summary.get("failed_shards", ())
    failed = tuple(f for f in reported if f["shard_id"] in planned and f["shard_id"] not in committed)
    if sink.succeeded():
        status = "succeeded"
    elif (
        summary.get("fingerprint") == job["fingerprint"]
        and summary.get("status") == "failed"
        and len(entries) + len(failed) == len(planned)
    ):
        status = "failed"
    else:
        status = "incomplete"
    return OutputStatus(
        url=url,
        status=status,
        fingerprint=job["fingerprint"],
        spec_source=job.get("spec_source"),
        shards_total=len(planned),
        shards_committed=len(entries),
        shards_pending=len(planned) - len(entries) - len(failed),
        shards_failed=len(failed),
        rows_ok=sum(e.rows_ok for e in entries),
        rows_error=sum(e.rows_error for e in entries),
        prompt_tokens=sum(e.prompt_tokens for e in entries),
        completion_tokens=sum(e.completion_tokens for e in entries),
        error_prompt_tokens=sum(e.error_prompt_tokens for e in entries),
        failed=failed,
        metrics=metric_sums.merge(e.metrics for e in entries),
    )
