"""`batchgen bench`: throughput of our engine beside the alternatives, on fixed workloads, with the compute floor.

- workloads: the deterministic chat prompts (main: mixed lengths, stop at end of turn; short: under 64 tokens,
  decode-heavy; variable: 1..256 tokens)
- ours: one configuration of our engine, run in its own process (warm-up pass, then the steady pass measured)
- peers/: transformers, CTranslate2 (float32, int8), vLLM and keras-hub, each a script run by `--peer-python`
  (vLLM: `--vllm-python`)
- floor: FLOPs per generated token and the float32 matmul rate measured in the same run
- runner: `run_benchmark(options) -> BenchReport`; report: the tables and JSON

Example:
    >>> from batchgen.bench import BenchOptions, run_benchmark
    >>> report = run_benchmark(BenchOptions(peers=True, peer_python="/opt/goldenv/bin/python"))  # doctest: +SKIP
    >>> print(report.render_text())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that `batchgen --help` (which registers the bench command) does not import JAX.
_EXPORTS = {"BenchOptions": "options", "BenchReport": "report", "run_benchmark": "runner"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batchgen.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"batchgen.bench.{_EXPORTS[name]}"), name)
