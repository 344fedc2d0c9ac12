"""Where a decode step's time goes: one jitted decode call profiled op by op, grouped by what the op does.

Run as `batchgen bench --profile-step` (or `python -m batchgen.bench.profile_step [--slots 64] ...`). It loads the
model, lays out `slots` sequences of `context` cached tokens over the paged KV cache as the engine would, runs the
engine's decode step (`model.generation.steps.decode`) once to compile and once more under `jax.profiler`, and maps
every XLA op of the trace back to the Python function that emitted it (the HLO's stack frames), so that the table
reads in the model's terms: weight products, LM head, attention over pages, KV cache writes, sampling, the rest.

XLA's CPU runtime records per-op events only with `--xla_cpu_enable_xprof_traceme=true`, which must be set before
JAX starts: the command re-runs this module in a child process with that flag (and a dump directory for the HLO).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# An op's group: the first of these functions found on the stack of the code that emitted it (the LM head's
# products run through `project` too, so `logits` is looked for first).
GROUPS = (
    ("logits", "LM head"),
    ("project", "weight products"),
    ("matmul", "weight products"),  # the CPU kernel's call (model/kernels/cpu_matmul.py)
    ("decode_attention", "attention over pages"),
    ("write_and_attend", "attention over pages"),  # the CPU kernel's call: it writes the new entries too
    ("write_layer", "KV cache writes"),
    ("sample_next", "sampling"),
    ("first_argmax", "sampling"),
    ("greedy_tokens", "LM head"),  # the CPU kernel's head that returns greedy tokens, not logits
    ("rms_norm", "norms, rotary, activations"),
    ("rotate", "norms, rotary, activations"),
    ("_decoder_layer", "norms, rotary, activations"),
)


def _stack_functions(hlo_text: str) -> dict[str, list[str]]:
    """Instruction name -> the functions on its stack (leaf first), from an HLO dump's stack frame tables."""
    def table(title: str) -> dict[int, str]:
        block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", hlo_text, re.S | re.M)
        return {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+) (.*)$", block.group(1) if block else "", re.M)}

    functions = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    locations = {k: int(re.search(r"function_name_id=(\d+)", v).group(1)) for k, v in table("FileLocations").items()}
    frames = {k: tuple(int(x) for x in re.findall(r"=(\d+)", v)) for k, v in table("StackFrames").items()}

    def chain(frame: int) -> list[str]:
        names, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            names.append(functions.get(locations.get(location, -1), "?"))
            frame = parent
        return names

    result = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo_text, re.M):
        result[m.group(1)] = chain(int(m.group(2)))
    return result


def _group(functions: list[str]) -> str:
    """The group of the first of GROUPS's functions on the stack; a function nested in one counts as it (a
    stack may name only `project.<locals>.xla_product`)."""
    outer = {function.split(".<locals>.")[0] for function in functions}
    return next((group for name, group in GROUPS if name in outer), "other")


def _child(args: argparse.Namespace, dump: str, trace: str) -> None:
    import jax
    import numpy as np

    from batchgen.bench.slots import decode_weights
    from model.causal_lm import LlamaCausalLM
    from model.generation import paged_cache, sampling, steps
    from model.generation.paged_cache import PAGE_SIZE, PagedKVCache, PageTable, pages_for
    from model.generation.requests import SamplingParams

    lm = LlamaCausalLM.from_preset(args.preset, dtype=args.dtype)
    if args.quantization == "int8":
        lm.quantize("int8")
    config, b, context = lm.backbone.config, args.slots, args.context
    pages = PageTable(b * pages_for(context + args.steps + 1, PAGE_SIZE), PAGE_SIZE, b, context + args.steps + 1)
    for slot in range(b):
        pages.admit(slot, context + args.steps, context + args.steps)
    cache = PagedKVCache.allocate(config, pages.pages, PAGE_SIZE, args.cache_dtype or lm.backbone.compute_dtype)
    params = decode_weights(lm)  # as the engine runs them
    rows, variant = sampling.row_sampling_params([SamplingParams(args.sampler)] * b)
    ints = lambda value: np.full(b, value, np.int32)  # noqa: E731

    def call(cache):
        return steps.decode(
            params, cache, pages.table, pages.owner, pages.start, ints(1), ints(context), ints(1), np.ones(b, bool),
            ints(10**6), np.full((b, 4), -1, np.int32), rows, np.arange(b, dtype=np.uint32), config=config,
            variant=variant, steps=args.steps, chunks=len(paged_cache.chunk_sizes(pages.pages)), max_length=10**6,
        )

    cache = jax.block_until_ready(call(cache))[0]  # compiles
    start = time.perf_counter()
    cache = jax.block_until_ready(call(cache))[0]
    wall = time.perf_counter() - start
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        jax.block_until_ready(call(cache))
    (Path(trace) / "wall.json").write_text(json.dumps({"wall_seconds": wall}))


def profile(args: argparse.Namespace) -> dict:
    """Runs the child, then groups the trace's op time per decode step; returns the table as a dict."""
    with tempfile.TemporaryDirectory() as work:
        dump, trace = os.path.join(work, "hlo"), os.path.join(work, "trace")
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true "
                   f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*decode.*")
        subprocess.run([sys.executable, "-m", "batchgen.bench.profile_step", "--child", dump, trace, *args.argv],
                       env=env, check=True)
        hlo = "\n".join(Path(f).read_text() for f in glob.glob(f"{dump}/*after_optimizations.txt"))
        stacks = _stack_functions(hlo)
        events = json.load(gzip.open(glob.glob(f"{trace}/**/*.trace.json.gz", recursive=True)[0]))
        wall = json.loads((Path(trace) / "wall.json").read_text())["wall_seconds"]
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in stacks:
            totals[_group(stacks[event["name"]])] += event["dur"] / 1e3 / args.steps  # ms per step
    return {"slots": args.slots, "context": args.context, "step_ms": wall * 1e3 / args.steps,
            "groups_ms": dict(totals.most_common())}


def render(result: dict) -> str:
    groups = result["groups_ms"]
    ops = sum(groups.values())
    products = groups.get("weight products", 0.0) + groups.get("LM head", 0.0)
    lines = [f"decode step at {result['slots']} slots, {result['context']} cached tokens each: "
             f"{result['step_ms']:.1f} ms wall per step; op time by group (ms per step, share of op time):"]
    lines += [f"  {name:<28} {ms:8.1f}  {ms / ops:6.1%}" for name, ms in groups.items()]
    lines.append(f"  step / weight products (LM head included): {result['step_ms'] / products:.2f}x")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", choices=("none", "int8"), default="none")
    parser.add_argument("--cache-dtype", default=None)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--context", type=int, default=100, help="cached tokens per slot")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per call")
    parser.add_argument("--sampler", default="greedy")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        _child(parse(argv[3:]), argv[1], argv[2])
        return
    args = parse(argv)
    result = profile(args)
    print(render(result))


if __name__ == "__main__":
    main(sys.argv[1:])
