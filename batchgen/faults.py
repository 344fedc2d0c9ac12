"""Fault injection for the fault tests: a worker that dies, hangs, raises or fails a write on a given shard.

TEST-ONLY HOOK. The driver reads the environment variable BATCHGEN_FAULTS (a JSON list) and hands the plan to
each worker, which fires the faults at real points of its work. Nothing happens when the variable is unset,
which is how every real job runs. Each fault is a table:

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
from collections.abc import Iterable, Iterator, Mapping

import pyarrow as pa

FAULTS_ENV = "BATCHGEN_FAULTS"
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
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultPlan:
        """The plan in BATCHGEN_FAULTS, or an empty plan when it is unset."""
        text = environ.get(FAULTS_ENV, "").strip()
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
            raise ValueError(f"{FAULTS_ENV} must be a JSON list of fault tables, got {text!r}: {error}") from error
        for fault in faults:
            if fault.action not in ACTIONS:
                raise ValueError(f"{FAULTS_ENV}: unknown action {fault.action!r}; known: {ACTIONS}")
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
