"""The sink: parts published whole or not at all, manifest, _SUCCESS last, resume and conflicts; and status."""

from __future__ import annotations

import uuid

import fsspec
import pyarrow as pa
import pytest

from batchgen.errors import OutputConflictError
from batchgen.faults import FaultPlan, InjectedFault
from batchgen.sink import Sink, job_record, part_name
from batchgen.status import read_status
from tests.batch_fixtures import s3_server  # noqa: F401 (a fixture)

TABLE = pa.table({"id": list(range(10)), "completion": [f"c{i}" for i in range(10)]})


@pytest.fixture(params=["local", "memory", "s3"])
def output(request, tmp_path):
    """An output URL and its storage options on the local disk, fsspec's memory store, and moto's S3."""
    if request.param == "local":
        yield str(tmp_path / "out"), {}
    elif request.param == "memory":
        name = f"memory://sink-{uuid.uuid4().hex}"
        yield name, {}
        fsspec.filesystem("memory").rm(name.removeprefix("memory:/"), recursive=True)
    else:
        options = request.getfixturevalue("s3_server")
        bucket = f"sink-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3", **options).mkdir(bucket)
        yield f"s3://{bucket}/out", options


def job(*shard_ids: str, fingerprint: str = "fp1") -> dict:
    return job_record(fingerprint, {"spec": 1}, "test.toml", [{"shard_id": s, "index": i} for i, s in enumerate(shard_ids)])


def entry(shard_id: str, **counts) -> dict:
    base = {"shard_id": shard_id, "index": 0, "rows_ok": 10, "rows_error": 0, "prompt_tokens": 5, "completion_tokens": 7}
    return base | counts


def names(sink: Sink) -> set[str]:
    return set(sink._listing())


def test_a_part_is_published_whole(output):
    url, options = output
    sink = Sink(url, options)
    sink.prepare(job("aaaa"), overwrite=False)
    written = sink.write_part("aaaa", TABLE.schema, TABLE.to_batches(max_chunksize=3))
    assert written.endswith(part_name("aaaa"))
    sink.commit(entry("aaaa"))
    assert sink.read_output().equals(TABLE)
    assert set(sink.committed()) == {"aaaa"}


def test_a_write_failing_half_way_publishes_nothing(output):
    url, options = output
    sink = Sink(url, options)
    sink.prepare(job("bbbb"), overwrite=False)
    failing = FaultPlan.from_json('[{"action": "fail_write", "shard": 0}]')
    batches = failing.wrap_batches(TABLE.to_batches(max_chunksize=3), shard_index=0, attempt=1)
    with pytest.raises(InjectedFault, match="half-way"):
        sink.write_part("bbbb", TABLE.schema, batches)
    # Nothing at the final name, nothing left in _tmp, nothing committed.
    assert part_name("bbbb") not in names(sink)
    if url.startswith("/"):
        assert not list((sink.fs.ls(sink.path + "/_tmp") if sink.fs.exists(sink.path + "/_tmp") else []))
    assert sink.committed() == {}


def test_resume_sees_committed_shards_and_a_part_without_entry_is_not_committed(output):
    url, options = output
    sink = Sink(url, options)
    sink.prepare(job("s1", "s2", "s3"), overwrite=False)
    for shard_id in ("s1", "s2"):
        sink.write_part(shard_id, TABLE.schema, TABLE.to_batches())
    sink.commit(entry("s1"))  # s2's driver "died" before committing it
    again = Sink(url, options).prepare(job("s1", "s2", "s3"), overwrite=False)
    assert set(again) == {"s1"}


def test_finish_removes_uncommitted_parts_then_writes_summary_and_success(output):
    url, options = output
    sink = Sink(url, options)
    sink.prepare(job("s1", "s2"), overwrite=False)
    for shard_id in ("s1", "s2"):
        sink.write_part(shard_id, TABLE.schema, TABLE.to_batches())
    sink.commit(entry("s1"))
    sink.commit(entry("gone"))  # an entry of a shard no longer in the plan
    sink.finish({"status": "succeeded"}, success=True, planned=["s1", "s2"])
    assert names(sink) == {"_job.json", "_manifest", "_summary.json", "_SUCCESS", part_name("s1")}
    assert set(sink.committed()) == {"s1"} and sink.succeeded()
    assert sink.read_summary() == {"status": "succeeded"}
    # A rerun with work to do takes _SUCCESS and the old summary away while it runs.
    sink.prepare(job("s1", "s2"), overwrite=False)
    assert not sink.succeeded() and sink.read_summary() is None


def test_finish_works_after_the_working_directory_is_gone(tmp_path, monkeypatch):
    # Under `ray job submit --working-dir`, Ray can delete the driver's working directory while the job runs.
    sink = Sink(str(tmp_path / "out"))
    sink.prepare(job("s1"), overwrite=False)
    sink.write_part("s1", TABLE.schema, TABLE.to_batches())
    sink.commit(entry("s1"))
    (tmp_path / "out" / "_tmp").mkdir(exist_ok=True)
    gone = tmp_path / "cwd"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    sink.finish({"status": "succeeded"}, success=True, planned=["s1"])
    assert names(sink) == {"_job.json", "_manifest", "_summary.json", "_SUCCESS", part_name("s1")}


def test_another_job_is_refused_unless_overwrite(output):
    url, options = output
    sink = Sink(url, options)
    sink.prepare(job("s1"), overwrite=False)
    sink.write_part("s1", TABLE.schema, TABLE.to_batches())
    sink.commit(entry("s1"))
    with pytest.raises(OutputConflictError, match="holds another job"):
        Sink(url, options).prepare(job("t1", fingerprint="fp2"), overwrite=False)
    committed = Sink(url, options).prepare(job("t1", fingerprint="fp2"), overwrite=True)
    assert committed == {} and names(sink) == {"_job.json"}
    assert sink.read_job()["fingerprint"] == "fp2"


def test_a_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("1,2,3")
    with pytest.raises(OutputConflictError, match="not empty and was not written by batchgen"):
        Sink(str(tmp_path / "out")).prepare(job("s1"), overwrite=False)


def test_status_reports_done_pending_failed(tmp_path):
    url = str(tmp_path / "out")
    assert read_status(url).status == "empty"
    sink = Sink(url)
    sink.prepare(job("s1", "s2", "s3"), overwrite=False)
    sink.write_part("s1", TABLE.schema, TABLE.to_batches())
    sink.commit(entry("s1", rows_ok=8, rows_error=2))
    running = read_status(url)
    assert (running.status, running.shards_committed, running.shards_pending, running.shards_failed) == ("incomplete", 1, 2, 0)
    assert (running.rows_ok, running.rows_error, running.completion_tokens) == (8, 2, 7)
    failed = {"shard_id": "s3", "index": 2, "errors": ["attempt 2: boom"]}
    sink.finish({"fingerprint": "fp1", "status": "failed", "failed_shards": [failed]}, success=False, planned=["s1", "s2", "s3"])
    after = read_status(url)
    assert (after.status, after.shards_pending, after.shards_failed) == ("incomplete", 1, 1)
    assert "attempt 2: boom" in after.render()
