"""Faults, each one a test: on a shared local Ray, real worker actors on a tiny model, faults injected at real
points of the worker's work (batchgen.faults: `run_job(spec, faults=...)`, or `python -m tests.run_with_faults` for a job in a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from batchgen.faults import FaultPlan
from batchgen.job import run_job
from batchgen.sink import Sink
from batchgen.spec import JobSpec
from tests.batch_fixtures import TEST_XLA_CACHE, make_spec, ray_local, s3_server, tiny_preset, write_prompts  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m tests.run_with_faults` runs from it

pytestmark = pytest.mark.slow

ROWS = 12
N = 2


def spec_for(tmp_path: Path, preset: str, input_url: str | None = None, **sections) -> JobSpec:
    if input_url is None:
        input_url = write_prompts(tmp_path / "in.parquet", [f"prompt number {i}" for i in range(ROWS)], ids=range(ROWS))
    sections.setdefault("sampling", {"n": N, "sampler": "random", "seed": 5})
    return make_spec(input_url, str(tmp_path / "out"), preset=preset, **sections)


def faults(*items: dict) -> FaultPlan:
    return FaultPlan.from_json(json.dumps(list(items)))


def assert_exactly_once(sink: Sink, rows: int = ROWS, n: int = N) -> None:
    table = sink.read_output()
    keys = sorted(zip(table["id"].to_pylist(), table["sample_index"].to_pylist()))
    assert keys == [(i, s) for i in range(rows) for s in range(n)]


def test_a_worker_killed_mid_shard_is_replaced_and_its_shard_requeued(tmp_path, monkeypatch, ray_local, tiny_preset):
    plan = faults({"action": "kill", "shard": 1, "attempts": [1]})
    spec = spec_for(tmp_path, tiny_preset)
    summary = run_job(spec, faults=plan)

    assert summary.exit_code == 0 and summary.shards_committed == 3
    assert summary.workers_replaced == 1 and summary.shards_retried == 1
    entries = {e["index"]: e for e in Sink(spec.output.url).committed().values()}
    assert entries[1]["attempt"] == 2
    # The replacement is a new process: the shard's second attempt ran on a different worker.
    assert entries[1]["worker_pid"] != entries[0]["worker_pid"]
    assert_exactly_once(Sink(spec.output.url))


def test_a_stuck_worker_past_shard_timeout_is_replaced_and_its_shard_requeued(tmp_path, monkeypatch, ray_local, tiny_preset):
    plan = faults({"action": "hang", "shard": 0, "attempts": [1]})
    spec = spec_for(tmp_path, tiny_preset, execution={"rows_per_shard": 6, "shard_timeout": 8.0})
    started = time.monotonic()
    summary = run_job(spec, faults=plan)

    assert time.monotonic() - started >= 8.0
    assert summary.exit_code == 0 and summary.workers_replaced == 1 and summary.shards_retried == 1
    entries = {e["index"]: e for e in Sink(spec.output.url).committed().values()}
    assert entries[0]["attempt"] == 2 and entries[1]["attempt"] == 1
    assert_exactly_once(Sink(spec.output.url))


def test_a_shard_failing_every_attempt_is_reported_and_the_error_budget_decides(tmp_path, monkeypatch, ray_local, tiny_preset):
    # Shard 1 fails every attempt; shard 0's first write fails half-way (and must publish nothing).
    plan = faults(
        {"action": "raise", "shard": 1, "attempts": []},
        {"action": "fail_write", "shard": 0, "attempts": [1]},
    )
    spec = spec_for(tmp_path, tiny_preset, execution={"max_attempts": 2})
    summary = run_job(spec, faults=plan)
    sink = Sink(spec.output.url)

    assert summary.exit_code == 1 and summary.status == "failed" and not sink.succeeded()
    assert summary.shards_failed == 1 and summary.shards_committed == 2
    (failed,) = summary.failed_shards
    assert failed["index"] == 1 and failed["attempts"] == 2 and len(failed["errors"]) == 2
    assert all("InjectedFault" in error for error in failed["errors"])
    assert summary.error_rate == pytest.approx(1 / 3)
    entries = {e["index"]: e for e in sink.committed().values()}
    assert entries[0]["attempt"] == 2 and set(entries) == {0, 2}
    assert sink.read_summary()["shards_failed"] == 1

    # The same job (shard 1 still failing every attempt) with a budget that fits the failure: committed shards are
    # skipped, exit 0, _SUCCESS.
    again = run_job(spec_for(tmp_path, tiny_preset, execution={"max_attempts": 2, "max_error_rate": 0.4}), faults=plan)
    assert again.exit_code == 0 and again.shards_skipped == 2 and again.shards_failed == 1 and sink.succeeded()
    assert again.shards_run == 0


def test_the_driver_killed_mid_job_resumes_and_writes_every_row_exactly_once(tmp_path, ray_local, tiny_preset):
    data = write_prompts(tmp_path / "in.parquet", [f"prompt number {i}" for i in range(ROWS)], ids=range(ROWS), row_group_size=3)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\npreset = "{tiny_preset}"\nmax_length = 64\nmax_slots = 8\n'
        f'[input]\nurl = "{data}"\nid_column = "id"\n'
        f'[sampling]\nsampler = "random"\nn = {N}\nmax_new_tokens = 4\n'
        f'[output]\nurl = "{tmp_path / "out"}"\n'
        f'[execution]\nrows_per_shard = 3\ncompilation_cache = "{TEST_XLA_CACHE}"\n'
    )
    # Every shard waits 2 s before it starts, so the driver can be killed with shards still to do.
    delays = json.dumps([{"action": "delay", "shard": -1, "attempts": [], "seconds": 2}])
    command = [sys.executable, "-m", "batchgen.cli", "run", str(job), "--address", ray_local, "--no-progress"]
    with_delays = [sys.executable, "-m", "tests.run_with_faults", delays, *command[3:]]
    driver = subprocess.Popen(with_delays, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sink = Sink(str(tmp_path / "out"))
    deadline = time.monotonic() + 240
    while len(sink.committed()) < 1:
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = sink.committed()
    assert 1 <= len(before) < 4 and not sink.succeeded()
    mtimes = {shard_id: os.stat(tmp_path / "out" / f"part-{shard_id}.parquet").st_mtime_ns for shard_id in before}

    # The rerun finds the cluster through RAY_ADDRESS, as a driver under `ray job submit` does.
    rerun_command = [arg for arg in command if arg not in ("--address", ray_local)]
    rerun = subprocess.run(rerun_command, env={**os.environ, "RAY_ADDRESS": ray_local}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = sink.read_summary()
    assert summary["shards_skipped"] == len(before) and summary["shards_run"] == 4 - len(before)
    after = sink.committed()
    for shard_id, entry in before.items():
        # Committed shards were not regenerated: same commit record, same file.
        assert after[shard_id] == entry
        assert os.stat(tmp_path / "out" / f"part-{shard_id}.parquet").st_mtime_ns == mtimes[shard_id]
    assert_exactly_once(sink)
    assert sink.succeeded()


def test_input_and_output_on_s3_with_resume(tmp_path, monkeypatch, ray_local, tiny_preset, s3_server):
    bucket = f"jobs-{uuid.uuid4().hex[:12]}"
    s3 = fsspec.filesystem("s3", **s3_server)
    s3.mkdir(bucket)
    write_prompts(f"{bucket}/in/a.parquet", [f"prompt {i}" for i in range(8)], ids=range(8), filesystem=s3)
    write_prompts(f"{bucket}/in/b.parquet", [f"prompt {i}" for i in range(8, 12)], ids=range(8, 12), filesystem=s3)
    storage = {"storage_options": s3_server}

    def s3_spec() -> JobSpec:
        return make_spec(
            f"s3://{bucket}/in/",
            f"s3://{bucket}/out",
            preset=tiny_preset,
            input=storage,
            output=storage,
            sampling={"n": N, "sampler": "random", "seed": 5},
            execution={"max_attempts": 1},
        )

    first = run_job(s3_spec(), faults=faults({"action": "raise", "shard": 2, "attempts": []}))
    assert first.exit_code == 1 and first.shards_committed == 2 and first.shards_failed == 1
    sink = Sink(f"s3://{bucket}/out", s3_server)
    committed = sink.committed()

    second = run_job(s3_spec())
    assert second.exit_code == 0 and second.shards_skipped == 2 and second.shards_run == 1
    assert {k: v for k, v in sink.committed().items() if k in committed} == committed
    assert_exactly_once(sink)
    listing = {path.rsplit("/", 1)[-1] for path in s3.ls(f"{bucket}/out", refresh=True)}
    assert {"_SUCCESS", "_summary.json", "_job.json", "_manifest"} <= listing and "_tmp" not in listing
    assert len([name for name in listing if name.startswith("part-")]) == 3
