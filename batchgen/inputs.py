"""The input table: Parquet files found from a URL (a file, a directory or a glob), their footers, their rows.

Nothing here reads row data except `read_rows`, which a worker calls for one shard; planning needs only the
footers (row counts per row group, and the schema).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import InputError
from batchgen.storage import filesystem, url_of

_GLOB_CHARACTERS = ("*", "?", "[")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input, as its footer describes it.

    `first_position` is the position of its first row in the whole input (files in URL order), which is
    the row id when the input has no id column.
    """

    url: str
    row_group_rows: tuple[int, ...]
    first_position: int

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


def list_input_files(
    url: str, storage_options: Mapping[str, Any] | None = None, suffixes: tuple[str, ...] = (".parquet",),
    kind: str = "Parquet",
) -> list[str]:
    """The input files `url` names (Parquet unless `suffixes` and `kind` say otherwise), full URLs, sorted.

    A directory gives every file below it ending in one of `suffixes` (names starting with `_` or `.` are left
    out, as Spark and pyarrow do); a glob gives its matches; anything else must be one existing file.
    """
    fs, path = filesystem(url, storage_options)
    try:
        if any(character in path for character in _GLOB_CHARACTERS):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.endswith(suffixes) and not _hidden(p[len(path) :])]
        elif fs.isfile(path):
            paths = [path]
        else:
            raise InputError(f"input.url {url!r}: no such file or directory")
    except (OSError, PermissionError) as error:
        raise InputError(f"input.url {url!r} cannot be listed: {error}") from error
    if not paths:
        raise InputError(f"input.url {url!r} matches no {kind} files")
    return [url_of(fs, p) for p in sorted(paths)]


def read_footers(
    urls: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[InputFile], list[pa.Schema]]:
    """Each file's row groups and Arrow schema, from its footer alone."""
    files: list[InputFile] = []
    schemas: list[pa.Schema] = []
    position = 0
    for url in urls:
        fs, path = filesystem(url, storage_options)
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).metadata
                schemas.append(metadata.schema.to_arrow_schema())
        except Exception as error:  # pyarrow raises several types for a bad footer; all mean the same here
            raise InputError(f"{url}: cannot read the Parquet footer: {error}") from error
        rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        files.append(InputFile(url, rows, position))
        position += sum(rows)
    return files, schemas


def read_rows(
    url: str,
    row_start: int,
    row_stop: int,
    columns: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Rows [row_start, row_stop) of one file, reading only the row groups that hold them."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise InputError(f"{url}: columns {missing} are missing (the file has {parquet.schema_arrow.names})")
            groups, first_row = [], None
            offset = 0
            for index in range(parquet.metadata.num_row_groups):
                size = parquet.metadata.row_group(index).num_rows
                if offset < row_stop and offset + size > row_start:
                    groups.append(index)
                    first_row = offset if first_row is None else first_row
                offset += size
            if row_stop > offset:
                raise InputError(f"{url}: asked for rows up to {row_stop} but the file has {offset} (did it change?)")
            table = parquet.read_row_groups(groups, columns=list(columns))
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{url}: cannot read rows {row_start}..{row_stop}: {error}") from error
    return table.slice(row_start - (first_row or 0), row_stop - row_start)


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)
