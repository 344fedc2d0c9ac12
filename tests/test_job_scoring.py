"""Scoring jobs in-process on a tiny model: [task] kind = "score" / "perplexity", metrics, sweeps over models."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import metrics
from batchgen.model_runner import ModelRunner
from batchgen.planning import plan_job
from batchgen.spec import JobSpec
from batchgen.summary import summarize
from batchgen.driver import DriverReport
from batchgen.worker import ShardWorker
from tests.batch_fixtures import make_spec, tiny_preset, write_prompts  # noqa: F401 (a fixture)

QUESTIONS = ["The quick brown", "Llamas live in", "In 1969, three", None, "Once upon a", "The ocean is"]
CHOICES = [[" fox", " dog", " cat"], [" herds", " houses"], [" astronauts"], [" x"], [], [" deep", " wide", " dry", " blue"]]
ANSWERS = [0, 1, 0, 0, 0, 2]
SCORE = {"kind": "score", "continuations_column": "choices", "reference_column": "answer", "metric": "accuracy"}


@pytest.fixture(scope="module")
def runner(tiny_preset) -> ModelRunner:
    spec = make_spec("x", "y", preset=tiny_preset)
    return ModelRunner.load(spec.model, spec.model.max_slots, spec.execution.compilation_cache)


def _input(tmp_path) -> str:
    extra = {"choices": pa.array(CHOICES, pa.list_(pa.string())), "answer": pa.array(ANSWERS, pa.int64())}
    return write_prompts(tmp_path / "in.parquet", QUESTIONS, ids=list(range(10, 16)), extra=extra)


def _run(spec: JobSpec, runner: ModelRunner):
    plan = plan_job(spec)
    worker = ShardWorker(spec, plan.schema, runner=runner)
    results = [worker.run_shard(shard, attempt=1) for shard in plan.shards]
    table = pa.concat_tables(pq.read_table(f"{spec.output.url}/part-{s.shard_id}.parquet") for s in plan.shards)
    return plan, results, table


def test_a_score_job_gives_each_row_its_continuations_log_likelihoods(tmp_path, runner, tiny_preset):
    spec = make_spec(_input(tmp_path), str(tmp_path / "out"), preset=tiny_preset, task=SCORE)
    plan, results, table = _run(spec, runner)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(10, 16))  # one row per input row, none dropped
    tokenizer = runner.tokenizer
    from model.generation.scoring import ScoreRequest, split_pair

    for row, question, choices in zip(rows, QUESTIONS, CHOICES):
        if question is None or not choices:
            assert row["error"] and row["logprobs"] is None and row["prediction"] is None
            continue
        assert row["error"] is None and len(row["logprobs"]) == len(choices)
        # The same pairs scored one by one through the engine: whatever the packing, the same figures.
        for j, choice in enumerate(choices):
            context, continuation = split_pair(tokenizer.tokenize, tokenizer._encode, question, choice)
            [alone] = runner.engine.score_stream([ScoreRequest(0, context, continuation)])
            assert row["logprobs"][j] == pytest.approx(alone.logprob, abs=1e-4)
            assert row["continuation_tokens"][j] == len(continuation)
            assert row["is_greedy"][j] == alone.is_greedy
        assert row["prediction"] == int(np.argmax(row["logprobs"]))
    # Accuracy over the rows that could be scored, from the shards' sums, as the summary aggregates it.
    scored = [r for r, a in zip(rows, ANSWERS) if r["error"] is None]
    expected = np.mean([r["prediction"] == a for r, a in zip(rows, ANSWERS) if r["error"] is None])
    summary = summarize(spec, plan, {r.shard_id: r.manifest_entry() for r in results}, 0, DriverReport(), 0.0, 1.0)
    assert summary.metrics["default/default"]["value"] == pytest.approx(expected)
    assert summary.metrics["default/default"]["count"] == len(scored)
    assert "accuracy" in summary.render()
    assert summary.completion_tokens == 0 and summary.prompt_tokens > 0


def test_a_perplexity_job_rolls_documents_longer_than_the_context(tmp_path, runner, tiny_preset):
    document = " ".join(["llamas carry loads over the mountains and live in herds"] * 12)
    path = write_prompts(tmp_path / "docs.parquet", [document, "short text here"], ids=[1, 2])
    task = {"kind": "perplexity", "metric": "perplexity"}
    spec = make_spec(path, str(tmp_path / "out"), preset=tiny_preset, task=task)  # max_length 64
    plan, results, table = _run(spec, runner)
    rows = table.to_pylist()
    ids = runner.tokenizer.tokenize(document)
    assert len(ids) > 64 and rows[0]["error"] is None
    assert rows[0]["continuation_tokens"] == [len(ids) - 1]  # every token but the first, in rolling windows
    summary = summarize(spec, plan, {r.shard_id: r.manifest_entry() for r in results}, 0, DriverReport(), 0.0, 1.0)
    total = sum(r["logprobs"][0] for r in rows)
    tokens = sum(r["continuation_tokens"][0] for r in rows)
    assert summary.metrics["default/default"]["value"] == pytest.approx(math.exp(-total / tokens))


def test_a_sweep_over_models_loads_each_model_once_per_worker(tmp_path, tiny_preset, monkeypatch):
    models = {"f32": {"dtype": "float32"}, "q8": {"quantization": "int8"}}
    spec = make_spec(_input(tmp_path), str(tmp_path / "out"), preset=tiny_preset, task=SCORE,
                     model={"configs": models})  # fmt: skip
    plan = plan_job(spec)
    # Model-major: every shard of one model before the other's; ids differ per model.
    assert [s.model for s in plan.shards] == ["f32"] * 2 + ["q8"] * 2
    assert len({s.shard_id for s in plan.shards}) == 4
    loads = []
    real_load = ModelRunner.load

    def counting_load(model, *args, **kwargs):
        loads.append((model.name, model.quantization))
        return real_load(model, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "load", staticmethod(counting_load))
    worker = ShardWorker(spec, plan.schema)
    results = [worker.run_shard(shard, attempt=1) for shard in plan.shards]
    assert loads == [("f32", "none"), ("q8", "int8")]
    table = pa.concat_tables(pq.read_table(f"{spec.output.url}/part-{s.shard_id}.parquet") for s in plan.shards)
    assert table.column("model").to_pylist() == ["f32"] * 6 + ["q8"] * 6
    summary = summarize(spec, plan, {r.shard_id: r.manifest_entry() for r in results}, 0, DriverReport(), 0.0, 1.0)
    assert set(summary.metrics) == {"f32/default", "q8/default"}
    assert summary.expected_rows == 12 and summary.rows_ok + summary.rows_error == 12


def test_a_generation_sweep_over_models_crosses_sampling_configurations(tmp_path, tiny_preset):
    path = write_prompts(tmp_path / "in.parquet", ["a b", "c d"], ids=[1, 2], extra={"ref": ["x", "y"]})
    spec = make_spec(path, str(tmp_path / "out"), preset=tiny_preset,
                     model={"configs": {"one": {}, "two": {"dtype": "bfloat16"}}},
                     task={"metric": "exact_match", "reference_column": "ref"},
                     sampling={"configs": {"g": {"sampler": "greedy"}, "r": {"sampler": "random", "n": 2}}})  # fmt: skip
    assert spec.outputs_per_row == 6
    plan = plan_job(spec)
    worker = ShardWorker(spec, plan.schema)
    results = [worker.run_shard(shard, attempt=1) for shard in plan.shards]
    table = pa.concat_tables(pq.read_table(f"{spec.output.url}/part-{s.shard_id}.parquet") for s in plan.shards)
    pairs = sorted(set(zip(table.column("model").to_pylist(), table.column("config").to_pylist())))
    assert pairs == [("one", "g"), ("one", "r"), ("two", "g"), ("two", "r")]
    assert table.num_rows == 12
    merged = metrics.merge(r.metrics for r in results)
    assert set(merged) == {"one/g", "one/r", "two/g", "two/r"}
    assert merged["one/r"]["count"] == 4  # 2 rows x 2 samples


def test_driver_hands_a_worker_shards_of_the_model_it_holds():
    from collections import deque

    from batchgen.driver import ShardDriver
    from batchgen.planning import Shard
    from batchgen.spec import ExecutionSpec

    class Actor:
        def __init__(self):
            self.got = []
            self.run_shard = self

        def remote(self, shard, attempt):
            self.got.append(shard.model)
            return object()

    shards = [Shard(f"s{i}", i, "f", i, i + 1, i, model=m) for i, m in enumerate(["a", "a", "b", "b"])]
    driver = ShardDriver(lambda: None, ExecutionSpec(), lambda r: None)
    driver._pending, driver._running, driver._attempts = deque(shards), {}, __import__("collections").Counter()
    worker = Actor()
    driver._models = {worker: "b"}
    driver._idle = [worker]
    driver._hand_out()
    assert worker.got == ["b"]  # not the queue's head, which is of model a
    assert [s.model for s in driver._pending] == ["a", "a", "b"]


def test_metric_helpers():
    assert metrics.normalize("  The Paris!  ") == "paris"
    assert metrics.exact_match("An apple.", ["pear", "apple"]) == 1.0
    assert metrics.exact_match("apples", "apple") == 0.0
    assert metrics.exact_match(None, "x") is None
    assert metrics.accuracy([-3.0, -1.0, -2.0], 1, [" a", " b", " c"]) == 1.0
    assert metrics.accuracy([-3.0, -1.0, -2.0], " c", [" a", " b", " c"]) == 0.0
    assert metrics.accuracy([-3.0], 5, [" a"]) is None  # a reference out of range is no answer, not a miss
    parts = [{"m/c": {"metric": "perplexity", "sum": -2.0, "count": 1.0}},
             {"m/c": {"metric": "perplexity", "sum": -4.0, "count": 3.0}}]  # fmt: skip
    assert metrics.merge(parts)["m/c"]["value"] == pytest.approx(math.exp(6.0 / 4.0))
