"""Structured output on the real demo model: a chat request for JSON gets JSON that validates, and reads sensibly."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.generation.requests import Request, SamplingParams

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "continent": {"enum": ["Africa", "America", "Asia", "Europe", "Oceania"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "continent", "population_millions"],
    "additionalProperties": False,
}


def test_the_demo_model_answers_in_json_that_validates(demo_lm):
    tokenizer = demo_lm.preprocessor.tokenizer
    prompt = tokenizer.tokenize_chat([{"role": "user", "content": "Name the capital of France as JSON."}])
    response_format = json.dumps({"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}})
    requests = [
        Request(name, prompt, 64, sampling, seed=7, stop_token_ids=tokenizer.stop_token_ids,
                response_format=response_format)
        for name, sampling in (("greedy", SamplingParams("greedy")), ("top_p", SamplingParams("top_p", top_p=0.9)))
    ]
    completions = demo_lm.engine(32, 256).generate(requests)
    for completion in completions:
        assert completion.finish_reason == "stop", completion
        answer = json.loads(completion.text)
        jsonschema.validate(answer, SCHEMA)
    assert json.loads(completions[0].text)["city"] == "Paris", completions[0].text
