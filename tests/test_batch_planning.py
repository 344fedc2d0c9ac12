"""Planning: shards on row-group boundaries from footers alone, large row groups split, deterministic ids."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import InputError
from batchgen.inputs import InputFile, list_input_files, read_footers, read_rows
from batchgen.planning import cut_shards, plan_job
from tests.batch_fixtures import make_spec, write_prompts


def test_small_row_groups_are_packed_up_to_rows_per_shard_without_splitting_any():
    file = InputFile("file:///a.parquet", (3, 3, 3, 3, 2), first_position=10)
    shards = cut_shards([file], rows_per_shard=7, fingerprint="f")
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 6), (6, 12), (12, 14)]
    assert [s.first_position for s in shards] == [10, 16, 22]
    assert [s.index for s in shards] == [0, 1, 2]


def test_a_large_row_group_is_split_by_row_range_into_near_equal_pieces():
    file = InputFile("file:///a.parquet", (2, 10, 1), first_position=0)
    shards = cut_shards([file], rows_per_shard=4, fingerprint="f")
    # [0, 2) stands alone; the 10-row group [2, 12) becomes 3 pieces of at most 4; the last group follows.
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 2), (2, 5), (5, 8), (8, 12), (12, 13)]
    assert all(s.num_rows <= 4 for s in shards)


def test_shards_never_cross_files_and_cover_every_row_once():
    files = [InputFile("file:///a", (5, 5), 0), InputFile("file:///b", (1,), 10), InputFile("file:///c", (), 11)]
    shards = cut_shards(files, rows_per_shard=6, fingerprint="f")
    covered = [(s.file_url, row) for s in shards for row in range(s.row_start, s.row_stop)]
    assert covered == [("file:///a", r) for r in range(10)] + [("file:///b", 0)]
    assert {s.file_url for s in shards} == {"file:///a", "file:///b"}


def test_shard_ids_are_deterministic_and_depend_on_file_range_and_fingerprint():
    file = InputFile("file:///a.parquet", (4, 4), 0)
    first = cut_shards([file], 4, "f1")
    assert [s.shard_id for s in first] == [s.shard_id for s in cut_shards([file], 4, "f1")]
    assert len({s.shard_id for s in first}) == 2
    assert not {s.shard_id for s in first} & {s.shard_id for s in cut_shards([file], 4, "f2")}
    other_file = InputFile("file:///b.parquet", (4, 4), 0)
    assert not {s.shard_id for s in first} & {s.shard_id for s in cut_shards([other_file], 4, "f1")}


def test_plan_reads_a_directory_glob_or_file_in_sorted_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_prompts(data / "b.parquet", ["x"] * 5, ids=range(5), row_group_size=2)
    write_prompts(data / "a.parquet", ["y"] * 3, ids=range(3), row_group_size=3)
    (data / "_SUCCESS").write_text("")
    (data / "notes.txt").write_text("not parquet")
    by_dir = list_input_files(str(data))
    assert [u.rsplit("/", 1)[-1] for u in by_dir] == ["a.parquet", "b.parquet"]
    assert list_input_files(str(data / "*.parquet")) == by_dir
    assert list_input_files(str(data / "a.parquet")) == by_dir[:1]

    plan = plan_job(make_spec(str(data), str(tmp_path / "out"), execution={"rows_per_shard": 4}))
    assert plan.total_rows == 8
    assert [(s.file_url.rsplit("/", 1)[-1], s.row_start, s.row_stop, s.first_position) for s in plan.shards] == [
        ("a.parquet", 0, 3, 0),
        ("b.parquet", 0, 4, 3),
        ("b.parquet", 4, 5, 7),
    ]


def test_plan_works_from_footers_through_fsspec(tmp_path):
    # memory:// is a filesystem pyarrow knows nothing about: everything goes through fsspec.
    fs = fsspec.filesystem("memory")
    with fs.open("/plan-test/in.parquet", "wb") as handle:
        pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a", "b", "c"]}), handle, row_group_size=1)
    files, schemas = read_footers(list_input_files("memory://plan-test"))
    assert files[0].row_group_rows == (1, 1, 1) and schemas[0].names == ["id", "prompt"]
    assert read_rows(files[0].url, 1, 3, ["prompt"]).column("prompt").to_pylist() == ["b", "c"]
    fs.rm("/plan-test", recursive=True)


def test_read_rows_reads_only_the_shard_range_across_row_groups(tmp_path):
    path = write_prompts(tmp_path / "in.parquet", [f"p{i}" for i in range(10)], ids=range(10), row_group_size=3)
    table = read_rows(path, 2, 7, ["id", "prompt"])
    assert table.column("id").to_pylist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "spec_changes, message",
    [
        ({"input": {"prompt_column": "text"}}, "input.prompt_column names column 'text'"),
        ({"input": {"id_column": "key"}}, "input.id_column names column 'key'"),
        ({"output": {"carry_columns": ["topic"]}}, "output.carry_columns names column 'topic'"),
    ],
)
def test_a_missing_column_is_an_input_error_naming_file_and_key(tmp_path, spec_changes, message):
    path = write_prompts(tmp_path / "in.parquet", ["a"], ids=[1])
    with pytest.raises(InputError, match=message) as raised:
        plan_job(make_spec(path, str(tmp_path / "out"), **spec_changes))
    assert "in.parquet" in str(raised.value)


def test_missing_input_and_bad_override_columns_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        plan_job(make_spec(str(tmp_path / "nope.parquet"), str(tmp_path / "out")))
    with pytest.raises(InputError, match="matches no Parquet files"):
        plan_job(make_spec(str(tmp_path / "*.parquet"), str(tmp_path / "out")))
    path = write_prompts(tmp_path / "in.parquet", ["a"], ids=[1], extra={"temperature": ["hot"]})
    with pytest.raises(InputError, match="override column 'temperature' must hold numbers"):
        plan_job(make_spec(path, str(tmp_path / "out")))
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(InputError, match="cannot read the Parquet footer"):
        plan_job(make_spec(str(tmp_path / "bad.parquet"), str(tmp_path / "out")))


def test_a_prompt_column_of_the_wrong_type_is_a_warning_not_an_error(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1], "prompt": [5]}), path)
    plan = plan_job(make_spec(str(path), str(tmp_path / "out")))
    assert "is int64, not strings" in plan.warnings[0]
