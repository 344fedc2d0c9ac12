"""Runs one benchmark step in a child process that reads a JSON spec and writes a JSON result.

Each configuration gets its own process so that its peak memory and its compiled programs are its own. The
child's output goes to a log file beside the spec; when the child fails, the error quotes the log's tail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from batchgen.errors import BatchgenError

LOG_TAIL_CHARS = 3000


class BenchStepError(BatchgenError):
    """A benchmark step's process failed, timed out or wrote no result; the message holds its log's tail."""


def run_json_process(
    argv: list[str], out: Path, log: Path, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs `argv` and returns the JSON object it wrote to `out`."""
    out.unlink(missing_ok=True)
    with log.open("w", encoding="utf-8") as log_file:
        try:
            process = subprocess.run(
                argv, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})},
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchStepError(f"{' '.join(argv)} ran past {timeout:.0f} s; log {log}:\n{_tail(log)}") from e
    if process.returncode != 0 or not out.exists():
        raise BenchStepError(
            f"{' '.join(argv)} exited with {process.returncode} and {'no result' if not out.exists() else 'a result'}; "
            f"log {log}:\n{_tail(log)}"
        )
    return json.loads(out.read_text(encoding="utf-8"))


def _tail(log: Path) -> str:
    text = log.read_text(encoding="utf-8", errors="replace")
    return text[-LOG_TAIL_CHARS:]
