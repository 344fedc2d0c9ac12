"""Our engine on one workload in one configuration, run as its own process so its peak memory is its own.

Run by `run_benchmark` as `python -m batchgen.bench.ours SPEC.json`: it loads the model (dtype, quantization),
runs the workload once to compile (warm-up) and once more to measure (steady state), and writes an `EngineRow`
with the engine's counters, the outputs and the process's peak RSS as JSON to `spec.out`.

The first run of a benchmark also prepares: it builds the workloads with the model's tokenizer and writes them
where the other runs and the peers read them (so the model is not loaded once more only for its tokenizer), and
it can save the loaded float32 model as a keras-hub preset for the keras-hub peer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from batchgen.bench.report import EngineRow, PassFigures
from batchgen.bench.workloads import Workload, main_workload, short_workload, variable_workload


@dataclasses.dataclass(frozen=True)
class PrepareWorkloads:
    """Which workloads the first run builds, and where it writes them (variable_path None: main only)."""

    main_path: str
    main_prompts: int
    main_max_new_tokens: int
    variable_path: str | None
    variable_prompts: int
    variable_max_new_tokens: int
    seed: int
    short_path: str | None = None  # None: no short workload
    short_prompts: int = 0
    short_max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class EngineRun:
    """One configuration of our engine; `workload_path` names the workload file it runs."""

    name: str
    preset: str
    workload_path: str
    out: str
    dtype: str = "float32"
    quantization: str | None = None
    continuous: bool = True
    slots: int = 64
    steps_per_call: int = 8
    cache_tokens: int = 0  # 0: room for every slot at the longest sequence
    cache_dtype: str | None = None  # the KV cache's dtype; None: the model's compute dtype
    response_format: str | None = None  # every request constrained by it (structured output)
    prepare: PrepareWorkloads | None = None
    save_preset_to: str | None = None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self)), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> "EngineRun":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("prepare") is not None:
            data["prepare"] = PrepareWorkloads(**data["prepare"])
        return cls(**data)


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM from /proc, else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepare(prepare: PrepareWorkloads, tokenizer: Any, stop_token_ids: tuple[int, ...]) -> None:
    if tokenizer is None:
        raise ValueError("the benchmark needs a preset with a tokenizer to build its chat prompts; this one has none")
    main_workload(
        tokenizer, prompts=prepare.main_prompts, max_new_tokens=prepare.main_max_new_tokens,
        stop_token_ids=stop_token_ids, seed=prepare.seed,
    ).write(prepare.main_path)
    if prepare.short_path is not None:
        short_workload(
            tokenizer, prompts=prepare.short_prompts, max_new_tokens=prepare.short_max_new_tokens,
            stop_token_ids=stop_token_ids, seed=prepare.seed,
        ).write(prepare.short_path)
    if prepare.variable_path is not None:
        variable_workload(
            tokenizer, prompts=prepare.variable_prompts, max_new_tokens=prepare.variable_max_new_tokens,
            seed=prepare.seed,
        ).write(prepare.variable_path)


def run_pass(engine: Any, requests: list[Any], calls: list | None = None) -> tuple[PassFigures, dict[str, list[int]]]:
    """Runs every request once through `engine`; the engine's counters are reset first so they cover this pass
    (`calls`: a list the engine appends each device call of the pass to, see `EngineStats.calls`)."""
    from model.generation.engine import EngineStats

    engine.stats = EngineStats(calls=calls)
    outputs: dict[str, list[int]] = {}
    first = None
    start = time.perf_counter()
    for completion in engine.generate_stream(requests):
        if first is None:
            first = time.perf_counter() - start
        if completion.finish_reason == "error":
            raise RuntimeError(f"request {completion.request_id} failed in the engine: {completion.error}")
        outputs[str(completion.request_id)] = list(completion.token_ids)
    wall = time.perf_counter() - start
    s = engine.stats
    figures = PassFigures(
        wall_seconds=wall, first_result_seconds=first or 0.0, prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens, prefill_seconds=s.prefill_seconds, decode_seconds=s.decode_seconds,
        decode_calls=s.decode_calls, programs_compiled=s.programs_compiled, compile_seconds=s.compile_seconds,
        prompt_tokens_shared=s.prompt_tokens_shared,
    )
    return figures, outputs


@dataclasses.dataclass
class Loaded:
    """A spec's model, its engine sized for the spec's workload, and that workload's requests."""

    lm: Any
    engine: Any
    requests: list[Any]
    workload: Workload
    max_length: int
    load_seconds: float


def load(spec: EngineRun) -> Loaded:
    """The model loaded as `spec` says (prepared if asked) and its engine sized for the spec's workload."""
    from model.causal_lm import LlamaCausalLM
    from model.generation.engine import GenerationEngine
    from model.generation.requests import Request

    start = time.perf_counter()
    lm = LlamaCausalLM.from_preset(spec.preset, dtype=spec.dtype)
    if spec.quantization:
        lm.quantize(spec.quantization)
    load_seconds = time.perf_counter() - start
    tokenizer = lm.preprocessor.tokenizer if lm.preprocessor else None
    if spec.prepare is not None:
        _prepare(spec.prepare, tokenizer, tuple(lm.stop_token_ids))

    workload = Workload.read(spec.workload_path)
    config = lm.backbone.config
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in workload.requests)
    # Room for the longest prompt and its whole budget (see the engine's length check), and no more: the cache
    # is preallocated for every slot at this length.
    max_length = min(longest + 1, config.max_sequence_length)
    engine_start = time.perf_counter()
    engine = GenerationEngine(
        lm.backbone, tokenizer, max_slots=spec.slots, max_length=max_length, steps_per_call=spec.steps_per_call,
        cache_tokens=max(spec.cache_tokens, max_length) if spec.cache_tokens else None, continuous=spec.continuous,
        cache_dtype=spec.cache_dtype,
    )
    engine.prepare()  # the weights' decode layout and the KV cache are load work, not the warm-up pass's compiling
    requests = [
        Request(r.request_id, list(r.prompt_ids), r.max_new_tokens, stop_token_ids=workload.stop_token_ids,
                response_format=spec.response_format)
        for r in workload.requests
    ]
    return Loaded(lm, engine, requests, workload, max_length, load_seconds + (time.perf_counter() - engine_start))


def run(spec: EngineRun) -> dict[str, Any]:
    """Loads, prepares if asked, runs warm-up and steady passes; returns {"row": ..., "config": ...}."""
    loaded = load(spec)
    warmup, _ = run_pass(loaded.engine, loaded.requests)
    steady, outputs = run_pass(loaded.engine, loaded.requests)
    row = EngineRow(
        name=spec.name, workload=loaded.workload.name, dtype=spec.dtype, quantization=spec.quantization,
        continuous=spec.continuous, slots=spec.slots, steps_per_call=spec.steps_per_call, max_length=loaded.max_length,
        load_seconds=loaded.load_seconds, warmup=warmup, steady=steady, peak_rss_bytes=peak_rss_bytes(),
        outputs=outputs, response_format=spec.response_format, cache_dtype=str(loaded.engine.cache_dtype),
    )
    if spec.save_preset_to:  # after the peak was read: saving is not part of the row
        loaded.lm.save_to_preset(spec.save_preset_to)
    data = dataclasses.asdict(row)
    return {"row": data, "config": dataclasses.asdict(loaded.lm.backbone.config)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m batchgen.bench.ours SPEC.json")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    spec = EngineRun.read(argv[0])
    Path(spec.out).write_text(json.dumps(run(spec)), encoding="utf-8")


if __name__ == "__main__":
    main()
