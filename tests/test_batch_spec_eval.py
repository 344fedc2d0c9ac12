"""The job spec's evaluation keys: [task] (score, perplexity, metrics) and [model.configs.NAME] sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgen.errors import SpecError
from batchgen.spec import field_type, load_spec, parse_spec

JOBS = Path(__file__).parent.parent / "jobs"


def raw(**sections):
    base = {"model": {"preset": "p"}, "input": {"url": "in.parquet"}, "output": {"url": "out"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


SCORE = {"kind": "score", "continuations_column": "choices", "reference_column": "answer", "metric": "accuracy"}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"task": {"kind": "rank"}}, "task.kind must be one of"),
        ({"task": {"metric": "bleu"}}, "task.metric must be one of"),
        ({"task": {"kind": "score"}}, "task.continuations_column must name a column for task.kind 'score'"),
        ({"task": {"metric": "accuracy", "reference_column": "a"}}, "task.metric does not apply to task.kind 'generate'"),
        ({"task": {"metric": "exact_match"}}, "task.reference_column must name a column for metric 'exact_match'"),
        ({"task": {**SCORE}, "sampling": {"configs": {"a": {}, "b": {}}}}, "sampling.configs do not apply"),
        ({"model": {"configs": {"x": {"dtype": "float8"}}}}, "model.configs.x.dtype must be one of"),
        ({"model": {"configs": {"bad name": {}}}}, "configuration name 'bad name' (model.configs.bad name)"),
        ({"model": {"configs": {"x": {"dtyp": "float32"}}}}, "unknown key model.configs.x.dtyp"),
    ],
)
def test_bad_evaluation_keys_name_the_key_and_value(sections, message):
    with pytest.raises(SpecError) as error:
        parse_spec(raw(**sections), source="job.toml")
    assert message in str(error.value)


def test_model_configs_merge_over_the_shared_model_keys():
    spec = parse_spec(raw(model={"max_length": 128, "configs": {"a": {}, "b": {"dtype": "bfloat16", "quantization": "int8"}}}))
    assert [m.name for m in spec.models] == ["a", "b"] and spec.model is spec.models[0]
    assert spec.models[1].max_length == 128 and spec.models[1].quantization == "int8"
    assert spec.model_sweep and spec.outputs_per_row == 2
    assert field_type(("model", "configs", "b", "dtype")) is str


def test_fingerprints_of_jobs_without_the_new_keys_do_not_change():
    """A job written before [task] and [model.configs] existed must still resume: its fingerprint is the same."""
    plain = parse_spec(raw())
    assert parse_spec(raw(task={"kind": "generate"})).fingerprint() == plain.fingerprint()
    swept = parse_spec(raw(model={"configs": {"a": {}}}))
    assert swept.fingerprint() != plain.fingerprint()
    other = parse_spec(raw(model={"configs": {"a": {"dtype": "bfloat16"}}}))
    assert other.fingerprint() != swept.fingerprint()


def test_the_bundled_eval_sweep_is_valid():
    spec = load_spec(JOBS / "eval_sweep.toml")
    assert spec.task.kind == "score" and spec.task.metric == "accuracy"
    assert [(m.name, m.dtype, m.quantization) for m in spec.models] == [
        ("float32", "float32", "none"), ("bf16", "bfloat16", "none"), ("int8", "float32", "int8")
    ]
    assert load_spec(JOBS / "eval_short.toml").task.metric == "exact_match"
