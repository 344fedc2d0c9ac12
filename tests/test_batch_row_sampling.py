"""Per-row sampling overrides: checked up front (bad value -> error row naming row id, column and value), merged
with the configuration, and the spec keys for penalties, logit bias and beam / contrastive search."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchgen.errors import SpecError
from batchgen.prompts import prompt_rows
from batchgen.row_sampling import OVERRIDE_COLUMNS, check_row_overrides, resolve
from tests.batch_fixtures import make_spec


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("sampler", "nucleus", "must be one of"),
        ("temperature", -0.5, r"must be a number in \[0, inf\]"),
        ("temperature", float("nan"), "must be a number"),
        ("top_k", 0, "must be an integer >= 1"),
        ("top_k", 2.5, "must be an integer >= 1"),
        ("top_p", 0.0, r"must be a number in \(0, 1\]"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("min_p", 1.0, r"\[0, 1\)"),
        ("max_new_tokens", 0, "must be an integer >= 1"),
        ("stop_strings", ["ok", ""], "non-empty string"),
        ("stop_strings", 5, "non-empty string"),
        ("seed", -1, "integer >= 0"),
        ("repetition_penalty", 0.0, r"\(0, inf\]"),
        ("presence_penalty", 2.5, r"\[-2, 2\]"),
        ("frequency_penalty", -3.0, r"\[-2, 2\]"),
        ("logit_bias", {"12": 200}, r"logit_bias\[12\] must be a number in \[-100, 100\]"),
        ("logit_bias", {"x": 1}, "token ids"),
        ("response_format", {"type": "xml"}, "'type' is one of"),
        ("response_format", "{not json", "is not JSON"),
        ("response_format", {"type": "json_schema"}, "must hold a 'json_schema' table"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_row_the_column_and_the_value(column, value, message):
    overrides, error = check_row_overrides({column: value}, row_id="r-9")
    assert overrides == {}
    assert error.startswith(f"row 'r-9': column {column!r} holds {value!r}: ")
    assert pytest.importorskip("re").search(message, error), error


def test_good_values_are_normalized_and_nulls_keep_the_configuration():
    overrides, error = check_row_overrides(
        {
            "sampler": "top_p", "top_p": 0.5, "max_new_tokens": 8.0, "stop_strings": "\n\n", "temperature": None,
            "logit_bias": [("7", -100), (3, 1)], "response_format": '{"type": "json_object"}',
        },
        row_id=1,
    )
    assert error is None
    assert overrides == {
        "sampler": "top_p", "top_p": 0.5, "max_new_tokens": 8, "stop_strings": ("\n\n",),
        "logit_bias": ((3, 1.0), (7, -100.0)), "response_format": '{"type":"json_object"}',
    }
    config = make_spec("x", "y", sampling={"temperature": 0.7, "top_k": 9, "repetition_penalty": 1.2}).sampling[0]
    settings = resolve(config, overrides)
    assert (settings.sampler, settings.top_p, settings.temperature, settings.top_k) == ("top_p", 0.5, 0.7, 9)
    assert settings.repetition_penalty == 1.2 and settings.stop_strings == ("\n\n",) and settings.has_penalties
    # {"type": "text"} asks for nothing the engine does not do anyway.
    assert check_row_overrides({"response_format": {"type": "text"}}, 1) == ({"response_format": None}, None)


def test_every_override_column_of_the_issue_exists():
    wanted = {"sampler", "temperature", "top_k", "top_p", "min_p", "max_new_tokens", "stop_strings", "seed",
              "response_format", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
              "logprobs"}
    assert wanted == set(OVERRIDE_COLUMNS)


def test_override_columns_of_a_parquet_shard_become_error_rows_or_overrides():
    spec = make_spec("x", "y")
    table = pa.table({
        "id": [1, 2, 3],
        "prompt": ["a", "b", "c"],
        "top_k": [None, 0, 3],
        "stop_strings": [None, None, ["END"]],
    })
    rows = prompt_rows(table, spec, 0)
    assert rows[0].error is None and rows[0].overrides == {}
    assert rows[1].error == "row 2: column 'top_k' holds 0: must be an integer >= 1"
    assert rows[2].overrides == {"top_k": 3, "stop_strings": ("END",)}


def test_search_samplers_refuse_what_they_cannot_honour():
    config = make_spec("x", "y", sampling={"sampler": "beam", "num_beams": 3}).sampling[0]
    assert resolve(config, {}).problem() is None
    assert "stop_strings" in resolve(config, {"stop_strings": ("x",)}).problem()
    assert "penalties" in resolve(config, {"presence_penalty": 0.5}).problem()
    assert "response_format" in resolve(config, {"response_format": '{"type":"json_object"}'}).problem()


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"repetition_penalty": 0}, "sampling.repetition_penalty must be > 0 (1 = off), got 0.0"),
        ({"presence_penalty": 3}, "sampling.presence_penalty must be in [-2, 2] (0 = off), got 3.0"),
        ({"logit_bias": {"abc": 1}}, "sampling.logit_bias keys must be token ids"),
        ({"logit_bias": {"5": -101}}, "sampling.logit_bias.5 must be a number in [-100, 100], got -101"),
        ({"sampler": "beam", "stop_strings": ["x"]}, "sampling.stop_strings cannot be honoured by the beam sampler"),
        ({"sampler": "contrastive", "frequency_penalty": 1}, "sampling.sampler does not apply penalties"),
        ({"sampler": "beam", "n": 2}, "sampling.n must be 1: the beam sampler is deterministic"),
        ({"sampler": "contrastive", "alpha": 2}, "sampling.alpha must be in [0, 1], got 2.0"),
        ({"sampler": "beam", "num_beams": 0}, "sampling.num_beams must be >= 1, got 0"),
    ],
)
def test_spec_keys_for_penalties_and_search_are_checked(sampling, message):
    with pytest.raises(SpecError) as error:
        make_spec("x", "y", sampling=sampling)
    assert message in str(error.value)


def test_new_keys_at_their_defaults_keep_an_old_jobs_fingerprint_and_others_change_it():
    base = make_spec("x", "y")
    assert base.fingerprint() == make_spec("x", "y", sampling={"repetition_penalty": 1.0, "logit_bias": {}}).fingerprint()
    for change in ({"repetition_penalty": 1.1}, {"logit_bias": {"3": 1.0}}, {"sampler": "beam"}):
        assert make_spec("x", "y", sampling=change).fingerprint() != base.fingerprint()
    assert make_spec("x", "y", output={"format": "jsonl"}).fingerprint() != base.fingerprint()
