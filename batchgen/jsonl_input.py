"""JSONL input: files of one JSON object per line (plain or gzip), through fsspec; its rows, planned and read.

JSONL has no footer, so planning reads each file once: it counts the rows (non-blank lines) and, for plain
files, notes the byte offset where each row starts, so a worker seeks straight to its shard's first line. A
gzip file cannot be entered in the middle: a worker decompresses it from the start and skips the rows before
its shard, so reading a gzipped file costs O(its size) per shard. Split large gzipped inputs into several
files (each is sharded on its own), or use a larger `rows_per_shard` for them.

A line that is not a JSON object does not stop anything: it is a row whose error says so, per the row contract.
Files are "rows" in the planner's sense as one row group, cut by row range into near-equal shards.
"""

from __future__ import annotations

import array
import dataclasses
import gzip
import json
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import pyarrow as pa

from batchgen.errors import InputError
from batchgen.inputs import list_input_files
from batchgen.storage import filesystem

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
# Rows whose keys and values give the input's Arrow schema (for the output's id and carried column types).
SCHEMA_SAMPLE_ROWS = 1000


@dataclasses.dataclass(frozen=True)
class JsonlFile:
    """One JSONL file: its row count, and for a plain file the byte offset where each row starts."""

    url: str
    num_rows: int
    offsets: array.array | None  # None for gzip files (not seekable)

    @property
    def compressed(self) -> bool:
        return self.url.endswith(".gz")


def list_jsonl_files(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The JSONL files `url` names (a file, a directory of `*.jsonl[.gz]` / `*.ndjson[.gz]`, or a glob), sorted."""
    return list_input_files(url, storage_options, JSONL_SUFFIXES, f"JSONL ({', '.join(JSONL_SUFFIXES)})")


def scan_file(url: str, storage_options: Mapping[str, Any] | None = None) -> JsonlFile:
    """Count the rows of one file (and note each row's byte offset when it is not compressed)."""
    fs, path = filesystem(url, storage_options)
    compressed = url.endswith(".gz")
    offsets = None if compressed else array.array("q")
    count = 0
    try:
        with fs.open(path, "rb") as raw, _text_bytes(raw, compressed) as handle:
            position = 0
            for line in handle:
                if line.strip():
                    if offsets is not None:
                        offsets.append(position)
                    count += 1
                position += len(line)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise InputError(f"{url}: cannot read the JSONL file: {error}") from error
    return JsonlFile(url, count, offsets)


def read_objects(
    url: str,
    row_start: int,
    row_stop: int,
    byte_start: int | None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any] | str]:
    """Rows [row_start, row_stop) of one file: each a parsed JSON object, or a string saying why it is not one.

    `byte_start` (from planning) is where row_start begins in a plain file; None reads from the beginning.
    """
    fs, path = filesystem(url, storage_options)
    rows: list[dict[str, Any] | str] = []
    try:
        with fs.open(path, "rb") as raw, _text_bytes(raw, url.endswith(".gz")) as handle:
            index = 0
            if byte_start is not None:
                handle.seek(byte_start)
                index = row_start
            for line in handle:
                if not line.strip():
                    continue
                if index >= row_stop:
                    break
                if index >= row_start:
                    rows.append(_parse(line, url, index))
                index += 1
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise InputError(f"{url}: cannot read rows {row_start}..{row_stop}: {error}") from error
    if len(rows) != row_stop - row_start:
        raise InputError(f"{url}: asked for rows {row_start}..{row_stop} but found {len(rows)} (did the file change?)")
    return rows


def infer_schema(file: JsonlFile, storage_options: Mapping[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of the first `SCHEMA_SAMPLE_ROWS` object rows of a file (keys missing there: absent)."""
    stop = min(file.num_rows, SCHEMA_SAMPLE_ROWS)
    sample = read_objects(file.url, 0, stop, None, storage_options)
    objects = [row for row in sample if isinstance(row, dict)]
    try:
        return pa.Table.from_pylist(objects).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(f"{file.url}: the first {stop} rows' values do not have one type per key: {error}") from error


def columns_of(rows: Sequence[dict[str, Any] | str], names: Sequence[str]) -> tuple[dict[str, list[Any]], list[str | None]]:
    """The values of `names` per row (None where a row lacks the key), and each row's parse error or None."""
    columns = {name: [row.get(name) if isinstance(row, dict) else None for row in rows] for name in names}
    errors = [row if isinstance(row, str) else None for row in rows]
    return columns, errors


def _parse(line: bytes, url: str, index: int) -> dict[str, Any] | str:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"{url} row {index}: not valid JSON ({error})"
    if not isinstance(value, dict):
        return f"{url} row {index}: a JSON {type(value).__name__}, not an object"
    return value


class _text_bytes:
    """The file's (decompressed, under gzip) bytes, iterable by line; the raw handle is closed by its owner."""

    def __init__(self, raw: BinaryIO, compressed: bool) -> None:
        self.handle: Any = gzip.GzipFile(fileobj=raw) if compressed else raw
        self.compressed = compressed

    def __enter__(self) -> Any:
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.compressed:
            self.handle.close()
