"""`sampling.logprobs = k` in generation jobs: checked up front, computed by the engine, and written the same
through every output format (Parquet and JSONL list columns, OpenAI Batch choices' `logprobs`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchgen.errors import SpecError
from batchgen.model_runner import ModelRunner
from batchgen.row_sampling import check_row_overrides, resolve
from batchgen.rows import output_schema
from batchgen.sampling_checks import MAX_LOGPROBS
from model.generation.seeds import derive_seed
from tests.batch_fixtures import make_spec, tiny_preset, write_prompts  # noqa: F401 (a fixture)
from tests.test_job_worker_sampling import run_all

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
CONFIGS = {"greedy": {"sampler": "greedy"}, "hot": {"sampler": "random", "temperature": 1.3, "seed": 5}}


@pytest.fixture(scope="module")
def runner(tiny_preset) -> ModelRunner:
    spec = make_spec("x", "y", preset=tiny_preset)
    return ModelRunner.load(spec.model, spec.model.max_slots, spec.execution.compilation_cache)


def engine_completions(runner: ModelRunner, config: dict, k: int | None, max_new_tokens: int = 6) -> list:
    """What the engine itself returns for PROMPTS (ids 1..3) under one of CONFIGS, asked for k alternatives."""
    from model.generation.requests import Request, SamplingParams

    params = SamplingParams(sampler=config["sampler"], temperature=config.get("temperature", 1.0))
    requests = [
        Request(i, runner.tokenizer.tokenize(p), max_new_tokens, params, stop_token_ids=runner.stop_token_ids,
                seed=derive_seed(config.get("seed", 0), i + 1, 0), logprobs=k)
        for i, p in enumerate(PROMPTS)
    ]
    return sorted(runner.engine.generate(requests), key=lambda c: c.request_id)


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"logprobs": -1}, f"sampling.logprobs must be in [0, {MAX_LOGPROBS}]"),
        ({"logprobs": 21}, f"sampling.logprobs must be in [0, {MAX_LOGPROBS}]"),
        ({"logprobs": 2.5}, "sampling.logprobs must be an integer"),
        ({"logprobs": 3, "sampler": "beam"}, "sampling.logprobs is not computed by the beam sampler"),
        ({"configs": {"c": {"logprobs": 3, "sampler": "contrastive"}}}, "sampling.configs.c.logprobs is not computed"),
    ],
)
def test_bad_logprobs_keys_are_spec_errors_naming_the_key(sampling, message):
    with pytest.raises(SpecError) as error:
        make_spec("x", "y", sampling=sampling)
    assert message in str(error.value)


def test_logprobs_apply_to_generation_only_and_do_not_clash_with_carried_columns():
    with pytest.raises(SpecError, match="sampling.logprobs applies to generation only"):
        make_spec("x", "y", sampling={"logprobs": 2}, task={"kind": "perplexity"})
    with pytest.raises(SpecError, match="must not repeat the output column 'top_logprobs'"):
        make_spec("x", "y", sampling={"logprobs": 2}, output={"carry_columns": ["top_logprobs"]})
    base = make_spec("x", "y")
    assert make_spec("x", "y", sampling={"logprobs": 0}).fingerprint() == base.fingerprint()  # old jobs resume
    assert make_spec("x", "y", sampling={"logprobs": 1}).fingerprint() != base.fingerprint()


def test_the_spec_allows_what_the_engine_computes():
    from model.generation import logprobs

    assert MAX_LOGPROBS == logprobs.MAX_LOGPROBS


def test_a_rows_logprobs_override_is_checked_and_0_turns_off_the_configurations():
    assert check_row_overrides({"logprobs": 4}, 1) == ({"logprobs": 4}, None)
    assert check_row_overrides({"logprobs": True}, 1) == ({"logprobs": 0}, None)  # on, no alternatives
    assert check_row_overrides({"logprobs": 0}, 1) == ({"logprobs": None}, None)
    _, error = check_row_overrides({"logprobs": 21}, "r")
    assert error == "row 'r': column 'logprobs' holds 21: must be an integer in [0, 20] (0: off), or true / false"
    config = make_spec("x", "y", sampling={"logprobs": 5}).sampling[0]
    assert resolve(config, {}).logprobs == 5 and resolve(config, {"logprobs": None}).logprobs is None
    beam = make_spec("x", "y", sampling={"sampler": "beam"}).sampling[0]
    assert "does not compute logprobs" in resolve(beam, {"logprobs": 2}).problem()


def test_parquet_output_holds_the_engines_logprobs_and_greedys_is_the_top_one(tmp_path, runner):
    path = write_prompts(tmp_path / "in.parquet", PROMPTS, ids=[1, 2, 3])
    sampling = {"max_new_tokens": 6, "logprobs": 3, "configs": CONFIGS}
    rows = run_all(make_spec(path, str(tmp_path / "out"), sampling=sampling), runner)
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    for name, config in CONFIGS.items():
        expected = engine_completions(runner, config, 3)
        got = [r for r in rows if r["config"] == name]
        for row, completion in zip(got, expected):
            assert row["completion"] == completion.text
            assert len(row["token_logprobs"]) == len(completion.token_ids) == len(row["top_logprobs"])
            assert row["token_logprobs"] == pytest.approx(completion.token_logprobs, abs=1e-5)
            for top, want in zip(row["top_logprobs"], completion.top_logprobs):
                assert [t["token_id"] for t in top] == [i for i, _ in want]
                assert [t["logprob"] for t in top] == pytest.approx([lp for _, lp in want], abs=1e-5)
                assert [t["token"] for t in top] == [runner.tokenizer.detokenize([i]) for i, _ in want]
            if name == "greedy":  # the chosen token is the most likely one
                assert row["token_logprobs"] == pytest.approx([top[0]["logprob"] for top in row["top_logprobs"]])
            else:
                assert all(lp <= top[0]["logprob"] + 1e-6 for lp, top in zip(row["token_logprobs"], row["top_logprobs"]))


def test_without_logprobs_the_output_schema_is_unchanged_and_a_row_can_ask_for_them(tmp_path, runner):
    plain = write_prompts(tmp_path / "plain.parquet", PROMPTS, ids=[1, 2, 3])
    rows = run_all(make_spec(plain, str(tmp_path / "plain"), sampling={"max_new_tokens": 4}), runner)
    assert "token_logprobs" not in rows[0] and "top_logprobs" not in rows[0]
    assert output_schema(pa.int64(), []).names == output_schema(pa.int64(), [], logprobs=False).names
    # A Parquet input with a logprobs column: the columns are there, filled where a row asks.
    path = write_prompts(tmp_path / "in.parquet", PROMPTS, ids=[1, 2, 3], extra={"logprobs": pa.array([None, 2, 0], pa.int64())})
    rows = run_all(make_spec(path, str(tmp_path / "out"), sampling={"max_new_tokens": 6}), runner)
    expected = engine_completions(runner, CONFIGS["greedy"], 2)[1]
    assert rows[0]["token_logprobs"] is None and rows[2]["token_logprobs"] is None and rows[2]["top_logprobs"] is None
    assert rows[1]["token_logprobs"] == pytest.approx(expected.token_logprobs, abs=1e-5)
    assert [len(top) for top in rows[1]["top_logprobs"]] == [2] * len(expected.token_ids)


def test_jsonl_output_carries_the_same_values(tmp_path, runner):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i + 1, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    spec = make_spec(str(path), str(tmp_path / "out"), input={"format": "jsonl"}, output={"format": "jsonl"},
                     sampling={"max_new_tokens": 6, "logprobs": 2})
    rows = run_all(spec, runner)
    for row, completion in zip(rows, engine_completions(runner, CONFIGS["greedy"], 2)):
        assert row["token_logprobs"] == pytest.approx(completion.token_logprobs, abs=1e-5)
        assert [[t["token_id"] for t in top] for top in row["top_logprobs"]] == [[i for i, _ in top] for top in completion.top_logprobs]


def test_jsonl_input_rows_asking_for_logprobs_without_columns_for_them_are_error_rows(tmp_path, runner):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "Hi"}) + "\n" + json.dumps({"id": 2, "prompt": "Yo", "logprobs": 3}) + "\n")
    spec = make_spec(str(path), str(tmp_path / "out"), input={"format": "jsonl"}, sampling={"max_new_tokens": 2})
    rows = run_all(spec, runner)
    assert rows[0]["error"] is None and "token_logprobs" not in rows[0]
    assert "row 2: column 'logprobs' asks for log-probabilities" in rows[1]["error"]


def test_openai_batch_output_fills_choices_logprobs_in_openais_shape(tmp_path, runner):
    def request(custom_id: str, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, **body}}

    requests = [request("a", logprobs=True, top_logprobs=3), request("b"), request("c", logprobs=True),
                request("d", top_logprobs=2), request("e", logprobs=True, top_logprobs=30)]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    spec = make_spec(str(path), str(tmp_path / "out"), input={"format": "openai_batch", "prompt_column": "", "id_column": ""},
                     output={"format": "openai_batch"})
    a, b, c, d, e = run_all(spec, runner)

    from model.generation.requests import Request

    prompt = runner.tokenizer.tokenize_chat([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    want = runner.engine.generate([Request(0, prompt, 5, stop_token_ids=runner.stop_token_ids, logprobs=3)])[0]
    content = a["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [x["logprob"] for x in content] == pytest.approx(want.token_logprobs, abs=1e-5)
    assert [x["token"] for x in content] == [runner.tokenizer.detokenize([i]) for i in want.token_ids]
    assert all(x["bytes"] == list(x["token"].encode()) for x in content)
    assert [[t["logprob"] for t in x["top_logprobs"]] for x in content] == [
        pytest.approx([lp for _, lp in top], abs=1e-5) for top in want.top_logprobs
    ]
    assert content[0]["top_logprobs"][0]["token"] == runner.tokenizer.detokenize([want.top_logprobs[0][0][0]])
    assert b["response"]["body"]["choices"][0]["logprobs"] is None
    assert [x["top_logprobs"] for x in c["response"]["body"]["choices"][0]["logprobs"]["content"]] == [[]] * len(content)
    assert d["response"] is None and "top_logprobs (2) needs logprobs: true" in d["error"]["message"]
    assert e["response"] is None and "column 'logprobs' holds 30" in e["error"]["message"]
