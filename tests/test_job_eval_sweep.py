"""Done-when of issue #13: jobs/eval_sweep.toml (the bundled eval set over three model configurations) runs end to
end, writes accuracy per model into _summary.json, and resumes after a driver SIGKILL without redoing committed
shards. The spec file itself runs, with `--set` for the tiny model as its preset and 48 of the set's items, so
that CI stays fast (each new packed shape compiles, which dominates on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.sink import Sink
from batchgen.spec import DATA_DIR, load_spec
from tests.batch_fixtures import TEST_XLA_CACHE, ray_local, tiny_preset  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m tests.run_with_faults` runs from it

pytestmark = pytest.mark.slow

JOB = Path(__file__).parent.parent / "jobs" / "eval_sweep.toml"


def test_the_eval_sweep_resumes_after_a_driver_sigkill_with_each_row_and_model_once(tmp_path, ray_local, tiny_preset):
    out = tmp_path / "out"
    # Multiple-choice and short-answer items alike, as the whole set has them.
    items = pa.concat_tables(pq.read_table(DATA_DIR / "eval" / f"{kind}.parquet").slice(0, 24) for kind in ("choice", "short"))
    pq.write_table(items, tmp_path / "items.parquet")
    settings = [f"model.preset={tiny_preset}", f"input.url={tmp_path / 'items.parquet'}", f"output.url={out}",
                "execution.rows_per_shard=8", f"execution.compilation_cache={TEST_XLA_CACHE}"]
    spec = load_spec(JOB, settings)
    models = [m.name for m in spec.models]
    assert models == ["float32", "bf16", "int8"] and spec.task.metric == "accuracy"
    items = items.to_pylist()
    answers = {item["id"]: item for item in items}

    command = [sys.executable, "-m", "batchgen.cli", "run", str(JOB), "--address", ray_local, "--no-progress"]
    command += [arg for setting in settings for arg in ("--set", setting)]
    # Every shard waits 1 s first, so that the driver is killed with shards of later models still to do.
    delays = json.dumps([{"action": "delay", "shard": -1, "attempts": [], "seconds": 1}])
    with_delays = [sys.executable, "-m", "tests.run_with_faults", delays, *command[3:]]
    driver = subprocess.Popen(with_delays, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sink = Sink(str(out))
    deadline = time.monotonic() + 900
    while len(sink.committed()) < 7:  # past the first model's shards
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "shards not committed in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = sink.committed()
    shards = len(json.loads((out / "_job.json").read_text())["shards"])
    assert 7 <= len(before) < shards and not sink.succeeded()
    mtimes = {shard_id: os.stat(out / f"part-{shard_id}.parquet").st_mtime_ns for shard_id in before}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = sink.read_summary()
    assert summary["shards_skipped"] == len(before) and summary["shards_run"] == shards - len(before)
    for shard_id, entry in before.items():  # committed shards were not run again
        assert sink.committed()[shard_id] == entry
        assert os.stat(out / f"part-{shard_id}.parquet").st_mtime_ns == mtimes[shard_id]

    rows = sink.read_output().to_pylist()
    assert sorted((r["id"], r["model"]) for r in rows) == sorted((i, m) for i in answers for m in models)
    for row in rows:  # every continuation scored once, in its row
        assert row["error"] is None and len(row["logprobs"]) == len(answers[row["id"]]["choices"])
    for model in models:  # accuracy per model over every shard, whichever run committed it
        mine = [r for r in rows if r["model"] == model]
        accuracy = sum(r["prediction"] == answers[r["id"]]["answer"] for r in mine) / len(mine)
        metric = summary["metrics"][f"{model}/default"]
        assert metric["metric"] == "accuracy" and metric["count"] == len(items)
        assert metric["value"] == pytest.approx(accuracy)
        assert model in rerun.stdout
    assert "accuracy" in rerun.stdout
