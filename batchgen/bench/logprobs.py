"""What `sampling.logprobs = k` costs: `python -m batchgen.bench.logprobs`.

The demo job's prompts (batchgen/data/prompts.parquet, chat) through the demo model's engine with the demo job's
settings (greedy, 64 new tokens, 32 slots, 8192 cache positions), without log-probabilities and with k
alternatives. The settings alternate over `--rounds` after a warm-up pass of each (which compiles its programs),
so that a machine whose load changes weighs on both alike; the figure is generated tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq

from batchgen.spec import DATA_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from model import LlamaCausalLM
    from model.generation.engine import GenerationEngine
    from model.generation.requests import Request

    lm = LlamaCausalLM.from_preset("smollm2_135m_instruct", dtype="float32")
    tokenizer = lm.preprocessor.tokenizer
    prompts = [tokenizer.tokenize_chat(m, add_generation_prompt=True) for m in pq.read_table(DATA_DIR / "prompts.parquet").column("messages").to_pylist()]
    engine = GenerationEngine(lm.backbone, tokenizer, max_slots=32, max_length=1024, cache_tokens=8192)
    stop = tuple(lm.stop_token_ids or tokenizer.stop_token_ids)

    def run(k: int | None) -> tuple[float, int]:
        requests = [Request(i, p, args.max_new_tokens, stop_token_ids=stop, logprobs=k) for i, p in enumerate(prompts)]
        wall = time.perf_counter()
        completions = engine.generate(requests)
        return time.perf_counter() - wall, sum(len(c.token_ids) for c in completions)

    settings = {"logprobs=0": None, f"logprobs={args.k}": args.k}
    for k in settings.values():
        run(k)  # compiles
    seconds = {name: 0.0 for name in settings}
    tokens = {name: 0 for name in settings}
    for _ in range(args.rounds):
        for name, k in settings.items():
            s, n = run(k)
            seconds[name] += s
            tokens[name] += n
    figures = {f"{name} tokens_per_s": tokens[name] / seconds[name] for name in settings}
    names = list(settings)
    figures["cost"] = 1 - figures[f"{names[1]} tokens_per_s"] / figures[f"{names[0]} tokens_per_s"]
    figures.update(prompts=len(prompts), tokens_per_round=tokens[names[0]] // args.rounds, rounds=args.rounds)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
