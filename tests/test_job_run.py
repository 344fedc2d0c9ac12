"""A whole job through `batchgen run` on a shared local Ray and a tiny model: sweep, samples, bad rows, resume,
the error budget, conflicts and --overwrite, status."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.sink import Sink
from tests.batch_fixtures import TEST_XLA_CACHE, ray_local, tiny_preset, write_prompts  # noqa: F401

pytestmark = pytest.mark.slow

PROMPTS = ["Hello", None, "Tell me a story", "", "x" * 400, "What is 2 + 2?", "Why?", "Name a color"]


def write_job(tmp_path, preset: str) -> str:
    data = write_prompts(
        tmp_path / "in.parquet", PROMPTS, ids=[f"q{i}" for i in range(8)], row_group_size=3,
        extra={"topic": [f"t{i}" for i in range(8)]},
    )
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[model]
preset = "{preset}"
max_length = 64
max_slots = 8

[input]
url = "{data}"
id_column = "id"

[sampling]
sampler = "random"
max_new_tokens = 4
seed = 3

[sampling.configs.greedy]
sampler = "greedy"

[sampling.configs.hot]
temperature = 1.4
n = 2

[output]
url = "{tmp_path / "out"}"
carry_columns = ["topic"]

[execution]
replicas = 2
rows_per_shard = 3
compilation_cache = "{TEST_XLA_CACHE}"
"""
    )
    return str(job)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_a_sweep_job_runs_resumes_and_answers_to_its_error_budget(tmp_path, ray_local, tiny_preset):
    job = write_job(tmp_path, tiny_preset)
    out = str(tmp_path / "out")

    # 3 bad rows of 8 are error rows: over the default budget of 0, so the job fails (exit 1)...
    first = invoke("run", job, "--json")
    assert first.exit_code == 1, first.output
    summary = json.loads(first.output)
    assert summary["status"] == "failed" and summary["shards_committed"] == 3 == summary["shards_total"]
    assert summary["rows_error"] == 3 * 3 and summary["rows_ok"] == 5 * 3 and summary["expected_rows"] == 24
    assert summary["error_rate"] == pytest.approx(9 / 24)
    assert not Sink(out).succeeded()

    # ...and a rerun with a budget that fits succeeds without generating anything again.
    second = invoke("run", job, "--set", "execution.max_error_rate=0.5")
    assert second.exit_code == 0, second.output
    assert "3/3 committed (3 from earlier runs)" in second.output
    assert Sink(out).succeeded()

    table = pq.read_table(out)  # what a user reads: the directory, `_` files skipped
    assert table.num_rows == 8 * 3
    keys = sorted(zip(table["id"].to_pylist(), table["config"].to_pylist(), table["sample_index"].to_pylist()))
    assert keys == sorted((f"q{i}", c, s) for i in range(8) for c, n in (("greedy", 1), ("hot", 2)) for s in range(n))
    by_id = {}
    for row in table.to_pylist():
        by_id.setdefault(row["id"], []).append(row)
    assert all(row["topic"] == f"t{int(i[1:])}" for i, rows in by_id.items() for row in rows)
    assert all(row["finish_reason"] == "error" for i in ("q1", "q3", "q4") for row in by_id[i])
    assert all(row["finish_reason"] in ("stop", "length") for i in ("q0", "q2", "q5") for row in by_id[i])

    status = invoke("status", out, "--json")
    assert status.exit_code == 0
    assert json.loads(status.output)["shards_committed"] == 3 and json.loads(status.output)["rows_error"] == 9

    # A changed spec is another job: refused (exit 2) unless --overwrite.
    changed = invoke("run", job, "--set", "sampling.seed=4", "--set", "execution.max_error_rate=0.5")
    assert changed.exit_code == 2 and "holds another job" in changed.output
    overwritten = invoke("run", job, "--set", "sampling.seed=4", "--set", "execution.max_error_rate=0.5", "--overwrite")
    assert overwritten.exit_code == 0 and "0 from earlier runs" in overwritten.output
    greedy_before = {r["id"]: r["completion"] for r in table.to_pylist() if r["config"] == "greedy"}
    greedy_after = {r["id"]: r["completion"] for r in Sink(out).read_output().to_pylist() if r["config"] == "greedy"}
    assert greedy_before == greedy_after  # greedy does not depend on the seed


def test_a_worker_that_cannot_load_the_model_ends_the_job_with_exit_1(tmp_path, ray_local):
    job = write_job(tmp_path, str(tmp_path))  # a directory, but no checkpoint in it
    result = invoke("run", job, "--set", "execution.max_attempts=2", "--set", "execution.replicas=1")
    assert result.exit_code == 1
    assert "workers failed to start 2 times in a row" in result.output
