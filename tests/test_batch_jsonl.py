"""JSONL and OpenAI Batch input and output without a model: planning by line ranges (plain and gzip), reading a
shard's rows, request parsing, and the Batch API output shape."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from batchgen.errors import InputError, SpecError
from batchgen.jsonl_input import read_objects, scan_file
from batchgen.openai_batch import output_lines, request_columns
from batchgen.planning import plan_job
from batchgen.prompts import prompt_rows
from batchgen.rows import OutputRecord, error_record
from batchgen.shard_io import read_shard
from batchgen.sink import Sink
from tests.batch_fixtures import make_spec


def write_jsonl(path: Path, objects: list, *, raw_lines: dict[int, str] | None = None) -> str:
    lines = [json.dumps(o) for o in objects]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


def request(custom_id: str, **body) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {custom_id}"}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz"])
def test_jsonl_is_cut_by_row_ranges_that_cover_every_row_once_and_read_back_exactly(tmp_path, name):
    objects = [{"id": i, "prompt": f"p{i}"} for i in range(10)]
    # A blank line is no row; a line that is not JSON is one (an error row, not a lost one).
    path = write_jsonl(tmp_path / name, objects, raw_lines={3: "", 6: "{oops"})
    spec = make_spec(path, str(tmp_path / "out"), input={"format": "jsonl"}, execution={"rows_per_shard": 4})
    plan = plan_job(spec)
    assert plan.total_rows == 11
    assert [(s.row_start, s.row_stop) for s in plan.shards] == [(0, 3), (3, 7), (7, 11)]
    assert all((s.byte_start is None) == name.endswith(".gz") for s in plan.shards)
    assert plan_job(spec).shards == plan.shards  # deterministic ids

    rows = []
    for shard in plan.shards:
        source = read_shard(spec, shard, ["prompt", "id"])
        rows += prompt_rows(source.columns, spec, shard.first_position, source.row_errors)
    assert [r.text for r in rows if r.error is None] == [f"p{i}" for i in range(10)]
    (bad,) = [r for r in rows if r.error]
    assert bad.index == 2 and "row 5: not valid JSON" in bad.error  # row 5 of the file = 3rd row of shard 1


def test_byte_offsets_point_at_each_shards_first_row(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * i} for i in range(5)])
    file = scan_file(path)
    assert file.num_rows == 5
    for start in range(5):
        (row,) = read_objects(path, start, start + 1, file.offsets[start])
        assert row == {"prompt": "x" * start}
    with pytest.raises(InputError, match="asked for rows 3..9 but found 2"):
        read_objects(path, 3, 9, file.offsets[3])


def test_a_jsonl_column_missing_from_the_first_rows_is_an_input_error(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "id": 1}])
    with pytest.raises(InputError, match=r"columns \['prompt'\]"):
        plan_job(make_spec(path, str(tmp_path / "out"), input={"format": "jsonl"}))


def test_openai_requests_become_messages_ids_and_overrides_and_bad_ones_error_rows(tmp_path):
    lines = [
        request("a", max_tokens=7, temperature=0.2, top_p=0.5, stop=["\n"], n=3, seed=4),
        request("b", tools=[{"type": "function"}]),
        {"custom_id": "c", "url": "/v1/embeddings", "body": {}},
        request("d", response_format={"type": "json_object"}, logit_bias={"5": -100}),
        request("e", max_tokens=0),
        "not an object",
    ]
    path = write_jsonl(tmp_path / "batch.jsonl", lines)
    spec = make_spec(path, str(tmp_path / "out"), input={"format": "openai_batch", "prompt_column": "", "id_column": ""},
                     execution={"rows_per_shard": 10})
    assert (spec.input.messages_column, spec.input.id_column) == ("messages", "custom_id")
    plan = plan_job(spec)
    source = read_shard(spec, plan.shards[0], [])
    rows = prompt_rows(source.columns, spec, 0, source.row_errors)
    a, b, c, d, e, f = rows
    assert a.error is None and a.n == 3 and a.row_id == "a"
    assert a.messages == [{"role": "user", "content": "hi a"}]
    assert a.overrides == {"sampler": "top_p", "max_new_tokens": 7, "temperature": 0.2, "top_p": 0.5,
                           "stop_strings": ("\n",), "seed": 4}
    assert "custom_id 'b': body keys ['tools'] are not supported" in b.error
    assert "url '/v1/embeddings' is not supported" in c.error
    assert d.overrides["response_format"] == '{"type":"json_object"}' and d.overrides["logit_bias"] == ((5, -100.0),)
    assert e.error == "row 'e': column 'max_new_tokens' holds 0: must be an integer >= 1"
    assert f.error.endswith("row 5: a JSON str, not an object") and f.row_id is None


def test_openai_spec_refuses_columns_it_fixes_and_multiple_configs_for_openai_output():
    with pytest.raises(SpecError, match="input.prompt_column must be unset"):
        make_spec("x", "y", input={"format": "openai_batch", "id_column": ""})
    with pytest.raises(SpecError, match="one sampling configuration"):
        make_spec("x", "y", output={"format": "openai_batch"},
                  sampling={"configs": {"a": {}, "b": {"temperature": 0.5}}})
    with pytest.raises(SpecError, match="output.compression must be 'none' or 'gzip'"):
        make_spec("x", "y", output={"format": "jsonl", "compression": "zstd"})
    assert make_spec("x", "y", output={"format": "jsonl"}).output.compression == "none"


def test_openai_output_has_one_line_per_custom_id_with_n_choices_and_errors_apart():
    records = [
        OutputRecord(0, "default", 1, "second", "length", 5, 4),
        OutputRecord(0, "default", 0, "first", "stop", 5, 2),
        error_record(1, "default", 0, "row 'b': too long"),
    ]
    lines = [json.loads(line) for line in output_lines(records, ["a", "b"], "smol", "f" * 16, created=123)]
    first, second = lines
    assert first["custom_id"] == "a" and first["error"] is None and first["id"].startswith("batch_req_")
    body = first["response"]["body"]
    assert first["response"]["status_code"] == 200 and body["object"] == "chat.completion" and body["model"] == "smol"
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "first", "stop"), (1, "second", "length")]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert second["response"] is None and second["error"]["message"] == "row 'b': too long"
    # Ids are stable across reruns of the same job.
    assert output_lines(records, ["a", "b"], "smol", "f" * 16, created=999)[0].count(first["id"]) == 1


def test_jsonl_parts_are_published_whole_and_committed_by_their_own_suffix(tmp_path):
    sink = Sink(str(tmp_path / "out"), output_format="jsonl", compression="gzip")
    sink.prepare({"fingerprint": "f", "shards": [{"shard_id": "s1"}, {"shard_id": "s2"}]}, overwrite=False)
    url = sink.write_lines("s1", ['{"a": 1}', '{"a": 2}'])
    assert url.endswith("part-s1.jsonl.gz")

    def failing():
        yield '{"a": 3}'
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError):
        sink.write_lines("s2", failing())
    assert not (tmp_path / "out" / "part-s2.jsonl.gz").exists()
    sink.commit({"shard_id": "s1"})
    assert set(sink.committed()) == {"s1"}
    assert list(sink.read_lines()) == [{"a": 1}, {"a": 2}]
