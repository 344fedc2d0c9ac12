"""Measures the structured-output libraries batchgen could use (xgrammar, llguidance, outlines-core) on CPU.

Not a test and not part of the project: it chose the library (README, "Structured output"). For each library it
measures, with the demo model's tokenizer (SmolLM2, vocabulary 49152):
  - setup: building the library's view of the vocabulary (once per process);
  - compile: one typical JSON schema (`SCHEMA`), from nothing to a matcher that can fill a mask;
  - mask fill: one decode step's token bitmasks for 64 rows, each row walking a different valid document, and
    accepting the next token (per step, all 64 rows).

Run it in a venv of its own (xgrammar pulls torch, transformers and triton), with the tokenizer written by the
project's venv first:

    .venv/bin/python -c "import os; os.environ['KERAS_BACKEND']='jax'; from model.causal_lm import LlamaCausalLM; \\
        open('/tmp/smollm2.json','w').write(LlamaCausalLM.from_preset('smollm2_135m_instruct').preprocessor.tokenizer.to_tokenizer_json())"
    python -m venv /tmp/grammar && /tmp/grammar/bin/pip install xgrammar llguidance outlines-core torch transformers
    /tmp/grammar/bin/python tests/grammar_libraries.py /tmp/smollm2.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

ROWS = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "maxLength": 200},
        "answer": {"type": "string", "maxLength": 400},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
    "required": ["question", "answer", "difficulty", "tags", "score"],
    "additionalProperties": False,
}


def documents(n: int) -> list[str]:
    """n different compact JSON documents that satisfy SCHEMA."""
    words = "ocean wind river stone light city forest number music paper garden engine".split()
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        pick = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
        doc = {
            "question": f"What is the {pick(3)} of {pick(2)}?",
            "answer": f"The {pick(4)} is {pick(6)}, as {pick(5)}.",
            "difficulty": ["easy", "medium", "hard"][i % 3],
            "tags": [pick(1) for _ in range(i % 4)],
            "score": int(i % 11),
        }
        docs.append(json.dumps(doc, separators=(",", ":")))
    return docs


def timed(fn, repeat: int = 1):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def report(name: str, setup: float, compiles: list[float], steps: list[float], tokens: int) -> None:
    print(
        f"{name:14s} setup {setup * 1e3:8.1f} ms | compile first {compiles[0] * 1e3:8.1f} ms, "
        f"median of rest {statistics.median(compiles[1:]) * 1e3:7.1f} ms | mask+accept 64 rows: "
        f"median {statistics.median(steps) * 1e3:6.2f} ms, mean {statistics.mean(steps) * 1e3:6.2f} ms, "
        f"p95 {sorted(steps)[int(0.95 * len(steps))] * 1e3:6.2f} ms over {len(steps)} steps ({tokens} tokens)"
    )


def walk(streams: list[list[int]], fill, accept) -> list[float]:
    """Steps all rows together: fill(rows) then accept(row, token) per live row; per-step seconds."""
    steps = []
    for t in range(max(len(s) for s in streams)):
        live = [i for i, s in enumerate(streams) if t < len(s)]
        start = time.perf_counter()
        fill(live)
        for i in live:
            accept(i, streams[i][t])
        steps.append(time.perf_counter() - start)
    return steps


def measure_llguidance(tokenizer_json: str, streams: list[list[int]], vocab: int) -> None:
    import llguidance
    import llguidance.numpy

    (tok,), (setup,) = timed(lambda: (llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=2),))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})

    def compile_one():
        matcher = llguidance.LLMatcher(tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        mask = np.zeros((1, (vocab + 31) // 32), np.int32)
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)  # the first mask builds the lexer
        return matcher

    base, compiles = timed(compile_one, repeat=6)
    matchers = [base.deep_copy() for _ in streams]
    executor = llguidance.LLExecutor()
    mask = np.zeros((ROWS, (vocab + 31) // 32), np.int32)

    def fill(live):
        llguidance.numpy.fill_next_token_bitmask_par(executor, [(matchers[i], i) for i in live], mask)

    def accept(i, token):
        assert (mask[i, token // 32] >> (token % 32)) & 1, (i, token)
        assert matchers[i].consume_token(token), matchers[i].get_error()

    steps = walk(streams, fill, accept)
    report("llguidance", setup, compiles, steps, sum(map(len, streams)))


def measure_xgrammar(tokenizer_json_path: str, streams: list[list[int]], vocab: int) -> None:
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_json_path)
    info, (setup,) = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[2]))
    schema = json.dumps(SCHEMA)

    def compile_one():  # a fresh compiler each time: its cache would hide the compile
        compiler = xgr.GrammarCompiler(info, max_threads=2)
        compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        return compiled

    compiled, compiles = timed(compile_one, repeat=6)
    matchers = [xgr.GrammarMatcher(compiled) for _ in streams]
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    mask = np.zeros((ROWS, (vocab + 31) // 32), np.int32)

    def fill(live):
        batch.batch_fill_next_token_bitmask([matchers[i] for i in live], mask, indices=live)

    def accept(i, token):
        assert (mask[i, token // 32] >> (token % 32)) & 1, (i, token)
        assert matchers[i].accept_token(token)

    steps = walk(streams, fill, accept)
    report("xgrammar", setup, compiles, steps, sum(map(len, streams)))


def measure_outlines_core(tokenizer_json: str, streams: list[list[int]], vocab: int) -> None:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():
        data = json.loads(tokenizer_json)
        unicode_to_byte = _byte_level_decoder()
        special = {t["id"] for t in data["added_tokens"]}
        mapping: dict[bytes, list[int]] = {}
        for token, i in data["model"]["vocab"].items():
            if i not in special:
                mapping.setdefault(bytes(unicode_to_byte[c] for c in token), []).append(i)
        return Vocabulary(2, mapping)

    vocab_obj, (setup,) = timed(vocabulary)
    regex = build_regex_from_schema(json.dumps(SCHEMA))  # default whitespace: none between tokens

    def compile_one():
        return Index(regex, vocab_obj)

    index, compiles = timed(compile_one, repeat=3)
    guides = [Guide(index) for _ in streams]
    mask = np.zeros((ROWS, (vocab + 31) // 32), np.int32)

    def fill(live):
        for i in live:
            guides[i].write_mask_into(mask[i].ctypes.data, mask.shape[1], 4)

    def accept(i, token):
        assert (mask[i, token // 32] >> (token % 32)) & 1, (i, token)
        guides[i].advance(token, return_tokens=False)

    steps = walk(streams, fill, accept)
    report("outlines-core", setup, compiles, steps, sum(map(len, streams)))


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def main(path: str) -> None:
    import tokenizers

    tokenizer_json = open(path, encoding="utf-8").read()
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    streams = [tok.encode(doc, add_special_tokens=False).ids for doc in documents(ROWS)]
    print(f"vocabulary {vocab}; {ROWS} rows, {min(map(len, streams))}..{max(map(len, streams))} tokens each")
    measure_llguidance(tokenizer_json, streams, vocab)
    measure_xgrammar(path, streams, vocab)
    measure_outlines_core(tokenizer_json, streams, vocab)


if __name__ == "__main__":
    main(sys.argv[1])
