"""Peer: keras-hub `LlamaCausalLM.generate` (JAX) on the benchmark's main workload, in its own process.

Run by the benchmark with an interpreter that has keras-hub and JAX (the project itself needs neither keras-hub):

    PYTHON keras_hub_generate.py SPEC.json

SPEC.json: {"preset_dir": ..., "workload_path": ..., "batches": [64], "out": ...}. keras-hub cannot read GGUF, so
the benchmark saves our float32 model (loaded from the GGUF file) as a keras-hub preset with `save_to_preset`:
the same weights. Generation runs without a preprocessor on the workload's token ids: each batch is right-padded
to its longest prompt plus the max new tokens (keras-hub generates until every row stops or the batch's length is
full), greedy, stopping at the workload's stop ids. A row's generated tokens are counted up to and including its
first stop id, at most its budget; what keras-hub computes past that is its own overhead. keras-hub steps every
row from the end of the batch's shortest prompt, so in a batch of mixed prompt lengths it walks through the longer
prompts one token per step: that is how it runs such a batch, and it is measured as it is.

Every batch shape of the workload is compiled first, on rows that need a single step (reported as warm-up); then
the whole workload is timed.

This file imports only the standard library, numpy, keras and keras-hub: the interpreter running it need not
have batchgen installed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_generated(new_tokens: list[int], stop_ids: set[int], budget: int) -> tuple[int, list[int]]:
    """(tokens generated for a row, the output without the stop token), within the row's budget."""
    for i, token in enumerate(new_tokens[:budget]):
        if token in stop_ids:
            return i + 1, new_tokens[:i]
    return min(budget, len(new_tokens)), new_tokens[:budget]


def main(spec_path: str) -> None:
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    import keras_hub
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    workload = json.loads(Path(spec["workload_path"]).read_text())
    requests = workload["requests"]
    stop_ids = [int(i) for i in workload["stop_token_ids"]]
    # Not the workload's pad id: keras-hub treats a stop id anywhere in a row as "already stopped", and this
    # model pads with its end-of-turn token. Padding is masked out, so any other id serves.
    pad = next(i for i in range(len(stop_ids) + 1) if i not in stop_ids)

    start = time.perf_counter()
    lm = keras_hub.models.LlamaCausalLM.from_preset(spec["preset_dir"], preprocessor=None)
    lm.compile(sampler="greedy")
    load_seconds = time.perf_counter() - start

    def generate(chunk: list[dict], compile_only: bool = False) -> list[list[int]]:
        longest = max(len(r["prompt_ids"]) for r in chunk)
        width = longest + max(r["max_new_tokens"] for r in chunk)
        ids = np.full((len(chunk), width), pad, dtype="int32")
        mask = np.zeros((len(chunk), width), dtype=bool)
        for i, r in enumerate(chunk):
            ids[i, : len(r["prompt_ids"])] = r["prompt_ids"]
            mask[i, : len(r["prompt_ids"])] = True
        if compile_only:
            # The same shapes (so the same program) with every position but the last given: one step to generate.
            mask[:, :-1] = True
        out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop_ids or None)
        token_ids = np.asarray(out["token_ids"])
        return [token_ids[i, len(r["prompt_ids"]) :].tolist() for i, r in enumerate(chunk)]

    def run(batch: int) -> dict:
        outputs: dict[str, list[int]] = {}
        generated = prompt_tokens = 0
        first = None
        start = time.perf_counter()
        for offset in range(0, len(requests), batch):
            chunk = requests[offset : offset + batch]
            for r, new in zip(chunk, generate(chunk)):
                count, kept = count_generated(new, set(stop_ids), r["max_new_tokens"])
                generated += count
                prompt_tokens += len(r["prompt_ids"])
                outputs[r["request_id"]] = kept
            if first is None:
                first = time.perf_counter() - start
        return {
            "batch": batch, "wall_seconds": time.perf_counter() - start, "first_result_seconds": first,
            "prompt_tokens": prompt_tokens, "generated_tokens": generated, "outputs": outputs,
        }

    # Warm-up: compile every batch shape of the workload (keras-hub compiles one program per shape) on
    # nearly-full rows, so that it costs the compile and a step, not a whole untimed pass.
    start = time.perf_counter()
    for batch in spec["batches"]:
        for offset in range(0, len(requests), batch):
            generate(requests[offset : offset + batch], compile_only=True)
    warmup_seconds = time.perf_counter() - start
    runs = [run(batch) for batch in spec["batches"]]

    result = {
        "system": "keras-hub",
        "status": "ran",
        "version": f"{keras_hub.__version__} (keras {keras.__version__}, jax)",
        "notes": "right padding to the batch's longest prompt + max new tokens (keras-hub steps every row from "
        "the shortest prompt's end); warm-up = compiling each batch shape",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: keras_hub_generate.py SPEC.json")
    main(sys.argv[1])
