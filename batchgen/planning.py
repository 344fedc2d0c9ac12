"""Planning: cut the input into shards from Parquet footers alone, with ids that a rerun finds again.

A shard is a row range of one file. Shards follow row-group boundaries, so a worker reads whole row groups
and nothing else; consecutive small row groups are packed into one shard up to `rows_per_shard`, and a row
group larger than that is split by row range into near-equal pieces. A shard's id is a hash of the file URL,
the row range and the job fingerprint, so the same job over the same files gives the same shard ids, and a
part file named by shard id is never written twice by one job.

JSONL input (and OpenAI Batch files) has no footers: each file is read once to count its rows (see
batchgen.jsonl_input), then cut as one row group of that many rows; a plain file's shards note the byte offset
of their first row, so workers seek to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import pyarrow as pa

from batchgen.errors import InputError
from batchgen.inputs import InputFile, list_input_files, read_footers
from batchgen.prompts import check_schema
from batchgen.spec import JobSpec


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_stop) of the file at `file_url`; `first_position` is row_start's input position."""

    shard_id: str
    index: int
    file_url: str
    row_start: int
    row_stop: int
    first_position: int
    byte_start: int | None = None  # JSONL only: where row_start begins in a plain (uncompressed) file
    model: str = "default"  # the model configuration ([model.configs.NAME]) this shard runs under

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclasses.dataclass(frozen=True)
class Plan:
    """The input files, the schema the job reads (the first file's), and the shards, in input order."""

    files: tuple[InputFile, ...]
    schema: pa.Schema
    shards: tuple[Shard, ...]
    warnings: tuple[str, ...] = ()

    @property
    def total_rows(self) -> int:
        """Input rows (each runs once per model in a sweep: `JobSpec.outputs_per_row` counts the models)."""
        return sum(f.num_rows for f in self.files)


def shard_id(fingerprint: str, file_url: str, row_start: int, row_stop: int, model: str | None = None) -> str:
    """The deterministic id of a shard: 16 hex digits of sha256 over what identifies it (the model too, in a
    sweep over models; without one the ids are those of jobs written before sweeps existed)."""
    payload = f"{fingerprint}\0{file_url}\0{row_start}\0{row_stop}"
    payload = (payload + (f"\0{model}" if model is not None else "")).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def cut_shards(files: Sequence[InputFile], rows_per_shard: int, fingerprint: str) -> tuple[Shard, ...]:
    """Shards of `files` on row-group boundaries, at most `rows_per_shard` rows each (see the module doc)."""
    ranges: list[tuple[InputFile, int, int]] = []
    for file in files:
        start = stop = 0
        for size in file.row_group_rows:
            if size > rows_per_shard:
                if stop > start:
                    ranges.append((file, start, stop))
                pieces = math.ceil(size / rows_per_shard)
                bounds = [stop + size * i // pieces for i in range(pieces + 1)]
                ranges.extend((file, a, b) for a, b in zip(bounds, bounds[1:]))
                start = stop = stop + size
            elif stop - start + size > rows_per_shard:
                if stop > start:
                    ranges.append((file, start, stop))
                start, stop = stop, stop + size
            else:
                stop += size
        if stop > start:
            ranges.append((file, start, stop))
    return tuple(
        Shard(shard_id(fingerprint, file.url, a, b), index, file.url, a, b, file.first_position + a)
        for index, (file, a, b) in enumerate(ranges)
    )


def plan_job(spec: JobSpec) -> Plan:
    """List the input files, read their footers, check their columns against the spec, and cut shards."""
    if spec.input.format != "parquet":
        return _plan_jsonl(spec)
    urls = list_input_files(spec.input.url, spec.input.storage_options)
    files, schemas = read_footers(urls, spec.input.storage_options)
    warnings: list[str] = []
    for url, schema in zip(urls, schemas):
        for warning in check_schema(schema, spec, url):
            if warning not in warnings:
                warnings.append(warning)
        for key in ("continuations_column", "reference_column"):
            column = getattr(spec.task, key)
            if column and column not in schema.names:
                raise InputError(f"{url}: task.{key} names column {column!r}, which the file does not have "
                                 f"(it has {schema.names})")
    id_types = {str(s.field(spec.input.id_column).type) for s in schemas} if spec.input.id_column else set()
    if len(id_types) > 1:
        raise InputError(
            f"input.id_column {spec.input.id_column!r} has different types across files: {sorted(id_types)}"
        )
    cut = _by_model(spec, cut_shards(files, spec.execution.rows_per_shard, spec.fingerprint()))
    return Plan(tuple(files), schemas[0], cut, tuple(warnings))


def _by_model(spec: JobSpec, cut: tuple[Shard, ...]) -> tuple[Shard, ...]:
    """The shards once per model configuration of a sweep ([model.configs.NAME]); as they are without one."""
    if not spec.model_sweep:
        return cut
    # Model-major: every shard of one model before the next, so that a worker (which holds one model at a
    # time and is handed shards of the model it holds first, see the driver) loads each model once.
    return tuple(
        dataclasses.replace(shard, shard_id=shard_id(spec.fingerprint(), shard.file_url, shard.row_start,
                            shard.row_stop, model.name), index=m * len(cut) + shard.index, model=model.name)
        for m, model in enumerate(spec.models) for shard in cut
    )  # fmt: skip


def _plan_jsonl(spec: JobSpec) -> Plan:
    """Plan JSONL or OpenAI Batch input: count each file's rows, cut shards by row range, note byte offsets."""
    from batchgen import jsonl_input  # here: Parquet jobs never need it

    storage = spec.input.storage_options
    scanned = [jsonl_input.scan_file(url, storage) for url in jsonl_input.list_jsonl_files(spec.input.url, storage)]
    files, position = [], 0
    for file in scanned:
        files.append(InputFile(file.url, (file.num_rows,) if file.num_rows else (), position))
        position += file.num_rows
    offsets = {file.url: file.offsets for file in scanned}
    shards = tuple(
        dataclasses.replace(shard, byte_start=None if offsets[shard.file_url] is None else offsets[shard.file_url][shard.row_start])
        for shard in _by_model(spec, cut_shards(files, spec.execution.rows_per_shard, spec.fingerprint()))
    )
    first = next((file for file in scanned if file.num_rows), None)
    if first is None:
        raise InputError(f"input.url {spec.input.url!r}: the JSONL files hold no rows")
    schema = jsonl_input.infer_schema(first, storage)
    needed = list(spec.output.carry_columns)
    if spec.input.format == "openai_batch":
        # Requests' ids are strings; the output id column is typed from here.
        schema = _with_field(schema, pa.field("custom_id", pa.string()))
    else:
        needed += [spec.input.prompt_column or spec.input.messages_column, spec.input.id_column]
    missing = [name for name in needed if name and name not in schema.names]
    if missing:
        raise InputError(
            f"{first.url}: columns {missing} named by the spec are in none of the first "
            f"{jsonl_input.SCHEMA_SAMPLE_ROWS} rows (keys found: {schema.names})"
        )
    if spec.input.id_column and pa.types.is_null(schema.field(spec.input.id_column).type):
        schema = _with_field(schema, pa.field(spec.input.id_column, pa.string()))
    return Plan(tuple(files), schema, shards, ())


def _with_field(schema: pa.Schema, field: pa.Field) -> pa.Schema:
    index = schema.get_field_index(field.name)
    return schema.set(index, field) if index >= 0 else schema.append(field)
