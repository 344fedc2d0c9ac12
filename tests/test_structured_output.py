"""Structured output in the engine: a response format's grammar masks every sampled token, the first one too."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from model.generation import grammar
from model.generation.engine import GenerationEngine
from model.generation.requests import Request, SamplingParams

# Every path through it is bounded (enums, ranges, maxLength, maxItems), so even a random model finishes it.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "indoor": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "indoor", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = json.dumps({"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
SAMPLERS = [
    SamplingParams("greedy"),
    SamplingParams("random", temperature=1.0),
    SamplingParams("top_k", top_k=20, temperature=1.5),
    SamplingParams("top_p", top_p=0.9, temperature=1.2),
]


def test_apply_token_mask_keeps_exactly_the_allowed_tokens():
    v = 70  # not a multiple of 32: the last word is partly padding
    allowed = np.zeros((2, v), bool)
    allowed[0, [0, 31, 32, 63, 69]] = True
    allowed[1] = True
    packed = np.packbits(np.pad(allowed, ((0, 0), (0, 96 - v))), axis=1, bitorder="little").view(np.int32)
    masked = np.asarray(grammar.apply_token_mask(jnp.zeros((2, v)), jnp.asarray(packed)))
    assert np.array_equal(np.isfinite(masked), allowed)


@pytest.fixture(scope="module")
def engine(tiny_lm):
    return GenerationEngine(tiny_lm.backbone, tiny_lm.preprocessor.tokenizer, max_slots=8, max_length=192)


@pytest.mark.parametrize("sampling", SAMPLERS, ids=lambda s: s.sampler)
def test_every_completion_parses_and_validates_against_the_schema(engine, tiny_lm, sampling):
    tokenizer = tiny_lm.preprocessor.tokenizer
    prompts = [tokenizer.tokenize(text) for text in ["a pet:", "describe an animal", "json please", "x"]]
    requests = [
        Request(i, prompts[i % len(prompts)], max_new_tokens=150, sampling=sampling, seed=i,
                stop_token_ids=tokenizer.stop_token_ids, response_format=JSON_SCHEMA)
        for i in range(12)  # more than the slots: refilled slots start their grammar afresh
    ]
    for completion in engine.generate(requests):
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_regex_outputs_match_the_regex_and_unconstrained_rows_beside_them_are_unchanged(engine, tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    pattern = r"(yes|no), [0-9]{1,3}!"
    regex = json.dumps({"type": "regex", "regex": pattern})
    prompt = tokenizer.tokenize("answer:")
    constrained = [Request(("re", i), prompt, 40, SamplingParams("random"), seed=i, response_format=regex)
                   for i in range(6)]
    free = [Request(("free", i), prompt, 12, SamplingParams("random"), seed=i) for i in range(3)]
    results = {c.request_id: c for c in engine.generate(constrained + free)}
    for request in constrained:
        assert re.fullmatch(pattern, results[request.request_id].text), results[request.request_id]
    # A row's tokens are a function of its own seed, whatever shares its decode calls (grammar calls run one step).
    alone = {c.request_id: c for c in engine.generate(free)}
    for request in free:
        assert results[request.request_id].token_ids == alone[request.request_id].token_ids


def test_a_format_that_does_not_compile_fails_that_request_only(engine, tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    prompt = tokenizer.tokenize("hi")
    bad_schema = json.dumps({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}})
    bad_regex = json.dumps({"type": "regex", "regex": "(unclosed"})
    requests = [
        Request("bad-schema", prompt, 8, response_format=bad_schema),
        Request("ok", prompt, 8, response_format=json.dumps({"type": "regex", "regex": "[ab]{4}"})),
        Request("bad-regex", prompt, 8, response_format=bad_regex),
        Request("plain", prompt, 8),
    ]
    results = {c.request_id: c for c in engine.generate(requests)}
    assert results["bad-schema"].finish_reason == "error" and "nowhere" in results["bad-schema"].error
    assert results["bad-regex"].finish_reason == "error" and "unclosed" in results["bad-regex"].error
    assert re.fullmatch("[ab]{4}", results["ok"].text)
    assert results["plain"].finish_reason == "length" and results["plain"].completion_tokens == 8


def test_lark_and_gbnf_grammars_and_json_object(engine, tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    prompt = tokenizer.tokenize("pick:")
    formats = {
        "lark": {"type": "grammar", "grammar": 'start: ("red" | "green") " " NUM\nNUM: /[0-9]{2}/'},
        "gbnf": {"type": "grammar", "grammar": 'root ::= ("red" | "green") " " [0-9] [0-9]'},
        "object": {"type": "json_object"},
    }
    requests = [Request(name, prompt, 120, SamplingParams("random"), seed=3, response_format=json.dumps(f))
                for name, f in formats.items()]
    results = {c.request_id: c for c in engine.generate(requests)}
    assert re.fullmatch("(red|green) [0-9]{2}", results["lark"].text)
    assert re.fullmatch("(red|green) [0-9]{2}", results["gbnf"].text)
    if results["object"].finish_reason == "stop":  # an unbounded object may run out of tokens
        assert isinstance(json.loads(results["object"].text), dict)
    assert results["object"].text.startswith("{")


def test_a_grammar_run_compiles_no_program_twice(engine, tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    requests = [Request(i, tokenizer.tokenize("pet"), 150, SamplingParams("random"), seed=i,
                        response_format=JSON_SCHEMA) for i in range(10)]
    engine.generate(requests)
    before = engine.stats.programs_compiled
    engine.generate([Request(("again", r.request_id), r.prompt_ids, 150, r.sampling, seed=r.seed,
                             response_format=JSON_SCHEMA) for r in requests])
    assert engine.stats.programs_compiled == before
