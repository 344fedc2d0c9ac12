"""The manifest record: one typed shape for a committed shard, shared by the worker (which reports it), the
driver and sink (which commit it as `_manifest/<shard id>.json`), the summary and `status` (which count it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


# Manifest fields written under an older name, old -> new: outputs committed before the rename still resume.
RENAMED_FIELDS = {"ok_rows": "rows_ok", "error_rows": "rows_error"}


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """The manifest record of one shard: what a worker reports for a shard it wrote, what the driver commits
    (`_manifest/<shard id>.json`), and what the summary and `status` count."""

    # Defaults: a manifest entry read back may lack what its writer did not record (see `from_entry`).
    shard_id: str = ""
    index: int = 0
    attempt: int = 0
    file_url: str = ""
    row_start: int = 0
    row_stop: int = 0
    input_rows: int = 0
    output_rows: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    prompt_tokens: int = 0  # of the rows that were generated
    completion_tokens: int = 0
    seconds: float = 0.0
    worker_pid: int = 0
    part_file: str = ""
    # Of the error rows: prompts that were tokenized (e.g. too long for the context) but never run.
    error_prompt_tokens: int = 0
    model: str = "default"
    # {"model/config": {"metric", "sum", "count"}}: this shard's part of the job's metric (batchgen/metrics.py).
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Of prompt_tokens: those the model computed (the engine shares a repeated prompt: model.generation.prefix_cache);
    # None for scoring shards and for shards committed before this counter existed.
    prompt_tokens_computed: int | None = None

    @property
    def computed_prompt_tokens(self) -> int:
        """prompt_tokens_computed, where None (scoring, or an older writer) means every prompt token was computed."""
        return self.prompt_tokens if self.prompt_tokens_computed is None else self.prompt_tokens_computed

    def manifest_entry(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ShardResult:
        """The record of a manifest entry as read back; keys it does not know (a newer writer's) are ignored,
        and counters an older writer did not write take their defaults."""
        known = {field.name for field in dataclasses.fields(cls)}
        named = {RENAMED_FIELDS.get(key, key): value for key, value in entry.items()}
        return cls(**{key: value for key, value in named.items() if key in known})
