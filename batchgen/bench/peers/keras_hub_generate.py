"""Peer: keras-hub `LlamaCausalLM.generate` (JAX) on the benchmark's workloads, in its own process.

Run by the benchmark with an interpreter that has keras-hub and JAX (the project itself needs neither keras-hub):

    PYTHON keras_hub_generate.py SPEC.json

SPEC.json: {"preset_dir": ..., "workloads": [{"path": ..., "batches": [64]}, ...], "out": ...}. keras-hub cannot
read GGUF, so the benchmark saves our float32 model (loaded from the GGUF file) as a keras-hub preset with
`save_to_preset`: the same weights. Generation runs without a preprocessor on the workload's token ids: each batch
is right-padded to its longest prompt plus the max new tokens (keras-hub generates until every row stops or the
batch's length is full), greedy, stopping at the workload's stop ids. A row's generated tokens are counted up to and
including its first stop id, at most its budget; what keras-hub computes past that is its own overhead. keras-hub
steps every row from the end of the batch's shortest prompt, so in a batch of mixed prompt lengths it walks through
the longer prompts one token per step: that is how it runs such a batch, and it is measured as it is.

Every batch shape of each workload is compiled first, on rows that need a single step (reported as warm-up); then
each whole workload is timed.

This file imports only the standard library, numpy, keras and keras-hub: the interpreter running it need not
have batchgen installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__:  # imported by the tests as part of batchgen
    from .peer_common import peak_rss_bytes, read_workloads, timed_pass, write_result
else:  # run as a script by the peer's interpreter
    from peer_common import peak_rss_bytes, read_workloads, timed_pass, write_result


def main(spec_path: str) -> None:
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    import keras_hub
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    workloads = read_workloads(spec)

    start = time.perf_counter()
    lm = keras_hub.models.LlamaCausalLM.from_preset(spec["preset_dir"], preprocessor=None)
    lm.compile(sampler="greedy")
    load_seconds = time.perf_counter() - start

    def generator_for(workload: dict, compile_only: bool = False):
        stop_ids = [int(i) for i in workload["stop_token_ids"]]
        # Not the workload's pad id: keras-hub treats a stop id anywhere in a row as "already stopped", and this
        # model pads with its end-of-turn token. Padding is masked out, so any other id serves.
        pad = next(i for i in range(len(stop_ids) + 1) if i not in stop_ids)

        def generate(chunk: list[dict]) -> list[list[int]]:
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

        return generate

    # Warm-up: compile every batch shape of the workloads (keras-hub compiles one program per shape) on
    # nearly-full rows, so that it costs the compile and a step, not a whole untimed pass.
    start = time.perf_counter()
    for workload, batches in workloads:
        for batch in batches:
            timed_pass(workload, batch, generator_for(workload, compile_only=True))
    warmup_seconds = time.perf_counter() - start
    runs = [
        timed_pass(workload, batch, generator_for(workload)) for workload, batches in workloads for batch in batches
    ]

    write_result(spec, {
        "system": "keras-hub",
        "status": "ran",
        "version": f"{keras_hub.__version__} (keras {keras.__version__}, jax)",
        "notes": "right padding to the batch's longest prompt + max new tokens (keras-hub steps every row from "
        "the shortest prompt's end); warm-up = compiling each batch shape",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    })


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: keras_hub_generate.py SPEC.json")
    main(sys.argv[1])
