"""Progress and summary output: rows, tokens/s and ETA while running; the summary's figures and error rate."""

from __future__ import annotations

import io

from rich.console import Console

from batchgen.driver import DriverReport, FailedShard
from batchgen.inputs import InputFile
from batchgen.planning import Plan, Shard
from batchgen.progress import JobProgress
from batchgen.summary import summarize
from batchgen.manifest import ShardResult
from tests.batch_fixtures import make_spec


def result(index: int, rows: int, tokens: int) -> ShardResult:
    return ShardResult(f"s{index}", index, 1, "file:///in", 0, rows, rows, rows, rows, 0, 10, tokens, 0.1, 1, "p")


def test_progress_shows_rows_tokens_per_second_and_eta():
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    with JobProgress(total_rows=100, done_rows=20, console=console) as bar:
        bar.shard_done(result(0, 30, 600))
        bar._progress.refresh()
    text = console.file.getvalue()
    assert "50/100" in text and "tok/s" in text and "ETA" in text


def test_summary_counts_error_rows_and_failed_shards_against_the_budget():
    spec = make_spec("x", "y", sampling={"n": 2}, execution={"max_error_rate": 0.25})
    shards = tuple(Shard(f"s{i}", i, "file:///in", 4 * i, 4 * i + 4, 4 * i) for i in range(4))
    plan = Plan((InputFile("file:///in", (16,), 0),), None, shards)
    committed = {
        f"s{i}": {"rows_ok": 8 - e, "rows_error": e, "prompt_tokens": 10, "completion_tokens": 20, "output_rows": 8}
        for i, e in ((0, 0), (1, 2), (2, 0))
    }
    report = DriverReport(results=[result(2, 4, 20)], failed=[FailedShard(shards[3], 3, ("a", "b", "c"))], retries=2)
    summary = summarize(spec, plan, committed, 2, report, started=0.0, ended=10.0)
    # 2 error rows + 8 rows of the failed shard, of 32 expected: 10/32 > 0.25, so the job failed.
    assert summary.error_rate == 10 / 32 and summary.exit_code == 1 and summary.status == "failed"
    assert (summary.rows_ok, summary.rows_error, summary.completion_tokens) == (22, 2, 60)
    assert (summary.shards_committed, summary.shards_skipped, summary.shards_failed, summary.shards_retried) == (3, 2, 1, 2)
    assert summary.tokens_per_second == 2.0 and summary.failed_shards[0]["errors"] == ["a", "b", "c"]
    text = summary.render()
    assert "22 ok, 2 error, of 32 expected" in text and "failed shard 3 (s3): c" in text
