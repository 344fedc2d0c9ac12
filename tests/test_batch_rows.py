"""The row contract (exactly once, output schema and order) and how input rows become prompts or error rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchgen.errors import RowContractError
from batchgen.prompts import prompt_rows
from batchgen.rows import CONTRACT_COLUMNS, OutputRecord, build_table, check_exactly_once, error_record, output_schema
from model.generation.seeds import derive_seed
from tests.batch_fixtures import make_spec

SAMPLES = [("greedy", 1), ("hot", 2)]


def records_for(rows: int) -> list[OutputRecord]:
    return [
        OutputRecord(row, name, index, f"text {row} {name} {index}", "stop", 3, 2)
        for row in range(rows)
        for name, n in SAMPLES
        for index in range(n)
    ]


def test_exactly_once_accepts_a_complete_shard_in_any_order():
    check_exactly_once(list(reversed(records_for(3))), 3, SAMPLES, "s")


def test_exactly_once_raises_on_a_missing_row():
    records = records_for(3)
    del records[4]
    with pytest.raises(RowContractError, match=r"shard s breaks the row contract: 1 missing .*\(1, 'hot', 0\)"):
        check_exactly_once(records, 3, SAMPLES, "s")


def test_exactly_once_raises_on_a_duplicated_or_unexpected_row():
    records = records_for(2)
    with pytest.raises(RowContractError, match=r"1 duplicated \[\(0, 'greedy', 0\)\]"):
        check_exactly_once(records + [records[0]], 2, SAMPLES, "s")
    with pytest.raises(RowContractError, match=r"1 unexpected \[\(0, 'hot', 2\)\]"):
        check_exactly_once(records + [OutputRecord(0, "hot", 2, "", "stop", 1, 1)], 2, SAMPLES, "s")
    with pytest.raises(RowContractError, match=r"unknown finish_reason \['timeout'\]"):
        bad = records[:-1] + [OutputRecord(1, "hot", 1, "", "timeout", 1, 1)]
        check_exactly_once(bad, 2, SAMPLES, "s")


def test_build_table_orders_rows_and_carries_input_columns():
    schema = output_schema(pa.string(), [pa.field("topic", pa.string()), pa.field("score", pa.float64())])
    assert schema.names[: len(CONTRACT_COLUMNS)] == list(CONTRACT_COLUMNS)
    records = list(reversed(records_for(2)))
    records[0] = error_record(1, "hot", 1, "boom", prompt_tokens=5)
    carried = pa.table({"topic": ["a", "b"], "score": [0.5, 1.5]})
    table = build_table(records, pa.array(["r0", "r1"]), carried, schema, ["greedy", "hot"])
    assert table.schema == schema
    assert table.column("id").to_pylist() == ["r0"] * 3 + ["r1"] * 3
    assert table.column("config").to_pylist() == ["greedy", "hot", "hot"] * 2
    assert table.column("sample_index").to_pylist() == [0, 0, 1] * 2
    assert table.column("topic").to_pylist() == ["a"] * 3 + ["b"] * 3
    last = table.slice(5).to_pylist()[0]
    assert last["finish_reason"] == "error" and last["error"] == "boom" and last["completion"] is None
    assert last["prompt_tokens"] == 5 and last["completion_tokens"] == 0


def test_bad_prompts_become_error_rows_with_the_reason(tmp_path):
    spec = make_spec("x", "y")
    table = pa.table(
        {
            "id": [1, 2, 3, 4, None, 6, 7],
            "prompt": ["fine", None, "", "   ", "orphan", "ok", "ok"],
            "max_new_tokens": [None, None, None, None, None, 0, 5],
        }
    )
    rows = prompt_rows(table, spec, first_position=100)
    assert [r.error is None for r in rows] == [True, False, False, False, False, False, True]
    assert "is null" in rows[1].error and "is empty" in rows[2].error and "is empty" in rows[3].error
    assert "id column 'id' is null" in rows[4].error
    assert rows[5].error == "row 6: column 'max_new_tokens' holds 0: must be an integer >= 1"
    assert rows[6].overrides == {"max_new_tokens": 5} and rows[6].row_id == 7 and rows[6].text == "ok"


def test_rows_without_an_id_column_use_their_input_position():
    spec = make_spec("x", "y", input={"id_column": ""})
    rows = prompt_rows(pa.table({"prompt": ["a", "b"]}), spec, first_position=40)
    assert [r.row_id for r in rows] == [40, 41]


def test_non_string_prompts_are_error_rows():
    rows = prompt_rows(pa.table({"id": [1], "prompt": [12]}), make_spec("x", "y"), 0)
    assert "holds int 12, not a string" in rows[0].error


def test_malformed_messages_are_error_rows():
    spec = make_spec("x", "y", input={"prompt_column": "", "messages_column": "messages"})
    messages = [
        [{"role": "user", "content": "hi"}],
        None,
        [],
        [{"role": "user", "content": None}],
        [{"role": None, "content": "x"}],
    ]
    type_ = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rows = prompt_rows(pa.table({"id": range(5), "messages": pa.array(messages, type_)}), spec, 0)
    assert rows[0].messages == [{"role": "user", "content": "hi"}] and rows[0].error is None
    assert "is null" in rows[1].error and "empty list" in rows[2].error
    assert "messages[0] (user) has no string content" in rows[3].error
    assert "messages[0] has no role" in rows[4].error
    wrong_type = prompt_rows(pa.table({"id": [0], "messages": ["just text"]}), spec, 0)
    assert "holds str, not a list of {role, content}" in wrong_type[0].error


def test_apply_chat_template_wraps_a_plain_prompt_as_a_user_message():
    spec = make_spec("x", "y", input={"apply_chat_template": True})
    (row,) = prompt_rows(pa.table({"id": [1], "prompt": ["hello"]}), spec, 0)
    assert row.messages == [{"role": "user", "content": "hello"}] and row.text is None


def test_seeds_are_stable_and_distinct_per_row_and_sample():
    seeds = {derive_seed(5, row, sample) for row in ["a", "b", 1, "1"] for sample in range(3)}
    assert len(seeds) == 12
    assert all(0 <= seed < 2**31 for seed in seeds)
    # A fixed value: a change of the derivation (and so of every rerun's text) must be deliberate.
    assert derive_seed(0, "row-1", 0) == derive_seed(0, "row-1", 0) == 925656816
