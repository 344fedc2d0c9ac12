"""The incremental detokenizer against a reference that decodes the whole sequence after every token."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

from model.generation.detokenizer import IncrementalDetokenizer
from model.tokenizers import BytePairTokenizer, LlamaTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tokenizers"
TEXTS = ["The capital of France is Paris.", "Once upon a time, in a land 😀 far away", "1 2 3\n\n  x"]


@pytest.fixture(scope="module")
def llama3() -> BytePairTokenizer:
    return BytePairTokenizer.from_huggingface(str(FIXTURES / "tiny_llama3"))


@pytest.fixture(scope="module")
def llama2() -> LlamaTokenizer:
    return LlamaTokenizer(FIXTURES / "tiny_llama2" / "tokenizer.model")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> BytePairTokenizer:
    directory = tmp_path_factory.mktemp("smollm2")
    (directory / "tokenizer.json").write_bytes(gzip.decompress((FIXTURES / "smollm2" / "tokenizer.json.gz").read_bytes()))
    (directory / "tokenizer_config.json").write_bytes((FIXTURES / "smollm2" / "tokenizer_config.json").read_bytes())
    return BytePairTokenizer.from_huggingface(str(directory))


def ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` without the start token that `tokenize` may put in front."""
    return [t for t in tokenizer.tokenize(text) if t != tokenizer.start_token_id]


def reference(tokenizer, prompt, generated, stops, skip=True):
    """(text, kept tokens, consumed tokens, stopped): the whole prompt + completion decoded after every token."""
    prompt_text = tokenizer.detokenize(prompt, skip_special_tokens=skip)

    def text_of(k: int) -> str:
        full = tokenizer.detokenize([*prompt, *generated[:k]], skip_special_tokens=skip)
        assert full.startswith(prompt_text)
        return full[len(prompt_text) :]

    for k in range(1, len(generated) + 1):
        text = text_of(k)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            cut = min(found)
            kept = 0
            while kept < k and len(text_of(kept + 1)) <= cut:
                kept += 1
            return text[:cut], kept, k, True
    return text_of(len(generated)), len(generated), len(generated), False


def incremental(tokenizer, prompt, generated, stops, skip=True, chunk=1):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, stops, skip)
    for start in range(0, len(generated), chunk):
        if detokenizer.add(generated[start : start + chunk]):
            break
    return detokenizer.text, detokenizer.kept_tokens, detokenizer.consumed_tokens, detokenizer.stopped


@pytest.mark.parametrize("name", ["llama3", "llama2", "smollm2"])
def test_random_tokens_and_stop_strings_match_the_whole_decode_reference(name, request):
    tokenizer = request.getfixturevalue(name)
    rng = np.random.default_rng(0)
    vocabulary = tokenizer.vocabulary_size()
    checked_stops = 0
    for trial in range(60):
        prompt = tokenizer.tokenize(TEXTS[trial % len(TEXTS)])
        # Random ids, including byte pieces and special tokens: split characters and skipped text both occur.
        generated = [int(t) for t in rng.integers(0, vocabulary, int(rng.integers(1, 40)))]
        free = reference(tokenizer, prompt, generated, ())[0]
        clean = free.replace("\ufffd", "")
        stops: tuple[str, ...] = ()
        if len(clean) > 3 and trial % 3:
            # A stop string taken from the text itself, so it does occur (possibly across token boundaries),
            # and sometimes one that never does.
            start = int(rng.integers(0, len(clean) - 1))
            stops = (clean[start : start + int(rng.integers(1, 7))], "never-in-random-text"[: int(rng.integers(2, 21))])
            checked_stops += 1
        for skip in (True, False):
            expected = reference(tokenizer, prompt, generated, stops, skip)
            assert incremental(tokenizer, prompt, generated, stops, skip) == expected, (trial, stops, skip)
            assert incremental(tokenizer, prompt, generated, stops, skip, chunk=8) == expected
    assert checked_stops > 20


def test_the_text_is_cut_at_the_first_stop_string_wherever_it_ends(llama3):
    prompt = llama3.tokenize("Q:")
    generated = ids(llama3, " The capital of France is Paris. It is big.")
    detokenizer = IncrementalDetokenizer(llama3, prompt, ("France", "."))
    stopped_at = next(i for i in range(len(generated)) if detokenizer.add([generated[i]]))
    assert detokenizer.text == " The capital of "
    assert llama3.detokenize(generated[: detokenizer.kept_tokens]) == " The capital of "
    assert detokenizer.consumed_tokens == stopped_at + 1
    assert " France" in llama3.detokenize(generated[: detokenizer.consumed_tokens])
    assert detokenizer.add(generated[stopped_at + 1 :]) and detokenizer.consumed_tokens == stopped_at + 1


def test_a_stop_string_inside_one_token_cuts_that_token_out(llama3):
    generated = ids(llama3, " hello world, the ocean is wide")
    # The first token of 3+ characters; all but its first character is the stop string.
    k = next(i for i, t in enumerate(generated) if len(llama3.detokenize([t])) >= 3)
    before, piece = llama3.detokenize(generated[:k]), llama3.detokenize([generated[k]])
    detokenizer = IncrementalDetokenizer(llama3, [], (piece[1:],))
    assert piece[1:] not in before + piece[0] and detokenizer.add(generated)
    assert detokenizer.text == before + piece[0]
    assert detokenizer.kept_tokens == k and detokenizer.consumed_tokens == k + 1


def test_special_tokens_are_left_out_unless_asked_for(smollm2):
    header = smollm2.token_to_id("<|im_start|>")
    generated = [*ids(smollm2, "Paris"), header, *ids(smollm2, "assistant")]
    assert IncrementalDetokenizer(smollm2, [], ()).add(generated) is False
    quiet = IncrementalDetokenizer(smollm2, [])
    quiet.add(generated)
    loud = IncrementalDetokenizer(smollm2, [], skip_special_tokens=False)
    loud.add(generated)
    assert quiet.text == "Parisassistant" and loud.text == "Paris<|im_start|>assistant"
    # A stop string is matched against the text as it is returned.
    stop = IncrementalDetokenizer(smollm2, [], ("<|im_start|>",), skip_special_tokens=False)
    assert stop.add(generated) and stop.text == "Paris"


def test_a_character_split_across_tokens_is_held_back_until_whole(llama3):
    prompt = llama3.tokenize("A smile:")
    generated = ids(llama3, " 😀 ok")
    # The tiny vocabulary spells the emoji's 4 bytes as 3 tokens, the first with the space: " \xf0\x9f", ...
    assert [llama3.detokenize([t]) for t in generated[:3]] == [" \ufffd", "\ufffd", "\ufffd"]
    detokenizer = IncrementalDetokenizer(llama3, prompt, ("\ufffd", "😀"))
    # A partial character is never seen as text (not even as U+FFFD); the stop string is found once it is whole.
    assert not detokenizer.add(generated[:2])
    assert detokenizer.add(generated[2:])
    assert detokenizer.consumed_tokens == 3 and detokenizer.kept_tokens == 0 and detokenizer.text == " "


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.ids_decoded = tokenizer, 0

    def detokenize(self, ids, skip_special_tokens=False):
        self.ids_decoded += len(ids)
        return self.tokenizer.detokenize(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("stops", [(), ("never-in-this-text",)])
def test_cost_is_linear_in_the_completion_length(llama3, stops):
    text = " ".join(f"word{i} and more." for i in range(400))
    generated = ids(llama3, text)
    counting = _CountingTokenizer(llama3)
    detokenizer = IncrementalDetokenizer(counting, llama3.tokenize("Hi"), stops)
    for token in generated:
        detokenizer.add([token])
    assert detokenizer.text == text
    # Each token is decoded within a window of a few ids, a couple of times: a constant per token. Decoding
    # the whole completion on every token (what this replaced) decodes ~n^2 / 2 ids: here ~1.4 million.
    assert counting.ids_decoded < 8 * len(generated), counting.ids_decoded
