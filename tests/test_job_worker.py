"""A worker in-process on a tiny model: the row contract with real generation, bad rows, samples, sweeps, seeds."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.model_runner import ModelRunner
from batchgen.planning import plan_job
from batchgen.spec import JobSpec
from batchgen.worker import ShardWorker
from tests.batch_fixtures import make_spec, tiny_preset, write_prompts  # noqa: F401 (a fixture)

SWEEP = {
    "sampler": "random",
    "max_new_tokens": 5,
    "seed": 11,
    "configs": {"greedy": {"sampler": "greedy"}, "hot": {"temperature": 1.5, "n": 3}},
}


@pytest.fixture(scope="module")
def runner(tiny_preset) -> ModelRunner:
    """One loaded tiny model for the module (loading is what takes time)."""
    spec = make_spec("x", "y", preset=tiny_preset)
    return ModelRunner.load(spec.model, spec.model.max_slots, spec.execution.compilation_cache)


def run_all(spec: JobSpec, runner: ModelRunner) -> pa.Table:
    plan = plan_job(spec)
    worker = ShardWorker(spec, plan.schema, runner=runner)
    results = [worker.run_shard(shard, attempt=1) for shard in plan.shards]
    assert all(r.output_rows == r.input_rows * spec.outputs_per_row for r in results)
    parts = [pq.read_table(f"{spec.output.url}/part-{s.shard_id}.parquet") for s in plan.shards]
    return pa.concat_tables(parts)


def test_every_row_yields_n_rows_per_configuration_bad_rows_included(tmp_path, runner):
    prompts = ["Hello there", None, "", "Tell me a story", "x" * 400, "abc", "  ", "why?"]
    path = write_prompts(tmp_path / "in.parquet", prompts, ids=[f"r{i}" for i in range(8)], row_group_size=3,
                         extra={"topic": list("abcdefgh")})
    spec = make_spec(path, str(tmp_path / "out"), preset="unused", sampling=SWEEP, output={"carry_columns": ["topic"]})
    table = run_all(spec, runner)

    assert table.num_rows == 8 * 4
    keys = list(zip(table["id"].to_pylist(), table["config"].to_pylist(), table["sample_index"].to_pylist()))
    expected = [(f"r{i}", c, s) for i in range(8) for c, n in (("greedy", 1), ("hot", 3)) for s in range(n)]
    assert keys == expected  # every row exactly once per sample, in input order
    assert table["topic"].to_pylist() == [t for t in "abcdefgh" for _ in range(4)]

    rows = {(r["id"], r["config"], r["sample_index"]): r for r in table.to_pylist()}
    for bad, reason in [("r1", "is null"), ("r2", "is empty"), ("r6", "is empty"), ("r4", "no room for a new token")]:
        for key in [(bad, "greedy", 0), (bad, "hot", 2)]:
            row = rows[key]
            assert row["finish_reason"] == "error" and reason in row["error"] and row["completion"] is None
    assert rows[("r4", "greedy", 0)]["prompt_tokens"] > 64  # the too-long prompt's length is reported
    good = [r for r in table.to_pylist() if r["id"] in ("r0", "r3", "r5", "r7")]
    assert all(r["finish_reason"] in ("stop", "length") and r["error"] is None for r in good)
    assert all(r["completion_tokens"] <= 5 and r["prompt_tokens"] > 0 for r in good)
    assert all(isinstance(r["completion"], str) for r in good)


def test_samples_differ_and_reruns_reproduce_them(tmp_path, runner):
    path = write_prompts(tmp_path / "in.parquet", ["Once upon a time", "Hello"], ids=[1, 2])
    spec = make_spec(path, str(tmp_path / "a"), sampling={**SWEEP, "max_new_tokens": 8})
    first = run_all(spec, runner)
    # Another output and other shard boundaries: the seeds depend on (seed, id, sample) only.
    again = run_all(make_spec(path, str(tmp_path / "b"), sampling={**SWEEP, "max_new_tokens": 8},
                              execution={"rows_per_shard": 1}), runner)
    assert first["completion"].to_pylist() == again["completion"].to_pylist()
    hot = [r["completion"] for r in first.to_pylist() if r["config"] == "hot" and r["id"] == 1]
    assert len(set(hot)) > 1, "three samples at temperature 1.5 should not all be equal"
    reseeded = run_all(make_spec(path, str(tmp_path / "c"), sampling={**SWEEP, "max_new_tokens": 8, "seed": 12}), runner)
    assert reseeded["completion"].to_pylist() != first["completion"].to_pylist()


def test_per_row_overrides_apply_where_the_column_exists(tmp_path, runner):
    path = write_prompts(
        tmp_path / "in.parquet",
        ["Hello", "Hello", "Hello"],
        ids=[1, 2, 3],
        extra={"max_new_tokens": [2, None, -1], "temperature": [0.0, 0.0, 0.0]},
    )
    spec = make_spec(path, str(tmp_path / "out"), sampling={"max_new_tokens": 6, "stop_token_ids": []})
    rows = run_all(spec, runner).to_pylist()
    assert [r["completion_tokens"] for r in rows[:2]] == [2, 6]
    assert rows[2]["finish_reason"] == "error" and "row 3: column 'max_new_tokens' holds -1: must be an integer >= 1" in rows[2]["error"]


def test_a_per_row_seed_column_reseeds_only_its_rows(tmp_path, runner):
    sampling = {"sampler": "random", "temperature": 1.5, "max_new_tokens": 8}

    def completions(seeds):
        out = tmp_path / f"out-{'-'.join(map(str, seeds))}"
        path = write_prompts(tmp_path / f"in-{out.name}.parquet", ["Once upon", "Once upon"], ids=[1, 2], extra={"seed": seeds})
        return run_all(make_spec(path, str(out), sampling=sampling), runner)["completion"].to_pylist()

    base, changed = completions([7, 7]), completions([7, 8])
    assert base[0] == changed[0] and base[1] != changed[1]


def test_chat_messages_go_through_the_template_and_malformed_ones_are_error_rows(tmp_path, runner):
    type_ = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": None}],
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "messages": pa.array(messages, type_)}), path)
    spec = make_spec(str(path), str(tmp_path / "out"), input={"prompt_column": "", "messages_column": "messages"})
    rows = run_all(spec, runner).to_pylist()
    rendered = runner.tokenizer.apply_chat_template(messages[0])
    start = runner.tokenizer.start_token_id
    expected_ids = runner.tokenizer.tokenize(rendered)
    if expected_ids[:2] == [start, start]:
        expected_ids = expected_ids[1:]
    assert rows[0]["prompt_tokens"] == len(expected_ids) and rows[0]["error"] is None
    assert runner.prompt_ids(plan_prompt_row(messages[0])).count(start) <= 1  # the start token is not doubled
    assert rows[1]["finish_reason"] == "error" and "has no string content" in rows[1]["error"]


def plan_prompt_row(messages):
    from batchgen.prompts import PromptRow

    return PromptRow(index=0, row_id=1, messages=messages)


def test_prompt_tokens_of_error_rows_are_counted_apart_in_the_shard_summary_and_status(tmp_path, runner):
    from batchgen.driver import DriverReport
    from batchgen.sink import Sink, job_record
    from batchgen.status import read_status
    from batchgen.summary import summarize

    # One over-long row (an error row whose prompt was tokenized but never run) beside two good ones.
    path = write_prompts(tmp_path / "in.parquet", ["Hello there", "x" * 400, "why?"], ids=["a", "long", "b"])
    spec = make_spec(path, str(tmp_path / "out"), sampling={"max_new_tokens": 3})
    plan = plan_job(spec)
    sink = Sink(spec.output.url)
    sink.prepare(job_record(spec.fingerprint(), spec.to_dict(), spec.source, [{"shard_id": plan.shards[0].shard_id}]), False)
    worker = ShardWorker(spec, plan.schema, runner=runner)
    result = worker.run_shard(plan.shards[0], attempt=1)
    rows = {r["id"]: r for r in pq.read_table(f"{spec.output.url}/part-{plan.shards[0].shard_id}.parquet").to_pylist()}
    assert rows["long"]["finish_reason"] == "error" and rows["long"]["prompt_tokens"] > 64
    assert result.prompt_tokens == rows["a"]["prompt_tokens"] + rows["b"]["prompt_tokens"]
    assert result.error_prompt_tokens == rows["long"]["prompt_tokens"]
    sink.commit(result.manifest_entry())
    summary = summarize(spec, plan, {result.shard_id: result.manifest_entry()}, 0, DriverReport(), 0.0, 1.0)
    assert (summary.prompt_tokens, summary.error_prompt_tokens) == (result.prompt_tokens, result.error_prompt_tokens)
    assert f"{result.error_prompt_tokens} prompt tokens in error rows" in summary.render()
    status = read_status(spec.output.url)
    assert (status.prompt_tokens, status.error_prompt_tokens) == (result.prompt_tokens, result.error_prompt_tokens)
