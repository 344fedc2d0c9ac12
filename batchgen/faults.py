"""Fault injection for the fault tests: a worker that dies, hangs, raises or fails a write on a given shard.

Tests only. A test passes a `FaultPlan` to `run_job(spec, faults=...)`; the job then runs `FaultyShardWorker`s,
which fire the faults around the real steps of `ShardWorker.run_shard` (the production worker has no hooks). A
test that drives a job in a subprocess runs `python -m tests.run_with_faults FAULTS_JSON run JOB ...`, which
hands the plan (`FaultPlan.from_json`) to the same parameter; `batchgen run` itself has no way in for faults,
and every real job runs the plain `ShardWorker`. Each fault is a table (FAULTS_JSON is a list of them):

    {"action": "kill" | "hang" | "raise" | "fail_write" | "delay",
     "shard": 1,          # the shard's index in the plan; -1 means every shard
     "attempts": [1],     # the attempts it fires on; [] means every attempt (default [1])
     "seconds": 2.0}      # for "delay": how long to sleep before the shard starts

- kill: SIGKILL the worker process half-way through the shard's completions (a crash, an OOM kill).
- hang: sleep for a day when the shard starts (a stuck worker; only `execution.shard_timeout` ends it).
- raise: raise RuntimeError when the shard starts (a shard that fails, e.g. on a bad file).
- fail_write: the part file's writer fails after its first record batch (a write failing half-way).
- delay: sleep `seconds` when the shard starts (gives a test time to act while a job is running).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa

from batchgen.manifest import ShardResult
from batchgen.planning import Shard
from batchgen.worker import ShardWorker

ACTIONS = ("kill", "hang", "raise", "fail_write", "delay")


class InjectedFault(RuntimeError):
    """The error an injected `raise` or `fail_write` fault raises."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault: `action` on shard `shard` (-1: all) at the listed attempts (empty: all)."""

    action: str
    shard: int = -1
    attempts: tuple[int, ...] = (1,)
    seconds: float = 0.0

    def applies(self, shard_index: int, attempt: int) -> bool:
        return self.shard in (-1, shard_index) and (not self.attempts or attempt in self.attempts)


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """The faults a job's workers fire; empty for every real job."""

    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """The plan in `text`, a JSON list of fault tables; an empty plan for empty text."""
        text = text.strip()
        if not text:
            return cls()
        try:
            items = json.loads(text)
            faults = tuple(
                Fault(
                    action=item["action"],
                    shard=int(item.get("shard", -1)),
                    attempts=tuple(int(a) for a in item.get("attempts", [1])),
                    seconds=float(item.get("seconds", 0.0)),
                )
                for item in items
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"faults must be a JSON list of fault tables, got {text!r}: {error}") from error
        for fault in faults:
            if fault.action not in ACTIONS:
                raise ValueError(f"faults: unknown action {fault.action!r}; known: {ACTIONS}")
        return cls(faults)

    def _active(self, action: str, shard_index: int, attempt: int) -> Fault | None:
        return next((f for f in self.faults if f.action == action and f.applies(shard_index, attempt)), None)

    def at_shard_start(self, shard_index: int, attempt: int) -> None:
        """Fire the delay, hang and raise faults of this shard attempt."""
        delay = self._active("delay", shard_index, attempt)
        if delay:
            time.sleep(delay.seconds)
        if self._active("hang", shard_index, attempt):
            time.sleep(24 * 3600)
        if self._active("raise", shard_index, attempt):
            raise InjectedFault(f"injected failure on shard {shard_index}, attempt {attempt}")

    def at_shard_middle(self, shard_index: int, attempt: int) -> None:
        """Fire the kill fault of this shard attempt: the process dies at once, as under SIGKILL from outside."""
        if self._active("kill", shard_index, attempt):
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap_batches(
        self, batches: Iterable[pa.RecordBatch], shard_index: int, attempt: int
    ) -> Iterable[pa.RecordBatch]:
        """`batches`, or, under a fail_write fault, its first batch followed by an error."""
        if not self._active("fail_write", shard_index, attempt):
            return batches
        return _fail_after_first(batches, shard_index, attempt)


def _fail_after_first(batches: Iterable[pa.RecordBatch], shard_index: int, attempt: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield batch
        break
    raise InjectedFault(f"injected write failure half-way through shard {shard_index}, attempt {attempt}")


class FaultyShardWorker(ShardWorker):
    """A `ShardWorker` that fires `faults` at real points of each shard: at its start (delay, hang, raise), half-way
    through its output records (kill), and in its part file's write (fail_write)."""

    def __init__(self, spec: Any, input_schema: pa.Schema, faults: FaultPlan, runner: Any = None) -> None:
        super().__init__(spec, input_schema, runner=runner)
        self.faults = faults
        self._attempt = (-1, 0)  # (shard index, attempt) of the shard being run

    def run_shard(self, shard: Shard, attempt: int) -> ShardResult:
        self.faults.at_shard_start(shard.index, attempt)
        self._attempt = (shard.index, attempt)
        sink = self.sink
        self.sink = _FailingWrites(sink, lambda items: self.faults.wrap_batches(items, shard.index, attempt))
        try:
            return super().run_shard(shard, attempt)
        finally:
            self.sink = sink

    def _records(self, rows: list[Any], table: pa.Table) -> Iterator[Any]:
        """The real records; the kill fault fires once half of them have come out."""
        if self.spec.task.kind == "generate":
            expected = sum(row.samples(config.n) for row in rows for config in self.spec.sampling)
        else:
            expected = len(rows)
        for count, record in enumerate(super()._records(rows, table), start=1):
            yield record
            if count == max(expected // 2, 1):
                self.faults.at_shard_middle(*self._attempt)


class _FailingWrites:
    """A sink whose part files are written from `wrap(items)` (record batches, or JSONL lines); everything else is
    the sink's own."""

    def __init__(self, sink: Any, wrap: Callable[[Iterable[Any]], Iterable[Any]]) -> None:
        self._sink, self._wrap = sink, wrap

    def write_part(self, shard_id: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> str:
        return self._sink.write_part(shard_id, schema, self._wrap(batches))

    def write_lines(self, shard_id: str, lines: Iterable[str]) -> str:
        return self._sink.write_lines(shard_id, self._wrap(lines))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)
