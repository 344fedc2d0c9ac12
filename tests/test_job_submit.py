"""The job runs under `ray job submit` on a Ray cluster started with `ray start` (here: one head on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.batch_fixtures import free_port, tiny_preset, write_prompts  # noqa: F401

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_the_job_on_an_existing_cluster(tmp_path, tiny_preset):
    data = write_prompts(tmp_path / "in.parquet", ["Hello", "Tell me a story", "Why?", "Name a color"], row_group_size=2)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\npreset = "{tiny_preset}"\nmax_length = 64\n[input]\nurl = "{data}"\n'
        f'[sampling]\nmax_new_tokens = 4\n[output]\nurl = "{out}"\n[execution]\nrows_per_shard = 2\nmax_slots = 4\n'
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        submitted = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             sys.executable, "-m", "batchgen.cli", "run", str(job), "--no-progress"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "job succeeded" in submitted.stdout
        rows = pq.read_table(str(out)).to_pylist()
        assert len(rows) == 4 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
