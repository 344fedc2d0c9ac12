"""The driver: a queue of pending shards handed to worker actors, and what happens when things go wrong.

- A worker pulls the next shard when it is free (one shard in flight per worker).
- A worker that dies (SIGKILL, OOM kill, a lost node) puts its shard back on the queue, and a replacement
  worker starts; so does a worker still busy with one shard after `execution.shard_timeout` seconds, which
  the driver kills first.
- A shard whose attempt raises goes back on the queue; its worker stays.
- Each shard gets `execution.max_attempts` attempts (deaths and timeouts count); after the last it is
  reported as failed, never retried forever.
- Workers that fail to start `max_attempts` times in a row (a model that cannot load) end the job.
- A lost node is a death for each worker on it: their shards go back on the queue, replacements start on the
  nodes left (workers spread over nodes, so most work survives the loss of one).
- A lost head (the GCS silent for `HEAD_LOST_SECONDS`) ends the run with ClusterLostError; committed shards
  stay committed and a rerun resumes.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from batchgen.errors import WorkerStartError
from batchgen.head_watch import HeadWatch
from batchgen.manifest import ShardResult
from batchgen.planning import Shard
from batchgen.spec import ExecutionSpec

# How often the driver wakes up to check timeouts when nothing finishes.
POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class FailedShard:
    """A shard that failed every attempt, with the reason of each."""

    shard: Shard
    attempts: int
    errors: tuple[str, ...]


@dataclasses.dataclass
class DriverReport:
    """What one driver run did: committed results, failed shards, retries and worker replacements."""

    results: list[ShardResult] = dataclasses.field(default_factory=list)
    failed: list[FailedShard] = dataclasses.field(default_factory=list)
    retries: int = 0
    workers_started: int = 0
    workers_replaced: int = 0
    first_ready: float | None = None  # time.monotonic() when the first worker had loaded its model


@dataclasses.dataclass
class _Running:
    actor: Any
    shard: Shard
    attempt: int
    started: float


class ShardDriver:
    """Runs shards on worker actors made by `start_worker` (each with `ready()` and `run_shard(shard, attempt)`).

    Args:
        start_worker: creates one worker actor.
        execution: replicas, attempts and the shard timeout.
        on_result: called with each shard's result as it arrives, before the next shard is handed out; this
            is where the shard gets committed.
        on_event: called with a one-line message for each retry, replacement or failure.
        head_watch: notices a lost cluster head (default: probes the GCS of the Ray this process joined).
    """

    def __init__(
        self,
        start_worker: Callable[[], Any],
        execution: ExecutionSpec,
        on_result: Callable[[ShardResult], None],
        on_event: Callable[[str], None] = lambda message: None,
        head_watch: HeadWatch | None = None,
    ) -> None:
        self.start_worker = start_worker
        self.execution = execution
        self.on_result = on_result
        self.on_event = on_event
        self.head_watch = head_watch

    def run(self, shards: Sequence[Shard]) -> DriverReport:
        """Run every shard to commit or failure; returns when none is pending or running."""
        report = DriverReport()
        self._report = report
        self._pending: collections.deque[Shard] = collections.deque(shards)
        self._attempts: collections.Counter[str] = collections.Counter()
        self._errors: dict[str, list[str]] = collections.defaultdict(list)
        self._running: dict[ray.ObjectRef, _Running] = {}
        self._starting: dict[ray.ObjectRef, Any] = {}
        self._idle: list[Any] = []
        self._models: dict[Any, str] = {}  # the model each worker last ran a shard of (so, holds)
        self._lost_workers = 0  # workers that died or were killed, not yet replaced
        self._start_failures = 0  # consecutive
        watch = self.head_watch or HeadWatch()
        try:
            while self._pending or self._running:
                self._scale_workers()
                self._hand_out()
                waiting = list(self._running) + list(self._starting)
                assert waiting, "shards are pending but no worker is running or starting"
                done, _ = ray.wait(waiting, num_returns=1, timeout=self._wait_seconds())
                for ref in done:
                    if ref in self._starting:
                        self._on_started(ref)
                    elif ref in self._running:
                        self._on_finished(ref)
                self._kill_overdue()
                watch.check()
        finally:
            # Without a head, killing would only wait on the GCS; the workers end with their nodes.
            if not watch.lost:
                for actor in self._idle + [r.actor for r in self._running.values()] + list(self._starting.values()):
                    ray.kill(actor, no_restart=True)
        return report

    # ---- workers ------------------------------------------------------------------------------------------

    def _scale_workers(self) -> None:
        wanted = min(self.execution.replicas, len(self._pending) + len(self._running))
        alive = len(self._idle) + len(self._running) + len(self._starting)
        for _ in range(wanted - alive):
            actor = self.start_worker()
            self._starting[actor.ready.remote()] = actor
            self._report.workers_started += 1
            if self._lost_workers:
                self._lost_workers -= 1
                self._report.workers_replaced += 1
        # Nothing left to hand out: free the idle workers' devices at once.
        while self._idle and len(self._idle) + len(self._running) + len(self._starting) > wanted:
            ray.kill(self._idle.pop(), no_restart=True)

    def _on_started(self, ref: ray.ObjectRef) -> None:
        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
        except RayError as error:
            self._start_failures += 1
            ray.kill(actor, no_restart=True)
            self.on_event(f"a worker failed to start ({self._start_failures} in a row): {_reason(error)}")
            if self._start_failures >= self.execution.max_attempts:
                raise WorkerStartError(
                    f"workers failed to start {self._start_failures} times in a row; last error: {_reason(error)}"
                ) from error
            return
        self._start_failures = 0
        if self._report.first_ready is None:
            self._report.first_ready = time.monotonic()
        self._idle.append(actor)

    # ---- shards -------------------------------------------------------------------------------------------

    def _hand_out(self) -> None:
        while self._idle and self._pending:
            actor = self._idle.pop()
            # A worker holds one model at a time: give it a shard of the model it holds when one is pending,
            # so that a sweep over models loads each model once per worker, not once per shard.
            held = self._models.get(actor)
            shard = next((s for s in self._pending if s.model == held), self._pending[0])
            self._pending.remove(shard)
            self._models[actor] = shard.model
            self._attempts[shard.shard_id] += 1
            attempt = self._attempts[shard.shard_id]
            ref = actor.run_shard.remote(shard, attempt)
            self._running[ref] = _Running(actor, shard, attempt, time.monotonic())

    def _on_finished(self, ref: ray.ObjectRef) -> None:
        running = self._running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as error:
            # Dead, or unreachable (its node lost): either way it is not trusted with another shard.
            ray.kill(running.actor, no_restart=True)
            self._lost_workers += 1
            self._retry_or_fail(running, f"the worker died: {_reason(error)}")
        except RayTaskError as error:
            self._idle.append(running.actor)
            self._retry_or_fail(running, _reason(error))
        except RayError as error:  # anything else from Ray: do not trust that worker again
            ray.kill(running.actor, no_restart=True)
            self._lost_workers += 1
            self._retry_or_fail(running, f"the worker failed: {_reason(error)}")
        else:
            self._idle.append(running.actor)
            self.on_result(result)
            self._report.results.append(result)

    def _kill_overdue(self) -> None:
        timeout = self.execution.shard_timeout
        if not timeout:
            return
        now = time.monotonic()
        for ref, running in list(self._running.items()):
            if now - running.started > timeout:
                del self._running[ref]
                ray.kill(running.actor, no_restart=True)
                self._lost_workers += 1
                self._retry_or_fail(running, f"timed out after {timeout:g} s; the worker was killed")

    def _retry_or_fail(self, running: _Running, reason: str) -> None:
        shard = running.shard
        self._errors[shard.shard_id].append(f"attempt {running.attempt}: {reason}")
        if running.attempt < self.execution.max_attempts:
            self._pending.append(shard)
            self._report.retries += 1
            self.on_event(
                f"shard {shard.index} ({shard.shard_id}) attempt {running.attempt} failed, requeued: {reason}"
            )
        else:
            self._report.failed.append(FailedShard(shard, running.attempt, tuple(self._errors[shard.shard_id])))
            self.on_event(f"shard {shard.index} ({shard.shard_id}) failed all {running.attempt} attempts: {reason}")

    def _wait_seconds(self) -> float:
        timeout = self.execution.shard_timeout
        if not timeout or not self._running:
            return POLL_SECONDS
        oldest = min(r.started for r in self._running.values())
        return max(0.05, min(POLL_SECONDS, oldest + timeout - time.monotonic()))


def _reason(error: BaseException) -> str:
    """A one-line reason: the original exception of a task error, else Ray's message, shortened."""
    cause = getattr(error, "cause", None)
    if isinstance(error, RayTaskError) and cause is not None:
        error = cause
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."
