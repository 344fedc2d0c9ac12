"""Scoring throughput against the engine's prefill rate, on the same tokens: `python -m batchgen.bench.scoring`.

Both run the bundled evaluation set's (question, choice) pairs with the demo model: prefill as generation of one
token per pair (context + continuation as the prompt: a prefill and no decode step), scoring as
`GenerationEngine.score_stream` of the same pairs. Each runs twice and the second (compiled) pass is measured;
the figure is input tokens per second of the compute phase (the packed prefill calls, the scoring calls).
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq

from batchgen.spec import DATA_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()

    from model import LlamaCausalLM
    from model.generation.engine import GenerationEngine
    from model.generation.requests import Request
    from model.generation.scoring import ScoreRequest, split_pair

    lm = LlamaCausalLM.from_preset("smollm2_135m_instruct", dtype=args.dtype)
    tokenizer = lm.preprocessor.tokenizer
    table = pq.read_table(DATA_DIR / "eval" / "choice.parquet").slice(0, args.items).to_pylist()
    pairs = [split_pair(tokenizer.tokenize, tokenizer._encode, row["question"], c) for row in table for c in row["choices"]]
    engine = GenerationEngine(lm.backbone, tokenizer, max_slots=64, max_length=256)
    generate = [Request(i, c + x, 1) for i, (c, x) in enumerate(pairs)]
    score = [ScoreRequest(i, c, x) for i, (c, x) in enumerate(pairs)]

    figures = {}
    for _ in range(2):
        engine.stats.prompt_tokens, engine.stats.prefill_seconds = 0, 0.0
        wall = time.perf_counter()
        engine.generate(generate)
        figures["prefill_wall_s"] = time.perf_counter() - wall
        figures["prefill_tokens_per_s"] = engine.stats.prompt_tokens / engine.stats.prefill_seconds
        engine.score_stats.seconds = 0.0
        wall = time.perf_counter()
        list(engine.score_stream(score))
        figures["score_wall_s"] = time.perf_counter() - wall
        # The same tokens as the prefill pass (context + continuation), as a scoring job counts its prompt tokens.
        figures["score_tokens_per_s"] = sum(len(c) + len(x) for c, x in pairs) / engine.score_stats.seconds
    figures.update(pairs=len(pairs), dtype=args.dtype,
                   ratio=figures["score_tokens_per_s"] / figures["prefill_tokens_per_s"])  # fmt: skip
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
