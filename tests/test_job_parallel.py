"""A batch job whose worker runs the model split over 4 (forced host) devices gives the single-device output."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from tests.batch_fixtures import TEST_XLA_CACHE, tiny_preset, write_prompts  # noqa: F401

pytestmark = pytest.mark.slow

PROMPTS = ["Hello", "Tell me a story", "What is 2 + 2?", "", "Name a color", "Why?"]


def run_job(tmp_path, preset: str, devices: int) -> list[dict]:
    data = write_prompts(tmp_path / "in.parquet", PROMPTS, ids=list(range(len(PROMPTS))), row_group_size=3)
    out = tmp_path / f"out-{devices}"
    job = tmp_path / f"job-{devices}.toml"
    job.write_text(
        f"""
[model]
preset = "{preset}"
max_length = 64
devices_per_replica = {devices}
max_slots = 4

[input]
url = "{data}"
id_column = "id"

[sampling]
sampler = "greedy"
max_new_tokens = 6

[output]
url = "{out}"

[execution]
rows_per_shard = 3
max_error_rate = 0.5
compilation_cache = "{TEST_XLA_CACHE}"
"""
    )
    # No Ray is running in this module: `run` starts an embedded one with 1 x devices CPUs for the worker.
    result = CliRunner().invoke(cli, ["run", str(job), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return sorted(pq.read_table(str(out)).to_pylist(), key=lambda row: row["id"])


def test_a_worker_with_4_devices_splits_the_model_and_writes_the_same_rows(tmp_path, tiny_preset):
    split = run_job(tmp_path, tiny_preset, devices=4)
    single = run_job(tmp_path, tiny_preset, devices=1)
    assert len(split) == len(PROMPTS)
    assert [r["completion"] for r in split] == [r["completion"] for r in single]
    assert [r["finish_reason"] for r in split] == [r["finish_reason"] for r in single]
    assert split[3]["finish_reason"] == "error"  # the empty prompt is an error row on both


def test_a_device_resource_no_node_has_ends_an_embedded_job_instead_of_waiting_forever(tmp_path, tiny_preset):
    from batchgen.errors import WorkerStartError
    from batchgen.job import run_job as run
    from tests.batch_fixtures import make_spec

    data = write_prompts(tmp_path / "in.parquet", PROMPTS, ids=list(range(len(PROMPTS))))
    spec = make_spec(data, str(tmp_path / "out"), preset=tiny_preset, model={"device_resource": "TPU"})
    # An embedded Ray has no TPU and nothing can join it: the worker would stay pending for ever.
    with pytest.raises(WorkerStartError, match="no node of this Ray holds one worker's resources.*'TPU': 1"):
        run(spec)
