"""Stop strings and special tokens on the real demo model: the cases of issue #11, in generate() and in a job."""

from __future__ import annotations

import dataclasses

import pytest

from batchgen.model_runner import ModelRunner
from batchgen.prompts import PromptRow
from batchgen.spec import SamplingConfig

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def greedy_demo(demo_lm):
    demo_lm.compile(sampler="greedy")
    return demo_lm


@pytest.mark.parametrize(
    "stop, expected", [(["."], "The capital of France is Paris"), (["France"], "The capital of ")]
)
def test_generate_cuts_at_the_stop_string_with_or_without_stop_token_ids(greedy_demo, stop, expected):
    prompt = greedy_demo.preprocessor.tokenizer.apply_chat_template(QUESTION)
    # Free-running, greedy writes "The capital of France is Paris." and then <|im_end|>, in one decode call:
    # with the default stop ids the text used to run past the stop string to that token.
    assert greedy_demo.generate(prompt, max_length=96, strip_prompt=True) == "The capital of France is Paris."
    for stop_token_ids in ("auto", None):
        text = greedy_demo.generate(prompt, max_length=96, stop=stop, stop_token_ids=stop_token_ids, strip_prompt=True)
        assert text == expected, stop_token_ids


def test_a_job_cuts_at_the_stop_string_and_counts_the_tokens_up_to_it(greedy_demo):
    tokenizer = greedy_demo.preprocessor.tokenizer
    runner = ModelRunner(tokenizer, greedy_demo.engine(8, 256), greedy_demo.stop_token_ids)
    rows = [PromptRow(index=0, row_id="france", messages=QUESTION)]
    free = SamplingConfig(name="free", max_new_tokens=32)
    configs = [
        free,
        dataclasses.replace(free, name="dot", stop_strings=(".",)),
        dataclasses.replace(free, name="france", stop_strings=("France",)),
        dataclasses.replace(free, name="special", skip_special_tokens=False),
    ]
    records = {record.config: record for record in runner.run(rows, configs)}
    assert records["free"].completion == "The capital of France is Paris."
    assert records["free"].finish_reason == "stop"  # on <|im_end|>, which is counted but not written
    assert records["dot"].completion == "The capital of France is Paris"
    assert records["france"].completion == "The capital of "
    # Tokens generated up to the one that completed the stop string, not the ones after it in the same call.
    assert records["dot"].completion_tokens == records["free"].completion_tokens - 1
    assert records["france"].completion_tokens < records["dot"].completion_tokens
    # <|im_end|> ends the sequence as a stop token, so even kept special tokens do not add it to the text.
    assert records["special"].completion == records["free"].completion
