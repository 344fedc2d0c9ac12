"""What every peer script shares: its SPEC.json and workloads, counting generated tokens, peak memory, one run.

Standard library only: the peer scripts run under interpreters that need not have batchgen installed, and import
this file as a sibling module (`from peer_common import ...`; the tests import it as part of the package).

SPEC.json, as the benchmark writes it: {"workloads": [{"path": WORKLOAD.json, "batches": [64]}, ...], "out": ...}
plus what the peer needs (its model's path, a cache folder, settings such as a quantization).
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_generated(new_tokens: Sequence[int], stop_ids: set[int], budget: int) -> tuple[int, list[int]]:
    """(tokens generated for a row, the output without the stop token), within the row's budget.

    A row's tokens count up to and including its first stop id (the stop token was computed), as our engine counts
    them; whatever follows (padding, or tokens a batch computed past a row's end) is the peer's own overhead.
    """
    new_tokens = list(new_tokens)
    for i, token in enumerate(new_tokens[:budget]):
        if token in stop_ids:
            return i + 1, new_tokens[:i]
    return min(budget, len(new_tokens)), new_tokens[:budget]


def read_workloads(spec: dict[str, Any]) -> list[tuple[dict[str, Any], list[int]]]:
    """(workload, batch sizes) for each workload the spec names, in its order."""
    out = []
    for entry in spec["workloads"]:
        workload = json.loads(Path(entry["path"]).read_text())
        if not workload["requests"]:
            raise ValueError(f"workload {entry['path']} has no requests")
        out.append((workload, [int(b) for b in entry["batches"]]))
    return out


def longest_sequence(workloads: Sequence[dict[str, Any]]) -> int:
    """The most positions any request of `workloads` needs: its prompt and its whole budget."""
    return max(len(r["prompt_ids"]) + r["max_new_tokens"] for w in workloads for r in w["requests"])


def timed_pass(
    workload: dict[str, Any], batch: int, generate: Callable[[list[dict[str, Any]]], list[list[int]]]
) -> dict[str, Any]:
    """Runs the workload through `generate` in chunks of `batch` prompts (workload order); returns one run's record.

    `generate(chunk)` returns each request's new token ids (with or without a trailing stop id, padding after).
    """
    requests = workload["requests"]
    stop_ids = {int(i) for i in workload["stop_token_ids"]}
    outputs: dict[str, list[int]] = {}
    generated = prompt_tokens = 0
    first = None
    start = time.perf_counter()
    for offset in range(0, len(requests), batch):
        chunk = requests[offset : offset + batch]
        new = generate(chunk)
        if len(new) != len(chunk):
            raise RuntimeError(f"{workload['name']}: {len(chunk)} prompts in, {len(new)} outputs back")
        for r, tokens in zip(chunk, new):
            count, kept = count_generated(tokens, stop_ids, r["max_new_tokens"])
            generated += count
            prompt_tokens += len(r["prompt_ids"])
            outputs[r["request_id"]] = kept
        if first is None:
            first = time.perf_counter() - start
    return {
        "workload": workload["name"], "batch": batch, "wall_seconds": time.perf_counter() - start,
        "first_result_seconds": first, "prompt_tokens": prompt_tokens, "completion_tokens": generated,
        "outputs": outputs,
    }


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    Path(spec["out"]).write_text(json.dumps(result))
