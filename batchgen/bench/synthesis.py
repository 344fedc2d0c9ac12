"""Prompt sharing on a synthesis workload: `python -m batchgen.bench.synthesis`.

The workload of a dataset-synthesis job: distinct questions behind one long shared system prompt (~200 tokens),
`n` samples of each at temperature 0.9 (top_p 0.95), each sample with its own seed, stopping at the end of the
assistant's turn. The engine runs it with prompt sharing (`model.generation.prefix_cache`) and without, in one
process, each configuration warmed up on the whole workload first and then measured on a second pass; the
order alternates over `--rounds` so drift on a shared machine hits both. The outputs are compared: greedy ones
must be identical; sampled ones may differ where a float-level difference flips a draw (a prompt's rest
prefilled against cached pages adds up in another order than a whole prefill: log-probabilities within ~1e-5),
so the share of identical completions is reported.

Prints, per configuration, generated tokens per second over the whole pass, the prompt tokens prefilled /
copied / received, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from batchgen.bench.workloads import SHORT, SUBJECTS

# ~210 tokens of instructions (the demo tokenizer's count), shared by every prompt of the workload (as a synthesis job's system prompt is).
SYSTEM_PROMPT = (
    "You are writing training data for a small assistant model. Every answer you give will be read by students "
    "between twelve and sixteen years old, so use plain words, short sentences and concrete examples. Never "
    "invent numbers, dates or names; when you are not sure of a fact, say so in a few words instead of guessing. "
    "Keep each answer between two and four sentences. Do not use lists, headings, tables or any formatting: "
    "write ordinary prose. Do not start with a greeting and do not repeat the question. If the question is "
    "unclear, answer the most likely reading of it. Prefer examples from everyday life, such as cooking, sport, "
    "weather, travel or school. Avoid jargon; when a technical word is needed, explain it in the same sentence. "
    "Stay friendly and neutral, and never mention that you are an assistant or a model. When a question asks "
    "for an opinion, give the main views fairly in one sentence each. When it asks for a story or a poem, keep "
    "it short and suitable for a classroom, and end it on a hopeful note."
)


def synthesis_prompts(tokenizer, prompts: int, seed: int) -> list[list[int]]:
    """`prompts` distinct chat prompts: the shared system prompt and a one-sentence question each."""
    rng = random.Random(seed)
    seen: set[str] = set()
    questions = []
    while len(questions) < prompts:
        question = rng.choice(SHORT).format(s=rng.choice(SUBJECTS))
        if question not in seen or len(seen) == len(SHORT) * len(SUBJECTS):
            seen.add(question)
            questions.append(question)
    return [
        list(tokenizer.tokenize_chat([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]))
        for q in questions
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts [16]")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt [8]")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="measured passes per configuration, alternating")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="greedy instead of top_p 0.9 / 0.95")
    args = parser.parse_args()

    from model import LlamaCausalLM
    from model.generation.engine import EngineStats, GenerationEngine
    from model.generation.requests import Request, SamplingParams

    lm = LlamaCausalLM.from_preset("smollm2_135m_instruct", dtype=args.dtype)
    tokenizer = lm.preprocessor.tokenizer
    prompts = synthesis_prompts(tokenizer, args.prompts, args.seed)
    sampling = SamplingParams("greedy") if args.greedy else SamplingParams("top_p", temperature=0.9, top_p=0.95)
    stops = tuple(lm.stop_token_ids or tokenizer.stop_token_ids)
    requests = [
        Request((p, s), ids, args.max_new_tokens, sampling, stop_token_ids=stops, seed=1000 * p + s)
        for p, ids in enumerate(prompts) for s in range(args.n)
    ]
    max_length = max(len(ids) for ids in prompts) + args.max_new_tokens + 1
    engines = {
        name: GenerationEngine(lm.backbone, tokenizer, max_slots=args.slots, max_length=max_length, prefix_caching=on)
        for name, on in (("sharing", True), ("no sharing", False))
    }
    for engine in engines.values():  # warm-up: compiles every program the measured passes use
        engine.generate(requests)

    passes: dict[str, list[dict]] = {name: [] for name in engines}
    outputs: dict[str, list] = {}
    for round_ in range(args.rounds):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            engine.stats = EngineStats()
            start = time.perf_counter()
            completions = engine.generate(requests)
            wall = time.perf_counter() - start
            outputs[name] = [c.token_ids for c in completions]
            s = engine.stats
            passes[name].append(dict(
                wall_s=wall, completion_tokens=s.completion_tokens, tokens_per_s=s.completion_tokens / wall,
                prompt_tokens_prefilled=s.prompt_tokens, prompt_tokens_shared=s.prompt_tokens_shared,
                prompt_tokens_received=s.prompt_tokens_received, prefill_s=s.prefill_seconds, decode_s=s.decode_seconds,
                programs_compiled=s.programs_compiled,
            ))
    identical = sum(a == b for a, b in zip(outputs["sharing"], outputs["no sharing"])) / len(requests)
    if args.greedy and identical < 1:
        raise SystemExit(f"greedy outputs with and without prompt sharing differ ({identical:.1%} identical)")

    best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in passes.items()}
    mean_prompt = sum(len(p) for p in prompts) / len(prompts)
    how = "greedy" if args.greedy else "top_p 0.9/0.95"
    print(f"synthesis workload: {args.prompts} prompts of {mean_prompt:.0f} tokens on average (a shared system prompt"
          f" and a question) x {args.n} samples, {how}, <= {args.max_new_tokens} new tokens, {args.slots} slots, "
          f"{args.dtype}; best of {args.rounds} pass(es); {identical:.1%} of completions identical")
    print("| configuration | wall s | gen tok/s | prompt tokens prefilled / copied / received | compiles |")
    print("|---|---|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {r['prompt_tokens_prefilled']:,} / "
              f"{r['prompt_tokens_shared']:,} / {r['prompt_tokens_received']:,} | {r['programs_compiled']} |")
    ratio = best["no sharing"]["wall_s"] / best["sharing"]["wall_s"]
    print(f"sharing is {ratio:.2f}x faster (wall time)")
    print(json.dumps(dict(passes=passes, speedup=ratio, identical=identical)))


if __name__ == "__main__":
    main()
