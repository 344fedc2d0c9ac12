"""Progress while a job runs: a rich bar of output rows with generated tokens/s and ETA, and event lines.

The bar moves as shards commit. Rows committed by an earlier run count as done from the start, so the ETA
covers only what is left.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from batchgen.manifest import ShardResult

log = logging.getLogger("batchgen")


class JobProgress:
    """A context manager that shows the job's progress on `console` (stderr by default) when `enabled`."""

    def __init__(
        self, total_rows: int, done_rows: int, *, enabled: bool = True, console: Console | None = None
    ) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.started = time.monotonic()
        self.tokens = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[tokens_per_second]:>7.1f} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
            # Without this, a job whose first shard takes minutes would show no ETA at all.
            speed_estimate_period=3600,
        )
        self._task = self._progress.add_task("generating", total=total_rows, completed=done_rows, tokens_per_second=0.0)

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.stop()

    def shard_done(self, result: ShardResult) -> None:
        """Advance by a committed shard's output rows and update the token rate."""
        self.tokens += result.completion_tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self._progress.update(self._task, advance=result.output_rows, tokens_per_second=self.tokens / elapsed)

    def note(self, message: str) -> None:
        """Print an event line (a retry, a replaced worker) above the bar, or log it when the bar is off."""
        if self.enabled:
            self._progress.console.log(message)
        else:
            log.warning(message)
