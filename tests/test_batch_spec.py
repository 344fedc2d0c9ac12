"""The job spec: validation errors that name key and value, --set overrides, sweeps, placeholders, fingerprint."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest

from batchgen.errors import SpecError
from batchgen.overrides import parse_assignment
from batchgen.sampling_checks import SAMPLERS
from batchgen.spec import field_type, load_spec, parse_spec

JOBS = Path(__file__).parent.parent / "jobs"


def raw(**sections):
    base = {"model": {"preset": "p"}, "input": {"url": "in.parquet"}, "output": {"url": "out"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec(raw())
    assert spec.input.prompt_column == "prompt" and spec.input.id_column is None
    assert [c.name for c in spec.sampling] == ["default"]
    assert spec.sampling[0].stop_token_ids == "auto" and spec.outputs_per_row == 1
    assert spec.sampling[0].skip_special_tokens is True
    assert spec.execution.max_attempts == 3 and spec.output.compression == "zstd"


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"dtyp": "float32"}}, "unknown key model.dtyp (did you mean model.dtype?)"),
        ({"sampling": {"temperature": "hot"}}, "sampling.temperature must be a number, got 'hot'"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p must be in (0, 1], got 1.5"),
        ({"sampling": {"sampler": "nucleus"}}, "sampling.sampler must be one of"),
        ({"sampling": {"stop_token_ids": "eos"}}, "sampling.stop_token_ids must be 'auto' or a list of token ids"),
        ({"sampling": {"stop_strings": [1]}}, "sampling.stop_strings must be a list of strings, got [1]"),
        ({"sampling": {"n": 0}}, "sampling.n must be >= 1, got 0"),
        ({"execution": {"replicas": 0}}, "execution.replicas must be >= 1, got 0"),
        ({"execution": {"max_error_rate": 2.0}}, "execution.max_error_rate must be in [0, 1], got 2.0"),
        ({"execution": {"rows_per_shard": True}}, "execution.rows_per_shard must be an integer, got True"),
        ({"model": {"dtype": "float8"}}, "model.dtype must be one of"),
        ({"model": {"cache_tokens": 100}}, "model.cache_tokens must be 0 (room for every slot) or >= model.max_length"),
        ({"input": {"date": "2024-13-01"}}, "input.date '2024-13-01' is not a real date"),
        ({"input": {"date": "yesterday"}}, "input.date must be 'today' or YYYY-MM-DD"),
        ({"input": {"prompt_column": "p", "messages_column": "m"}}, "set one of input.prompt_column and"),
        ({"output": {"carry_columns": ["error"]}}, "must not repeat the output column 'error'"),
        ({"sampling": {"configs": {"a b": {}}}}, "configuration name 'a b'"),
        ({"sampling": {"configs": {"hot": {"temprature": 2.0}}}}, "unknown key sampling.configs.hot.temprature"),
        ({"bogus": {}}, "unknown key bogus"),
    ],
)
def test_errors_name_the_key_and_the_value(sections, message):
    with pytest.raises(SpecError) as raised:
        parse_spec(raw(**sections), source="job.toml")
    assert str(raised.value).startswith("job.toml: ")
    assert message in str(raised.value)


def test_a_missing_required_section_or_key_is_named():
    with pytest.raises(SpecError, match=r"the \[output\] section is required"):
        parse_spec({"model": {"preset": "p"}, "input": {"url": "x"}})
    with pytest.raises(SpecError, match="model.preset is required"):
        parse_spec(raw(model={"dtype": "float32"}) | {"model": {"dtype": "float32"}})


def test_overrides_are_coerced_to_the_type_each_key_expects(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[model]\npreset = "p"\n[input]\nurl = "in/{date}.parquet"\n[output]\nurl = "out/{date}"\n')
    spec = load_spec(
        path,
        [
            "sampling.seed=7",  # int
            "sampling.temperature=1",  # an int where a float is expected
            "input.date=2024-05-01",  # TOML reads a date; the key wants the text
            "input.id_column=42",  # TOML reads an int; the key wants the text
            "output.url=s3://bucket/out/{date}",  # not TOML at all: taken as a string
            "sampling.stop_token_ids=[2, 3]",
            'sampling.stop_strings=["\\n\\n"]',  # a TOML basic string: escapes work
            "sampling.skip_special_tokens=false",
            "execution.shard_timeout=30",
        ],
    )
    config = spec.sampling[0]
    assert config.seed == 7 and config.temperature == 1.0 and isinstance(config.temperature, float)
    assert spec.input.url.endswith("/in/2024-05-01.parquet") and spec.input.id_column == "42"
    assert spec.output.url == "s3://bucket/out/2024-05-01"
    assert config.stop_token_ids == (2, 3) and config.stop_strings == ("\n\n",)
    assert config.skip_special_tokens is False  # special tokens are skipped unless a spec asks for them
    assert spec.execution.shard_timeout == 30.0


def test_an_override_of_an_unknown_key_or_a_wrong_type_fails_like_the_file_would(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[model]\npreset = "p"\n[input]\nurl = "x"\n[output]\nurl = "y"\n')
    with pytest.raises(SpecError, match="unknown key sampling.sed"):
        load_spec(path, ["sampling.sed=1"])
    with pytest.raises(SpecError, match="sampling.seed must be an integer, got 'abc'"):
        load_spec(path, ["sampling.seed=abc"])
    with pytest.raises(SpecError, match="--set expects section.key=value"):
        load_spec(path, ["sampling.seed"])
    with pytest.raises(SpecError, match="model.preset is 'p', not a table"):
        load_spec(path, ["model.preset.x=1"])


def test_parse_assignment_keeps_text_for_string_keys():
    assert parse_assignment("input.url=a=b", field_type) == (("input", "url"), "a=b")
    assert parse_assignment("output.carry_columns=['x']", field_type) == (("output", "carry_columns"), ["x"])
    assert parse_assignment("input.storage_options.anon=true", field_type) == (("input", "storage_options", "anon"), True)


def test_sweep_configs_inherit_the_shared_keys_and_override_their_own():
    spec = parse_spec(
        raw(
            sampling={
                "max_new_tokens": 9,
                "seed": 3,
                "configs": {"greedy": {"sampler": "greedy"}, "hot": {"sampler": "random", "temperature": 1.3, "n": 2}},
            }
        )
    )
    greedy, hot = spec.sampling
    assert (greedy.name, greedy.sampler, greedy.max_new_tokens, greedy.seed) == ("greedy", "greedy", 9, 3)
    assert (hot.name, hot.sampler, hot.temperature, hot.n, hot.max_new_tokens) == ("hot", "random", 1.3, 2, 9)
    assert spec.outputs_per_row == 3


def test_date_placeholder_defaults_to_today():
    spec = parse_spec(raw(input={"url": "/d/{date}/*.parquet"}, output={"url": "/o/{date}"}), today=datetime.date(2030, 1, 2))
    assert spec.input.url == "/d/2030-01-02/*.parquet" and spec.output.url == "/o/2030-01-02"
    assert spec.input.date == "2030-01-02"


def test_fingerprint_follows_what_changes_the_output_only():
    base = parse_spec(raw())
    same = [
        raw(execution={"replicas": 4, "max_attempts": 9, "shard_timeout": 5.0, "max_error_rate": 0.5, "max_slots": 2}),
        raw(input={"storage_options": {"key": "secret"}}, output={"storage_options": {"anon": True}}),
        raw(model={"devices_per_replica": 8}),
        raw(model={"device_resource": "TPU"}),
        raw(model={"cache_tokens": 4096}),
        raw(model={"prefix_caching": False}),
        raw(model={"max_slots": 3}),
        raw(input={"date": "2020-01-01"}),  # no {date} in the URL: the date changes nothing
    ]
    different = [
        raw(sampling={"seed": 1}),
        raw(sampling={"configs": {"default": {"temperature": 0.5}}}),
        raw(model={"dtype": "bfloat16"}),
        raw(input={"url": "other.parquet"}),
        raw(output={"carry_columns": ["topic"]}),
        raw(execution={"rows_per_shard": 7}),
    ]
    assert all(parse_spec(r).fingerprint() == base.fingerprint() for r in same)
    assert len({parse_spec(r).fingerprint() for r in different} | {base.fingerprint()}) == len(different) + 1


def test_to_dict_leaves_credentials_out():
    spec = parse_spec(raw(input={"storage_options": {"secret": "s3cr3t"}}, output={"storage_options": {"secret": "x"}}))
    assert "s3cr3t" not in repr(spec.to_dict()) and "storage_options" not in spec.to_dict()["output"]


def test_samplers_match_the_engine_and_the_search_path():
    from model.samplers import SAMPLERS as MODEL_SAMPLERS

    from batchgen.sampling_checks import SEARCH_SAMPLERS

    assert set(SAMPLERS) == set(MODEL_SAMPLERS) and set(SEARCH_SAMPLERS) == {"beam", "contrastive"}


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.toml")))
def test_the_bundled_jobs_are_valid(job):
    spec = load_spec(JOBS / job, ["input.date=2024-05-01"])
    assert spec.model.preset == "smollm2_135m_instruct"
    if job == "eval_sweep.toml":
        assert len(spec.models) == 3 and spec.model_sweep and spec.task.metric == "accuracy"
    if job == "synthesis.toml":
        assert spec.sampling[0].n == 8 and spec.sampling[0].temperature > 0 and spec.input.system_prompt
        assert spec.sampling[0].response_format["type"] == "json_schema"
    if job == "nightly.toml":
        assert "2024-05-01" in spec.input.url and "2024-05-01" in spec.output.url


def test_relative_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    spec = parse_spec(raw(model={"preset": "ckpt"}, input={"url": "data/*.parquet"}, output={"url": "s3://b/out"}))
    assert spec.input.url == f"{tmp_path}/data/*.parquet" and spec.output.url == "s3://b/out"
    assert spec.model.preset == str(tmp_path / "ckpt")
    assert parse_spec(raw(model={"preset": "smollm2_135m_instruct"})).model.preset == "smollm2_135m_instruct"


def test_max_slots_auto_needs_a_cache_size(tmp_path):
    from batchgen.spec import SpecError, load_spec

    base = 'model = {preset = "p", cache_tokens = 4096}\ninput = {url = "in"}\noutput = {url = "out"}\n'
    path = tmp_path / "job.toml"
    path.write_text(base.replace("cache_tokens = 4096", 'cache_tokens = 4096, max_slots = "auto"'))
    assert load_spec(str(path)).model.max_slots == "auto"
    path.write_text(base.replace("cache_tokens = 4096", 'max_slots = "auto"'))
    with pytest.raises(SpecError, match="set model.cache_tokens"):
        load_spec(str(path))
    path.write_text(base.replace("cache_tokens = 4096", 'cache_tokens = 4096, max_slots = "many"'))
    with pytest.raises(SpecError, match="max_slots"):
        load_spec(str(path))


def test_max_slots_in_its_old_place_moves_to_model(tmp_path):
    from batchgen.spec import SpecError, load_spec

    base = 'model = {preset = "p"}\ninput = {url = "in"}\noutput = {url = "out"}\n'
    path = tmp_path / "job.toml"
    path.write_text(base + "execution = {max_slots = 4, replicas = 2}\n")
    spec = load_spec(str(path))
    assert (spec.model.max_slots, spec.execution.replicas) == (4, 2)
    assert load_spec(str(path), ["execution.max_slots=6"]).model.max_slots == 6
    assert load_spec(str(path), ["model.max_slots=7"]).model.max_slots == 7
    path.write_text(base.replace('preset = "p"', 'preset = "p", max_slots = 2') + "execution = {max_slots = 4}\n")
    with pytest.raises(SpecError, match="old place of model.max_slots"):
        load_spec(str(path))


def test_run_only_keys_name_real_keys_and_leave_the_fingerprint_alone():
    from batchgen.spec import _SECTIONS, RUN_ONLY_KEYS

    assert set(RUN_ONLY_KEYS) == set(_SECTIONS)
    for section, keys in RUN_ONLY_KEYS.items():
        assert keys <= {field.name for field in dataclasses.fields(_SECTIONS[section])}, section
    base = parse_spec({"model": {"preset": "p"}, "input": {"url": "in"}, "output": {"url": "out"}}, source="t.toml")
    changed = parse_spec(
        {"model": {"preset": "p", "cache_tokens": 4096, "prefix_caching": False}, "input": {"url": "in"}, "output": {"url": "out2"},
         "execution": {"replicas": 4}},
        source="t.toml",
    )
    assert base.fingerprint() == changed.fingerprint()
    seeded = parse_spec(
        {"model": {"preset": "p"}, "input": {"url": "in"}, "output": {"url": "out"}, "sampling": {"seed": 3}},
        source="t.toml",
    )
    assert seeded.fingerprint() != base.fingerprint()
