"""The decode step at several batch sizes: `python -m batchgen.bench.slots [--slots 64,128,256]`.

Each size gets full slots (every slot `--context` cached tokens), one jitted decode call of `--steps` steps is
compiled per size, and then the calls run interleaved, `--rounds` times each, so drift on a shared machine hits
every size alike. Prints the best per-step time, the generated tokens per second at full occupancy and the time
per token: what a job with more rows than slots gains from more slots.
"""

from __future__ import annotations

import argparse
import time


def full_slots_decode(lm, params, slots: int, context: int, steps_per_call: int, decode=None, cache_dtype=None):
    """(call, cache): one jitted decode call of `steps_per_call` greedy steps over `slots` full slots of `context`
    cached tokens each (call(cache) -> the new cache, which the call donates), and a zeroed cache for it.
    `decode` replaces the engine's `steps.decode` (same signature), e.g. with parts of the step removed;
    `cache_dtype`: the cache's (default the model's compute dtype)."""
    import numpy as np

    from model.generation import paged_cache, sampling, steps
    from model.generation.paged_cache import PAGE_SIZE, PagedKVCache, PageTable, pages_for
    from model.generation.requests import SamplingParams

    config, b, length = lm.backbone.config, slots, context + steps_per_call + 1
    decode = decode or steps.decode
    pages = PageTable(b * pages_for(length, PAGE_SIZE), PAGE_SIZE, b, length)
    for slot in range(b):
        pages.admit(slot, length - 1, length - 1)
    rows, variant = sampling.row_sampling_params([SamplingParams("greedy")] * b)
    ints = lambda value: np.full(b, value, np.int32)  # noqa: E731

    def call(cache):
        return decode(
            params, cache, pages.table[:, : pages.width(b)], pages.owner, pages.start, ints(1), ints(context),
            ints(1), np.ones(b, bool), ints(10**6), np.full((b, 4), -1, np.int32), rows, np.arange(b, dtype=np.uint32),
            config=config, variant=variant, steps=steps_per_call, chunks=len(paged_cache.chunk_sizes(pages.pages)),
            max_length=10**6,
        )[0]

    return call, PagedKVCache.allocate(config, pages.pages, PAGE_SIZE, cache_dtype or lm.backbone.compute_dtype)


def decode_weights(lm) -> dict:
    """The decode weights the engine would run `lm` with (per layer; in the CPU kernel's panels where it runs)."""
    from model.generation import engine, steps

    return steps.decode_weights(lm.backbone.params(), lm.backbone.config, kernel=engine.kernel_products(lm.backbone))


def best_step_seconds(programs: dict, rounds: int, steps_per_call: int) -> dict:
    """Runs the programs interleaved, `rounds` times each, so that drift on a shared machine hits all alike; returns
    each one's best time per step. programs: name -> [call, state], call(state) -> the next state (a donated cache
    is replaced by the one the call returns)."""
    import jax

    best = {name: float("inf") for name in programs}
    for _ in range(rounds):
        for name, entry in programs.items():
            start = time.perf_counter()
            entry[1] = jax.block_until_ready(entry[0](entry[1]))
            best[name] = min(best[name], (time.perf_counter() - start) / steps_per_call)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slots", default="64,128,256")
    parser.add_argument("--context", type=int, default=100, help="cached tokens per slot")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per call")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import jax

    from model import LlamaCausalLM

    lm = LlamaCausalLM.from_preset(args.preset, dtype=args.dtype)
    params = decode_weights(lm)

    def prepare(b: int):
        call, cache = full_slots_decode(lm, params, b, args.context, args.steps)
        return call, jax.block_until_ready(call(cache))  # compiled

    sizes = [int(s) for s in args.slots.split(",")]
    best = best_step_seconds({b: list(prepare(b)) for b in sizes}, args.rounds, args.steps)
    print("| slots | ms per step | generated tok/s at full occupancy | ms per token |")
    print("|---|---|---|---|")
    for b, step in best.items():
        print(f"| {b} | {step * 1e3:.0f} | {b / step:.0f} | {step / b * 1e3:.2f} |")


if __name__ == "__main__":
    main()
