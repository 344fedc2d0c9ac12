"""Peer: Hugging Face transformers `generate` on the benchmark's main workload, in its own process.

Run by the benchmark with an interpreter that has torch and transformers (the project itself needs neither):

    PYTHON transformers_generate.py SPEC.json

SPEC.json: {"gguf_path": ..., "workload_path": ..., "batches": [16, 64, 128], "out": ...}. The model is the same
GGUF file that our engine reads, dequantized by transformers to float32. Prompts are the workload's token ids,
batched in workload order with left padding; greedy, each batch up to the workload's max new tokens, stopping at
the workload's stop ids. A row's generated tokens are counted up to and including its first stop id (the stop
token was computed), as our engine counts them. One small untimed call first warms torch's allocator and
threads; every batch size then runs the whole workload, timed.

This file imports only the standard library, torch and transformers: the interpreter running it need not have
batchgen installed.
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
    """(tokens generated for a row, the output without the stop token) from its new tokens (padding after)."""
    for i, token in enumerate(new_tokens[:budget]):
        if token in stop_ids:
            return i + 1, new_tokens[:i]
    return min(budget, len(new_tokens)), new_tokens[:budget]


def main(spec_path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = json.loads(Path(spec_path).read_text())
    workload = json.loads(Path(spec["workload_path"]).read_text())
    requests = workload["requests"]
    stop_ids = [int(i) for i in workload["stop_token_ids"]]
    pad = int(workload["pad_token_id"])

    start = time.perf_counter()
    gguf = Path(spec["gguf_path"])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - start

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

    start = time.perf_counter()
    generate([dict(r, max_new_tokens=4) for r in requests[:4]])
    warmup_seconds = time.perf_counter() - start

    runs = []
    for batch in spec["batches"]:
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
        runs.append({
            "batch": batch, "wall_seconds": time.perf_counter() - start, "first_result_seconds": first,
            "prompt_tokens": prompt_tokens, "generated_tokens": generated, "outputs": outputs,
        })

    result = {
        "system": "transformers",
        "status": "ran",
        "version": f"{transformers.__version__} (torch {torch.__version__})",
        "notes": f"torch threads {torch.get_num_threads()}; left padding, float32 dequantized from {gguf.name}",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: transformers_generate.py SPEC.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
