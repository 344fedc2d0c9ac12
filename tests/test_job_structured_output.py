"""Structured output in a job: the spec's response_format, a per-row column, and a row whose schema does not compile."""

from __future__ import annotations

import json

import jsonschema
import pytest

from batchgen.model_runner import ModelRunner
from batchgen.spec import SpecError
from tests.batch_fixtures import make_spec, tiny_preset, write_prompts  # noqa: F401 (a fixture)
from tests.test_job_worker_sampling import run_all
from tests.test_structured_output import SCHEMA


@pytest.fixture(scope="module")
def runner(tiny_preset) -> ModelRunner:
    spec = make_spec("x", "y", preset=tiny_preset, model={"max_length": 256})
    return ModelRunner.load(spec.model, spec.model.max_slots, spec.execution.compilation_cache)


def test_every_completion_of_a_json_schema_job_parses_and_validates(tmp_path, runner):
    path = write_prompts(tmp_path / "in.parquet", [f"Describe pet number {i}" for i in range(6)], ids=list(range(6)))
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    sampling = {"sampler": "random", "temperature": 1.2, "n": 3, "max_new_tokens": 160, "response_format": response_format}
    rows = run_all(make_spec(path, str(tmp_path / "out"), sampling=sampling), runner)
    assert len(rows) == 18
    for row in rows:
        assert row["error"] is None and row["finish_reason"] == "stop", row
        jsonschema.validate(json.loads(row["completion"]), SCHEMA)


def test_a_response_format_column_constrains_its_rows_and_a_bad_one_is_an_error_row(tmp_path, runner):
    formats = [
        json.dumps({"type": "regex", "regex": "(up|down) [0-9]"}),
        None,  # the spec's format
        json.dumps({"type": "text"}),  # plain text: the spec's format is off for this row
        json.dumps({"type": "json_schema", "json_schema": {"schema": {"type": "object", "$ref": "#/missing"}}}),
    ]
    path = write_prompts(tmp_path / "in.parquet", ["a", "b", "c", "d"], ids=["r1", "r2", "r3", "r4"],
                         extra={"response_format": formats})
    sampling = {"sampler": "random", "max_new_tokens": 12, "stop_token_ids": [],
                "response_format": json.dumps({"type": "regex", "regex": "[xy]{5}"})}
    rows = run_all(make_spec(path, str(tmp_path / "out"), sampling=sampling), runner)
    by_id = {row["id"]: row for row in rows}
    assert by_id["r1"]["completion"] in {f"{w} {d}" for w in ("up", "down") for d in range(10)}
    assert len(by_id["r2"]["completion"]) == 5 and set(by_id["r2"]["completion"]) <= set("xy")
    assert by_id["r3"]["error"] is None and by_id["r3"]["finish_reason"] == "length"
    bad = by_id["r4"]
    assert bad["finish_reason"] == "error" and bad["completion"] is None
    assert "row 'r4'" in bad["error"] and "missing" in bad["error"], bad["error"]


def test_the_spec_checks_the_shape_of_its_response_format(tmp_path):
    with pytest.raises(SpecError, match="sampling.response_format"):
        make_spec("x", "y", sampling={"response_format": {"type": "regex"}})
    with pytest.raises(SpecError, match="response_format"):
        make_spec("x", "y", sampling={"sampler": "beam", "response_format": {"type": "json_object"}})
    spec = make_spec("x", "y", sampling={"response_format": '{"type": "json_object"}'})
    assert spec.fingerprint() != make_spec("x", "y").fingerprint()
