"""Done-when of issue #12: an OpenAI Batch file of 1,000 requests runs end to end, resumes after a driver
SIGKILL, and every custom_id comes out exactly once (tiny model, real Ray workers, a real driver process)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgen.sink import Sink
from tests.batch_fixtures import TEST_XLA_CACHE, ray_local, tiny_preset  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m tests.run_with_faults` runs from it

pytestmark = pytest.mark.slow

REQUESTS = 1000
SHARDS = 8


def batch_file(path, count: int) -> dict[str, int]:
    """Write `count` requests (some with n > 1, one malformed); returns each custom_id's n."""
    rng = random.Random(0)
    ns = {}
    with open(path, "w") as handle:
        for i in range(count):
            custom_id = f"req-{i:04d}"
            body = {"model": "any", "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 2}
            if i % 10 == 0:
                body["n"] = rng.randint(2, 3)
            if i % 7 == 0:
                body["temperature"] = 0.8
            if i == 500:
                body["max_tokens"] = -1  # an error line, not a lost request
            ns[custom_id] = body.get("n", 1)
            request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(request) + "\n")
    return ns


def test_an_openai_batch_of_1000_requests_survives_a_driver_sigkill_with_each_custom_id_once(tmp_path, ray_local, tiny_preset):
    ns = batch_file(tmp_path / "batch.jsonl", REQUESTS)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\npreset = "{tiny_preset}"\nmax_length = 64\nmax_slots = 64\n'
        f'[input]\nurl = "{tmp_path / "batch.jsonl"}"\nformat = "openai_batch"\n'
        f'[sampling]\nsampler = "random"\nmax_new_tokens = 2\nseed = 3\n'
        f'[output]\nurl = "{out}"\nformat = "openai_batch"\n'
        f'[execution]\nrows_per_shard = {REQUESTS // SHARDS}\nmax_error_rate = 0.01\n'
        f'compilation_cache = "{TEST_XLA_CACHE}"\n'
    )
    # Every shard waits 1 s first, so that the driver is killed with shards still to do.
    delays = json.dumps([{"action": "delay", "shard": -1, "attempts": [], "seconds": 1}])
    command = [sys.executable, "-m", "batchgen.cli", "run", str(job), "--address", ray_local, "--no-progress"]
    with_delays = [sys.executable, "-m", "tests.run_with_faults", delays, *command[3:]]
    driver = subprocess.Popen(with_delays, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sink = Sink(str(out), output_format="openai_batch", compression="none")
    deadline = time.monotonic() + 240
    while len(sink.committed()) < 1:
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = sink.committed()
    assert 1 <= len(before) < SHARDS and not sink.succeeded()
    mtimes = {shard_id: os.stat(out / f"part-{shard_id}.jsonl").st_mtime_ns for shard_id in before}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = sink.read_summary()
    assert summary["shards_skipped"] == len(before) and summary["shards_run"] == SHARDS - len(before)
    for shard_id, entry in before.items():  # committed shards were not regenerated
        assert sink.committed()[shard_id] == entry
        assert os.stat(out / f"part-{shard_id}.jsonl").st_mtime_ns == mtimes[shard_id]
    assert sink.succeeded() and sorted(p.name for p in out.iterdir() if p.name.startswith("_")) == [
        "_SUCCESS", "_job.json", "_manifest", "_summary.json"]

    lines = list(sink.read_lines())
    assert sorted(line["custom_id"] for line in lines) == sorted(ns)  # each custom_id exactly once
    for line in lines:
        if line["custom_id"] == "req-0500":
            assert line["response"] is None and "max_new_tokens" in line["error"]["message"]
            continue
        assert line["error"] is None, line
        choices = line["response"]["body"]["choices"]
        assert [c["index"] for c in choices] == list(range(ns[line["custom_id"]]))
        assert all(c["finish_reason"] in ("stop", "length") and isinstance(c["message"]["content"], str) for c in choices)
    # Rows count samples: every good request's n; the bad request one error row (its n is not trusted either).
    assert summary["rows_error"] == 1 and summary["rows_ok"] == sum(ns.values()) - ns["req-0500"]
