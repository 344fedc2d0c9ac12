"""Throughput across replicas: the demo job with 1 and then 2 replicas on a two-node cluster on this machine,
each worker node pinned to one core (taskset) with one CPU, so that 2 replicas get twice the hardware of one.

    .venv/bin/python -m tests.cluster_scaling [--rows 64] [--max-new-tokens 48]

Prints each run's generated tokens per second (over the whole run, and after the first worker was ready) and
the 2-vs-1 ratios. A measurement, not a test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.ray_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent


def run(cluster: LocalCluster, replicas: int, out: Path, rows: int, max_new_tokens: int) -> dict:
    command = [
        sys.executable, "-m", "batchgen.cli", "run", str(ROOT / "jobs" / "demo.toml"), "--address", cluster.address,
        "--set", f"output.url={out}", "--set", f"execution.replicas={replicas}",
        "--set", f"execution.rows_per_shard={max(1, rows // 8)}", "--set", f"sampling.max_new_tokens={max_new_tokens}",
        "--set", "model.max_slots=8", "--overwrite", "--no-progress", "--json",
    ]
    if rows < 64:  # the bundled file has 64 prompts; fewer: a prefix of it
        command += ["--set", f"input.url={_prefix(out.parent, rows)}"]
    done = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"the {replicas}-replica run failed: {done.stderr[-3000:]}")
    return json.JSONDecoder().raw_decode(done.stdout, done.stdout.find("{\n"))[0]


def _prefix(where: Path, rows: int) -> str:
    import pyarrow.parquet as pq

    from batchgen.spec import DATA_DIR

    path = where / f"prompts-{rows}.parquet"
    pq.write_table(pq.read_table(DATA_DIR / "prompts.parquet").slice(0, rows), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bgs-"))
    try:
        with LocalCluster(root) as cluster:
            cluster.start_head()
            cluster.add_node("a", num_cpus=1, cpu_affinity=[0])
            cluster.add_node("b", num_cpus=1, cpu_affinity=[1])
            cluster.wait_for_nodes(3)
            # A short run first fills the XLA compilation cache, so that neither measured run pays for compiling.
            run(cluster, 1, root / "out-warm-up", 2, args.max_new_tokens)
            results = {n: run(cluster, n, root / f"out-{n}", args.rows, args.max_new_tokens) for n in (1, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for n, summary in results.items():
        print(
            f"{n} replica(s): {summary['completion_tokens']} tokens, {summary['wall_seconds']:.1f} s wall, "
            f"{summary['tokens_per_second']:.1f} tok/s overall, {summary['generation_tokens_per_second']:.1f} tok/s "
            f"after {summary['startup_seconds']:.1f} s start-up"
        )
    one, two = results[1], results[2]
    print(f"ratio 2/1: overall {two['tokens_per_second'] / one['tokens_per_second']:.2f}x, after start-up "
          f"{two['generation_tokens_per_second'] / one['generation_tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
