"""The job runs under `ray job submit` on a Ray cluster started with `ray start` (here: one head on loopback,
started and stopped by tests/ray_cluster.py through its own processes and temp dir)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.batch_fixtures import tiny_preset, write_prompts  # noqa: F401
from tests.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_the_job_on_an_existing_cluster(tmp_path, tiny_preset):
    data = write_prompts(tmp_path / "in.parquet", ["Hello", "Tell me a story", "Why?", "Name a color"], row_group_size=2)
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[model]\npreset = "{tiny_preset}"\nmax_length = 64\nmax_slots = 4\n[input]\nurl = "{data}"\n'
        f'[sampling]\nmax_new_tokens = 4\n[output]\nurl = "{out}"\n[execution]\nrows_per_shard = 2\n'
    )
    # The head is stopped through its own process tree (tests/ray_cluster.py), not `ray stop`, which would stop
    # every Ray on the machine, other test runs' included.
    root = Path(tempfile.mkdtemp(prefix="bgs-"))  # short: Ray's socket paths live below it
    try:
        with LocalCluster(root) as cluster:
            cluster.start_head(num_cpus=2)
            submitted = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--",
                 sys.executable, "-m", "batchgen.cli", "run", str(job), "--no-progress"],
                env=cluster.env, capture_output=True, text=True, timeout=600,
            )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "job succeeded" in submitted.stdout
        rows = pq.read_table(str(out)).to_pylist()
        assert len(rows) == 4 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
