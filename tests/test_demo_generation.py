"""Greedy generation of the real demo model against transformers' greedy output (golden file).

The golden file is made by tests/golden/make_logits_golden.py: transformers reads the same GGUF, dequantizes
it to float32 and decodes greedily, recording the top-2 logits at every step so that a divergence can be
judged: two implementations may pick differently only where the top two logits (nearly) tie.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from model.generation.requests import Request

GOLDEN = pathlib.Path(__file__).parent / "golden" / "greedy_demo.json"
pytestmark = pytest.mark.slow


def test_chat_prompts_tokenize_as_transformers_does(demo_lm):
    golden = json.loads(GOLDEN.read_text())
    tokenizer = demo_lm.preprocessor.tokenizer
    for case in golden["prompts"]:
        assert tokenizer.tokenize_chat(case["messages"]) == case["prompt_token_ids"]


def test_greedy_tokens_equal_transformers_for_95_percent_of_prompts(demo_lm):
    golden = json.loads(GOLDEN.read_text())
    cases = golden["prompts"]
    assert len(cases) >= 20
    n = golden["new_tokens"]
    requests = [Request(i, case["prompt_token_ids"], n) for i, case in enumerate(cases)]
    completions = demo_lm.engine(32, 256).generate(requests)
    identical = 0
    for case, completion in zip(cases, completions):
        ours, theirs = list(completion.token_ids), case["generated_token_ids"]
        if ours == theirs:
            identical += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        (_, first), (_, second) = case["top2"][step]
        print(f"prompt {case['messages'][-1]['content'][:40]!r} diverges at step {step}: top-2 gap {first - second:.2e}")
        assert first - second <= 1e-3, f"a real divergence, not a near tie, at step {step}"
    assert identical / len(cases) >= 0.95, f"{identical}/{len(cases)} identical"


def test_the_reference_poem(demo_lm):
    demo_lm.compile(sampler="greedy")
    tokenizer = demo_lm.preprocessor.tokenizer
    prompt = tokenizer.chat_template.render(
        [{"role": "user", "content": "Write a short poem about the ocean."}], add_generation_prompt=True
    )
    text = demo_lm.generate(prompt, max_length=80, strip_prompt=True)
    assert text.startswith("In the depths of the ocean, where shadows play,\nA place of endless wonder,")
