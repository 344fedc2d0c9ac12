"""A worker in-process on a tiny model: per-row sampler overrides, beam / contrastive search through the model's
search path, what the engine cannot honour yet as error rows, and JSONL / OpenAI Batch shards end to end."""

from __future__ import annotations

import json

import pytest

from batchgen.model_runner import ModelRunner
from batchgen.planning import plan_job
from batchgen.spec import JobSpec
from batchgen.worker import ShardWorker
from tests.batch_fixtures import make_spec, tiny_preset, write_prompts  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def runner(tiny_preset) -> ModelRunner:
    spec = make_spec("x", "y", preset=tiny_preset)
    return ModelRunner.load(spec.model, spec.model.max_slots, spec.execution.compilation_cache)


def run_all(spec: JobSpec, runner: ModelRunner) -> list[dict]:
    plan = plan_job(spec)
    worker = ShardWorker(spec, plan.schema, runner=runner)
    sink = worker.sink
    sink.prepare({"fingerprint": spec.fingerprint(), "shards": [{"shard_id": s.shard_id} for s in plan.shards]}, False)
    for shard in plan.shards:
        worker.run_shard(shard, attempt=1)
        sink.commit({"shard_id": shard.shard_id})
    if spec.output.format == "parquet":
        return sink.read_output().to_pylist()
    return list(sink.read_lines())


def test_a_per_row_sampler_column_switches_only_its_rows(tmp_path, runner):
    prompts = ["Once upon a time", "Once upon a time"]
    hot = {"sampler": "random", "temperature": 1.5, "max_new_tokens": 6, "stop_token_ids": [], "seed": 3}
    greedy_path = write_prompts(tmp_path / "g.parquet", prompts, ids=[1, 2])
    greedy = run_all(make_spec(greedy_path, str(tmp_path / "g"), sampling={**hot, "sampler": "greedy"}), runner)
    mixed_path = write_prompts(tmp_path / "m.parquet", prompts, ids=[1, 2], extra={"sampler": ["greedy", None]})
    mixed = run_all(make_spec(mixed_path, str(tmp_path / "m"), sampling=hot), runner)
    assert mixed[0]["completion"] == greedy[0]["completion"]  # the overridden row is greedy
    assert mixed[1]["completion"] != greedy[1]["completion"]  # the other keeps the spec's hot sampler


@pytest.mark.parametrize("sampling", [{"sampler": "beam", "num_beams": 3}, {"sampler": "contrastive", "top_k": 3, "alpha": 0.4}])
def test_search_samplers_run_through_the_models_search_path(tmp_path, runner, sampling):
    from model.samplers import BeamSampler, ContrastiveSampler

    prompts = ["Hello there", "Tell me", "Why is the sky"]
    path = write_prompts(tmp_path / "in.parquet", prompts, ids=[1, 2, 3])
    spec = make_spec(path, str(tmp_path / "out"), sampling={**sampling, "max_new_tokens": 5})
    rows = run_all(spec, runner)
    sampler = BeamSampler(num_beams=3) if sampling["sampler"] == "beam" else ContrastiveSampler(k=3, alpha=0.4)
    ids = [runner.tokenizer.tokenize(p) for p in prompts]
    from model.generation.search import bind_backbone

    expected = sampler.search(bind_backbone(runner.lm.backbone), ids, [5] * 3, runner.stop_token_ids,
                              runner.engine.max_length, tokenizer=runner.tokenizer)
    assert [r["completion"] for r in rows] == [c.text for c in expected]
    assert [r["completion_tokens"] for r in rows] == [c.completion_tokens for c in expected]
    assert all(r["error"] is None for r in rows)


def test_response_format_and_penalty_columns_apply_per_row(tmp_path, runner):
    from model.generation.requests import Request

    sampling = {"max_new_tokens": 8, "stop_token_ids": []}
    banned = runner.engine.generate([Request(0, runner.tokenizer.tokenize("a"), 8)])[0].token_ids[0]  # greedy's first
    path = write_prompts(
        tmp_path / "in.parquet", ["a", "b", "a", "d"], ids=[1, 2, 3, 4],
        extra={
            "response_format": [None, '{"type": "regex", "regex": "[0-9]{3}"}', None, '{"type": "text"}'],
            "logit_bias": [None, None, json.dumps({str(banned): -100}), None],
            "repetition_penalty": [None, None, 1.5, None],
        },
    )
    rows = run_all(make_spec(path, str(tmp_path / "out"), sampling=sampling), runner)
    assert rows[0]["error"] is None and rows[3]["error"] is None  # {"type": "text"} is plain generation
    assert rows[1]["error"] is None and rows[1]["finish_reason"] == "stop"
    assert len(rows[1]["completion"]) == 3 and rows[1]["completion"].isdigit()
    # Row 3 has row 1's prompt, with its first greedy token banned: it generates, differently.
    assert rows[2]["error"] is None and rows[2]["completion"] != rows[0]["completion"]


def test_a_jsonl_shard_writes_jsonl_rows_with_carried_values(tmp_path, runner):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Hi {i}", "meta": {"k": i}}) + "\n" for i in range(5)))
    spec = make_spec(str(path), str(tmp_path / "out"), input={"format": "jsonl"}, output={"format": "jsonl", "carry_columns": ["meta"]},
                     sampling={"n": 2, "sampler": "random"}, execution={"rows_per_shard": 2})
    rows = run_all(spec, runner)
    assert [(r["id"], r["sample_index"]) for r in rows] == [(f"r{i}", s) for i in range(5) for s in range(2)]
    assert [r["meta"] for r in rows] == [{"k": i} for i in range(5) for _ in range(2)]
    assert all(r["error"] is None and isinstance(r["completion"], str) for r in rows)


def test_an_openai_batch_shard_answers_each_custom_id_once_with_its_n(tmp_path, runner):
    requests = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 3, "n": i + 1}}
        for i in range(3)
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    spec = make_spec(str(path), str(tmp_path / "out"), input={"format": "openai_batch", "prompt_column": "", "id_column": ""},
                     output={"format": "openai_batch"}, sampling={"sampler": "random"})
    lines = run_all(spec, runner)
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2"]
    assert [len(line["response"]["body"]["choices"]) for line in lines] == [1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for line in lines for c in line["response"]["body"]["choices"])


def test_the_samples_of_a_row_compute_its_prompt_once_and_the_shard_says_so(tmp_path, runner):
    prompts = ["Once upon a time there was", "The weather today", "Tell me about the sea"]
    path = write_prompts(tmp_path / "in.parquet", prompts, ids=[1, 2, 3])
    sampling = {"sampler": "random", "temperature": 1.0, "max_new_tokens": 4, "n": 4, "seed": 5}
    spec = make_spec(path, str(tmp_path / "out"), sampling=sampling)
    plan = plan_job(spec)
    worker = ShardWorker(spec, plan.schema, runner=runner)
    worker.sink.prepare({"fingerprint": spec.fingerprint(), "shards": [{"shard_id": s.shard_id} for s in plan.shards]}, False)
    results = [worker.run_shard(shard, attempt=1) for shard in plan.shards]
    lengths = [len(runner.tokenizer.tokenize(p)) for p in prompts]
    assert sum(r.prompt_tokens for r in results) == 4 * sum(lengths)  # received: every sample's prompt
    # Computed: each prompt once, plus its last token again for each of the 3 other samples.
    assert sum(r.prompt_tokens_computed for r in results) == sum(lengths) + 3 * len(prompts)
