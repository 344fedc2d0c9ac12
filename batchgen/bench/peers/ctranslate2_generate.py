"""Peer: CTranslate2 `Generator.generate_batch` on the benchmark's workloads, in its own process.

Run by the benchmark with an interpreter that has ctranslate2, torch and transformers (the project needs none):

    PYTHON ctranslate2_generate.py SPEC.json

SPEC.json: {"gguf_path": ..., "cache_dir": ..., "quantization": "float32" | "int8", "workloads": [{"path": ...,
"batches": [64]}, ...], "out": ...}. The model is the same GGUF file that our engine reads: transformers
dequantizes it to float32 and exports it, and CTranslate2's converter turns that export into its own format, at
`quantization` (int8: int8 weights, float32 activations). Both steps are cached under `cache_dir` and not timed.

Prompts are the workload's token ids, given to CTranslate2 as its vocabulary's entries for those ids (which it
maps back to the same ids); chunks of `batch` prompts in workload order, greedy, each up to its budget, stopping
at the workload's stop ids. Every workload runs once untimed (warm-up, on the same prompts) and once timed.

This file imports only the standard library, ctranslate2 and (to convert) torch and transformers: the interpreter
running it need not have batchgen installed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__:  # imported by the tests as part of batchgen
    from .peer_common import peak_rss_bytes, read_workloads, timed_pass, write_result
    from .transformers_export import cached, transformers_export
else:  # run as a script by the peer's interpreter
    from peer_common import peak_rss_bytes, read_workloads, timed_pass, write_result
    from transformers_export import cached, transformers_export

# The compute type for each converted quantization: int8 weights with float32 activations for "int8".
COMPUTE_TYPES = {"float32": "float32", "int8": "int8_float32"}


def read_vocabulary(model_dir: Path) -> list[str]:
    """A converted model's vocabulary, entry i for token id i (vocabulary.json, or vocabulary.txt in old models)."""
    json_path, text_path = model_dir / "vocabulary.json", model_dir / "vocabulary.txt"
    if json_path.exists():
        return json.loads(json_path.read_text(encoding="utf-8"))
    if text_path.exists():
        return text_path.read_text(encoding="utf-8").split("\n")[:-1]
    raise FileNotFoundError(f"CTranslate2 model {model_dir} has no vocabulary.json or vocabulary.txt")


def ids_to_tokens(ids: list[int], vocabulary: list[str]) -> list[str]:
    """The vocabulary entries for `ids`; CTranslate2 maps each back to its id, so it gets the ids themselves."""
    try:
        return [vocabulary[i] for i in ids]
    except IndexError as e:
        bad = next(i for i in ids if not 0 <= i < len(vocabulary))
        raise ValueError(f"token id {bad} is outside the CTranslate2 vocabulary ({len(vocabulary)} entries)") from e


def converted_model(gguf_path: str, cache_dir: str | None, quantization: str) -> Path:
    """The CTranslate2 model of the GGUF file at `quantization`, converted once from the transformers export."""
    if quantization not in COMPUTE_TYPES:
        raise ValueError(f"quantization must be one of {sorted(COMPUTE_TYPES)}, got {quantization!r}")
    export = transformers_export(gguf_path, cache_dir)

    def convert(folder: Path) -> None:
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(export), low_cpu_mem_usage=True).convert(str(folder), quantization=quantization)

    return cached(export.parent.parent / "ctranslate2" / f"{export.name}-{quantization}", convert)


def main(spec_path: str) -> None:
    import ctranslate2

    spec = json.loads(Path(spec_path).read_text())
    quantization = spec["quantization"]
    workloads = read_workloads(spec)

    start = time.perf_counter()
    model_dir = converted_model(spec["gguf_path"], spec.get("cache_dir"), quantization)
    convert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    threads = len(os.sched_getaffinity(0))
    generator = ctranslate2.Generator(
        str(model_dir), device="cpu", compute_type=COMPUTE_TYPES[quantization], intra_threads=threads
    )
    vocabulary = read_vocabulary(model_dir)
    load_seconds = time.perf_counter() - start

    def generator_for(workload: dict):
        stop_ids = [int(i) for i in workload["stop_token_ids"]]

        def generate(chunk: list[dict]) -> list[list[int]]:
            budget = max(r["max_new_tokens"] for r in chunk)
            results = generator.generate_batch(
                [ids_to_tokens(r["prompt_ids"], vocabulary) for r in chunk], max_batch_size=len(chunk),
                beam_size=1, sampling_topk=1, max_length=budget, include_prompt_in_result=False,
                end_token=stop_ids or None, return_end_token=True,
            )
            return [result.sequences_ids[0] for result in results]

        return generate

    warmup_seconds = 0.0
    runs = []
    for workload, batches in workloads:
        for batch in batches:
            start = time.perf_counter()
            timed_pass(workload, batch, generator_for(workload))  # warm-up: the same prompts, untimed
            warmup_seconds += time.perf_counter() - start
            runs.append(timed_pass(workload, batch, generator_for(workload)))

    write_result(spec, {
        "system": f"ctranslate2 {quantization}",
        "status": "ran",
        "version": ctranslate2.__version__,
        "notes": f"compute type {COMPUTE_TYPES[quantization]}, {threads} threads; model converted from the "
        f"transformers export of {Path(spec['gguf_path']).name} (cached; {convert_seconds:.0f} s this run)",
        "load_seconds": load_seconds,
        "warmup_seconds": warmup_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
    })


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: ctranslate2_generate.py SPEC.json")
    main(sys.argv[1])
