"""Peer: Hugging Face transformers `generate` on the benchmark's workloads, in its own process.

Run by the benchmark with an interpreter that has torch and transformers (the project itself needs neither):

    PYTHON transformers_generate.py SPEC.json

SPEC.json: {"gguf_path": ..., "workloads": [{"path": ..., "batches": [16, 64, 128]}, ...], "out": ...}. The model is
the same GGUF file that our engine reads, dequantized by transformers to float32. Prompts are the workload's token
ids, batched in workload order with left padding; greedy, each batch up to the workload's max new tokens, stopping
at the workload's stop ids. A row's generated tokens are counted up to and including its first stop id (the stop
token was computed), as our engine counts them. One small untimed call first warms torch's allocator and threads;
every batch size then runs each whole workload, timed.

This file imports only the standard library, torch and transformers: the interpreter running it need not have
batchgen installed.
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
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = json.loads(Path(spec_path).read_text())
    workloads = read_workloads(spec)

    start = time.perf_counter()
    gguf = Path(spec["gguf_path"])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - start

    def generator_for(workload: dict):
        stop_ids = [int(i) for i in workload["stop_token_ids"]]
        pad = int(workload["pad_token_id"])

        def generate(chunk: list[dict]) -> list[list[int]]:
            width = max(len(r["prompt_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                n = len(r["prompt_ids"])
                ids[i, width - n :] = torch.tensor(r["prompt_ids"])
                mask[i, width - n :] = 1
            config = GenerationConfig(
                do_sample=False, max_new_tokens=max(r["max_new_tokens"] for r in chunk),
                eos_token_id=stop_ids or None, pad_token_id=pad,
            )
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            return out[:, width:].tolist()

        return generate

    start = time.perf_counter()
    first_workload = workloads[0][0]
    warmup = dict(first_workload, requests=[dict(r, max_new_tokens=4) for r in first_workload["requests"][:4]])
    timed_pass(warmup, 4, generator_for(first_workload))
    warmup_seconds = time.perf_counter() - start

    runs = [
        timed_pass(workload, batch, generator_for(workload)) for workload, batches in workloads for batch in batches
    ]
    write_result(spec, {
        "system": "transformers",
        "status": "ran",
        "version": f"{transformers.__version__} (torch {torch.__version__})",
        "notes": f"torch threads {torch.get_num_threads()}; left padding, float32 dequantized from {gguf.name}",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    })


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: transformers_generate.py SPEC.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
