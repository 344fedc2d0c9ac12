"""The output location: part files published whole, a manifest of committed shards, `_SUCCESS` last.

Layout of an output directory (at any fsspec URL):

    _job.json                  which job writes here (its fingerprint), its spec and its plan of shards
    part-<shard id>.parquet    one per committed shard, published only when complete (.jsonl / .jsonl.gz for
                               JSONL and OpenAI Batch output)
    _manifest/<shard id>.json  the commit record of a shard: rows, tokens, attempts (written after its part)
    _tmp/                      local disk only: part files being written (removed when the job ends)
    _summary.json              the job summary, written when the job ends
    _SUCCESS                   written last, only when the job succeeded

A shard is committed when its manifest entry exists (and its part file with it). A part file with no entry
(its driver died between the two writes) is rewritten by the rerun, with the same name and the same rows, and
removed at the end if its shard never commits; so when `_SUCCESS` exists the part files are exactly the
committed shards.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import OutputConflictError
from batchgen.storage import filesystem, is_local, join, url_of, write_bytes_atomically

if TYPE_CHECKING:
    from batchgen.spec import OutputSpec

JOB_FILE = "_job.json"
MANIFEST_DIR = "_manifest"
TMP_DIR = "_tmp"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"


def part_name(shard_id: str, suffix: str = PART_SUFFIX) -> str:
    """The part file's name for a shard."""
    return f"{PART_PREFIX}{shard_id}{suffix}"


def part_suffix(output_format: str, compression: str | None) -> str:
    """The part files' suffix: .parquet, or .jsonl (.jsonl.gz under gzip) for JSONL and OpenAI Batch output."""
    if output_format == "parquet":
        return PART_SUFFIX
    return ".jsonl.gz" if compression == "gzip" else ".jsonl"


class Sink:
    """One job's output location. Workers call `write_part`; the driver does everything else.

    Example:
        >>> sink = Sink("memory://out")  # doctest: +SKIP
        >>> sink.write_part("0123abcd", table.schema, table.to_batches())  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        compression: str = "zstd",
        output_format: str = "parquet",
    ) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.compression = None if compression == "none" else compression
        self.format = output_format
        self.suffix = part_suffix(output_format, self.compression)
        self.fs, self.path = filesystem(url, self.storage_options)

    @classmethod
    def for_output(cls, output: OutputSpec) -> Sink:
        """The sink of a job's [output] section (URL, storage options, compression, format): how the driver,
        `validate` and every worker build theirs, so that they cannot disagree."""
        return cls(output.url, output.storage_options, output.compression, output.format)

    # ---- worker side --------------------------------------------------------------------------------------

    def write_part(self, shard_id: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> str:
        """Write a shard's part file so that it appears whole or not at all; returns its URL.

        If `batches` fails half-way, nothing is published: on the local disk the file is written under
        _tmp/ and renamed into place at the end; on object stores it is built in memory and written once at
        its final name (a rename there would be a copy, and a failed upload could leave a partial object).
        """
        return self._publish(shard_id, lambda where: self._write_parquet(where, schema, batches))

    def write_lines(self, shard_id: str, lines: Iterable[str]) -> str:
        """Write a shard's JSONL part file (one line per item of `lines`, gzipped under gzip) whole or not at
        all, as `write_part`; returns its URL."""

        def write(where: Any) -> None:
            data = "".join(f"{line}\n" for line in lines).encode()
            if self.compression == "gzip":
                data = gzip.compress(data, mtime=0)  # mtime 0: a rerun writes the same bytes
            if isinstance(where, str):
                with open(where, "wb") as handle:
                    handle.write(data)
            else:
                where.write(data)

        return self._publish(shard_id, write)

    def _publish(self, shard_id: str, write: Any) -> str:
        final = join(self.path, part_name(shard_id, self.suffix))
        if is_local(self.fs):
            temporary = join(self.path, TMP_DIR, f"{part_name(shard_id, self.suffix)}.{uuid.uuid4().hex}")
            os.makedirs(os.path.dirname(temporary), exist_ok=True)
            try:
                write(temporary)
                os.replace(temporary, final)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
            buffer = pa.BufferOutputStream()
            write(buffer)
            self.fs.pipe_file(final, buffer.getvalue().to_pybytes())
        return url_of(self.fs, final)

    def _write_parquet(self, where: Any, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
        writer = pq.ParquetWriter(where, schema, compression=self.compression or "NONE")
        try:
            for batch in batches:
                writer.write_batch(batch)
        finally:
            writer.close()

    # ---- driver side --------------------------------------------------------------------------------------

    def read_job(self) -> dict[str, Any] | None:
        """The `_job.json` of the job that writes here, or None when there is none."""
        return self._read_json(JOB_FILE)

    def check_owner(self, fingerprint: str) -> bool:
        """Raise OutputConflictError if another job's output (or anything else) is here; True when resuming."""
        job = self.read_job()
        if job is not None:
            if job.get("fingerprint") == fingerprint:
                return True
            raise OutputConflictError(
                f"output {self.url} holds another job (fingerprint {job.get('fingerprint')}, spec "
                f"{job.get('spec_source')!r}; this job is {fingerprint}): a changed spec writes different rows. "
                "Use another output.url, or --overwrite to delete it"
            )
        if self.fs.exists(self.path) and self._listing():
            raise OutputConflictError(
                f"output {self.url} is not empty and was not written by batchgen ({len(self._listing())} entries): "
                "use another output.url, or --overwrite to delete it"
            )
        return False

    def prepare(self, job: Mapping[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
        """Claim the output for `job` (a dict with its "fingerprint" and "shards"); return its committed entries.

        With `overwrite`, whatever is there is deleted first. A previous `_SUCCESS` and `_summary.json` are
        removed when the plan has shards that are not committed, so that no reader takes the output for
        complete (or its last failures for current) while this run works on it.
        """
        if overwrite and self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
            self.fs.invalidate_cache()
        self.check_owner(job["fingerprint"])
        self._write_json(JOB_FILE, job)
        committed = self.committed()
        planned = {shard["shard_id"] for shard in job["shards"]}
        if planned - committed.keys():
            for name in (SUCCESS_FILE, SUMMARY_FILE):
                if self._exists(name):
                    self.fs.rm(join(self.path, name))
        return {shard_id: entry for shard_id, entry in committed.items() if shard_id in planned}

    def committed(self) -> dict[str, dict[str, Any]]:
        """Manifest entries (by shard id) whose part file exists."""
        names = set(self._listing())
        manifest = join(self.path, MANIFEST_DIR)
        if MANIFEST_DIR not in names:
            return {}
        entries = {}
        for path in sorted(self._ls(manifest)):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            entry = self._read_json(f"{MANIFEST_DIR}/{name}")
            if entry is not None and part_name(entry["shard_id"], self.suffix) in names:
                entries[entry["shard_id"]] = entry
        return entries

    def commit(self, entry: Mapping[str, Any]) -> None:
        """Record a shard as committed, after its part file is in place."""
        self._write_json(f"{MANIFEST_DIR}/{entry['shard_id']}.json", entry)

    def finish(self, summary: Mapping[str, Any], success: bool, planned: Collection[str]) -> None:
        """End a run: drop part files and entries of shards not committed in this plan, then the summary,
        then `_SUCCESS` when `success`."""
        committed = set(self.committed()) & set(planned)
        for name in self._listing():
            if name.startswith(PART_PREFIX) and name.endswith(self.suffix):
                if name[len(PART_PREFIX) : -len(self.suffix)] not in committed:
                    self.fs.rm(join(self.path, name))
        if MANIFEST_DIR in self._listing():
            for path in self._ls(join(self.path, MANIFEST_DIR)):
                if path.rsplit("/", 1)[-1].removesuffix(".json") not in committed:
                    self.fs.rm(path)
        if is_local(self.fs):
            # Not fs.rm: fsspec's rm of a local directory reads the working directory, and under `ray job submit
            # --working-dir` Ray may have deleted the driver's working directory by the time the job ends.
            shutil.rmtree(join(self.path, TMP_DIR), ignore_errors=True)
        self._write_json(SUMMARY_FILE, summary)
        if success:
            write_bytes_atomically(self.fs, join(self.path, SUCCESS_FILE), b"")

    def read_summary(self) -> dict[str, Any] | None:
        """The `_summary.json` of the last run that ended, or None."""
        return self._read_json(SUMMARY_FILE)

    def succeeded(self) -> bool:
        """Whether `_SUCCESS` is there."""
        return self._exists(SUCCESS_FILE)

    def read_output(self) -> pa.Table:
        """Every committed part file, in plan order, as one table (for checks and small outputs)."""
        job = self.read_job() or {"shards": []}
        committed = self.committed()
        tables = []
        for shard in job["shards"]:
            if shard["shard_id"] in committed:
                with self.fs.open(join(self.path, part_name(shard["shard_id"], self.suffix)), "rb") as handle:
                    tables.append(pq.read_table(handle))
        if not tables:
            raise FileNotFoundError(f"output {self.url} has no committed part files")
        return pa.concat_tables(tables)

    def read_lines(self) -> Iterator[dict[str, Any]]:
        """Every line of the committed JSONL part files, in plan order, parsed."""
        job = self.read_job() or {"shards": []}
        committed = self.committed()
        for shard in job["shards"]:
            if shard["shard_id"] in committed:
                with self.fs.open(join(self.path, part_name(shard["shard_id"], self.suffix)), "rb") as handle:
                    data = handle.read()
                if self.suffix.endswith(".gz"):
                    data = gzip.decompress(data)
                for line in data.decode().splitlines():
                    yield json.loads(line)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _listing(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in self._ls(self.path)]

    def _ls(self, path: str) -> list[str]:
        # Object-store filesystems cache listings; other processes (the workers) write here.
        self.fs.invalidate_cache(path)
        return self.fs.ls(path, detail=False)

    def _exists(self, name: str) -> bool:
        return name in self._listing()

    def _read_json(self, name: str) -> dict[str, Any] | None:
        path = join(self.path, name)
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def _write_json(self, name: str, data: Mapping[str, Any]) -> None:
        payload = json.dumps(data, indent=2, sort_keys=False).encode()
        write_bytes_atomically(self.fs, join(self.path, name), payload)


def job_record(
    fingerprint: str, spec: Mapping[str, Any], source: str, shards: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """The content of `_job.json`."""
    return {
        "fingerprint": fingerprint,
        "spec_source": source,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spec": dict(spec),
        "shards": list(shards),
    }
