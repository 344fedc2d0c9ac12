"""Where a workload's wall time goes, call by call: `python -m batchgen.bench.timeline SPEC.json [--calls]`.

SPEC.json is one of the row specs `batchgen bench` writes into its `--workdir` (e.g. `short_float32.spec.json`).
The row's workload runs twice through the engine, as in the benchmark (a warm-up pass that compiles, then a
measured one), and the measured pass's device calls are printed: each prefill, prompt copy and decode call with
its rows, tokens and seconds, then a summary by kind (decode by the rows it computed), and the host's time
between calls (scheduling, detokenizing, building each call's arrays). What it showed once: on the short
workload 10 of 64 prompts waited for room in the KV pool and started ~2 decode calls late (the pool was sized
in positions, not in whole pages per slot), which made the pass 22% longer.
"""

from __future__ import annotations

import argparse
import collections
import os
import time


def summary(calls: list, wall_seconds: float) -> list[tuple[str, int, float, float]]:
    """(what, calls, seconds, share of the wall) per kind of call (decode split by its rows), then the host's
    time between calls."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for call in calls:
        groups[f"decode, {call.rows} rows" if call.kind == "decode" else call.kind].append(call.seconds)
    rows = [(what, len(times), sum(times), sum(times) / wall_seconds) for what, times in sorted(groups.items())]
    host = wall_seconds - sum(call.seconds for call in calls)
    return rows + [("host, between calls", 0, host, host / wall_seconds)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a row spec from the benchmark's --workdir")
    parser.add_argument("--calls", action="store_true", help="print every call, not only the summary")
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from batchgen.bench.ours import EngineRun, run_pass, load

    loaded = load(EngineRun.read(args.spec))
    run_pass(loaded.engine, loaded.requests)  # compiles
    calls: list = []
    figures, _ = run_pass(loaded.engine, loaded.requests, calls)
    origin = calls[0].start if calls else time.perf_counter()
    if args.calls:
        print("| call | starts at s | seconds | rows | tokens |")
        print("|---|---|---|---|---|")
        for call in calls:
            print(f"| {call.kind} | {call.start - origin:.3f} | {call.seconds:.3f} | {call.rows} | {call.tokens} |")
        print()
    print(f"{figures.completion_tokens} tokens generated in {figures.wall_seconds:.2f} s "
          f"({figures.completion_tokens / figures.wall_seconds:.1f} tok/s), {figures.prompt_tokens} prompt tokens")
    print("| what | calls | seconds | share of the pass |")
    print("|---|---|---|---|")
    for what, count, seconds, share in summary(calls, figures.wall_seconds):
        print(f"| {what} | {count or ''} | {seconds:.2f} | {share:.0%} |")


if __name__ == "__main__":
    main()
