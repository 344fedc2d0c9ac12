"""The demo job (jobs/demo.toml) on the real demo model, end to end through `batchgen run`, on a few rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.spec import DATA_DIR
from tests.batch_fixtures import TEST_XLA_CACHE, ray_local  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def test_the_demo_job_writes_the_reference_greedy_text(tmp_path, ray_local):
    # The bundled prompts' first row group (16 rows) is its first shard with rows_per_shard = 16.
    first_rows = pq.ParquetFile(DATA_DIR / "prompts.parquet").read_row_group(0).slice(0, 4)
    pq.write_table(first_rows, tmp_path / "prompts.parquet")
    result = CliRunner().invoke(
        cli,
        [
            "run", str(Path(__file__).parent.parent / "jobs" / "demo.toml"),
            "--set", f"input.url={tmp_path / 'prompts.parquet'}",
            "--set", f"output.url={tmp_path / 'out'}",
            "--set", "sampling.max_new_tokens=16",
            "--set", "model.max_slots=4",
            "--set", f"execution.compilation_cache={TEST_XLA_CACHE}",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "4 ok, 0 error" in result.output
    rows = pq.read_table(tmp_path / "out").to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert set(by_id) == {"demo-000", "demo-001", "demo-002", "demo-003"}
    # Greedy, float32, chat template: the text that transformers and keras-hub agree on (REFERENCE.md).
    assert by_id["demo-000"]["completion"].startswith("In the depths of the ocean, where shadows play,")
    assert all(row["topic"] == "poetry" and row["completion_tokens"] <= 16 for row in rows)
