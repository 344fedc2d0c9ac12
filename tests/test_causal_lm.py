"""LlamaCausalLM's public API on a tiny random model with a real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from model import samplers, transformer
from model.generation import compile_counter
from model.generation.requests import Request

PROMPTS = ["The ocean is", "Once upon a time, in a land far away", "1 2 3"]


def test_generate_mirrors_the_input_shape(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    one = tiny_lm.generate(PROMPTS[0], max_length=24)
    assert isinstance(one, str) and one.startswith(PROMPTS[0])
    many = tiny_lm.generate(PROMPTS, max_length=24)
    assert isinstance(many, list) and len(many) == 3 and many[0] == one  # batch-invariant greedy
    batches = tiny_lm.generate(iter([PROMPTS[:2], PROMPTS[2:]]), max_length=24)
    assert batches == many


def test_max_length_counts_the_prompt_and_max_new_tokens_caps_the_rest(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    prompt_tokens = len(tiny_lm.preprocessor.tokenizer.tokenize(PROMPTS[1]))
    engine = tiny_lm.engine(1, 128)  # the engine generate() uses for one prompt and max_length <= 128

    def completion_tokens(**options) -> int:
        before = engine.stats.completion_tokens
        tiny_lm.generate(PROMPTS[1], stop_token_ids=None, strip_prompt=True, **options)
        return engine.stats.completion_tokens - before

    assert completion_tokens(max_length=prompt_tokens + 5) == 5
    assert completion_tokens(max_length=64, max_new_tokens=3) == 3
    assert completion_tokens(max_length=prompt_tokens + 2, max_new_tokens=10) == 2


def test_stop_strings_spanning_tokens_end_generation_and_are_cut(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    tokenizer = tiny_lm.preprocessor.tokenizer
    engine = tiny_lm.engine(1, 128)
    for prompt in PROMPTS:
        generated = engine.generate([Request(0, tokenizer.tokenize(prompt), 30)])[0].token_ids
        # A stop string made of the last 2 characters of token k and the first of token k + 1, taken where
        # the text so far is whole characters (a random tiny model can emit partial UTF-8 sequences).
        for k in range(1, len(generated) - 1):
            before, after = tokenizer.detokenize(generated[: k + 1]), tokenizer.detokenize(generated[: k + 2])
            if len(before) < 3 or not after.startswith(before) or len(after) == len(before):
                continue
            if len(tokenizer.detokenize(generated[:k])) > len(before) - 2:
                continue  # token k alone is shorter than 2 characters: the string would not span a boundary
            stop = before[-2:] + after[len(before)]
            if "\ufffd" in stop:
                continue
            free = tiny_lm.generate(prompt, max_length=40, stop_token_ids=None, strip_prompt=True)
            stopped = tiny_lm.generate(prompt, max_length=40, stop_token_ids=None, stop=stop, strip_prompt=True)
            assert stopped == free[: free.find(stop)]
            assert stop not in stopped and free.find(stop) >= 0
            return
    pytest.fail("no generated text of the tiny model has a boundary to test stop strings on")


def test_stop_token_ids_auto_none_and_explicit(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    tokenizer = tiny_lm.preprocessor.tokenizer
    # The first generated id, from the engine (re-tokenizing the text would not give it back when the
    # random tiny model emits a partial UTF-8 byte sequence).
    first_id = tiny_lm.engine(1, 128).generate([Request(0, tokenizer.tokenize(PROMPTS[2]), 3)])[0].token_ids[0]
    stopped = tiny_lm.generate(PROMPTS[2], max_length=30, stop_token_ids=(first_id,), strip_prompt=True)
    assert stopped == ""
    assert tiny_lm.stop_token_ids == tokenizer.stop_token_ids


def test_without_preprocessor_fills_padded_positions(tiny_lm):
    from model.causal_lm import LlamaCausalLM

    raw = LlamaCausalLM(tiny_lm.backbone)
    raw.compile(sampler="greedy")
    token_ids = np.zeros((2, 12), np.int32)
    token_ids[0, :3] = [5, 6, 7]
    token_ids[1, :5] = [8, 9, 10, 11, 12]
    mask = token_ids > 0
    out = raw.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"].shape == (2, 12) and out["padding_mask"].all()
    np.testing.assert_array_equal(out["token_ids"][mask], token_ids[mask])
    with pytest.raises(ValueError, match="needs a preprocessor"):
        raw.generate({"token_ids": token_ids, "padding_mask": mask})


def test_samplers_by_name_and_object_and_seeds(tiny_lm):
    tiny_lm.compile(sampler=samplers.TopK(k=5, temperature=2.0))
    a = tiny_lm.generate(PROMPTS, max_length=30, seed=7, stop_token_ids=None)
    b = tiny_lm.generate(PROMPTS, max_length=30, seed=7, stop_token_ids=None)
    c = tiny_lm.generate(PROMPTS, max_length=30, seed=8, stop_token_ids=None)
    assert a == b and a != c
    tiny_lm.compile(sampler="top_p")
    assert isinstance(tiny_lm.sampler, samplers.TopPSampler)
    assert len(tiny_lm.generate(PROMPTS, max_length=30)) == 3


def test_second_generate_of_the_same_bucket_does_not_recompile(tiny_lm):
    tiny_lm.compile(sampler="greedy")
    tiny_lm.generate(PROMPTS, max_length=40)
    before, _ = compile_counter.snapshot()
    tiny_lm.generate(["Another prompt", "and a second one", "third"], max_length=40)
    assert compile_counter.snapshot()[0] == before


def test_score_logits_and_loss(tiny_lm):
    x = tiny_lm.preprocessor.generate_preprocess(PROMPTS, sequence_length=16)
    logits = tiny_lm.score(x["token_ids"], x["padding_mask"])
    assert logits.shape == (3, 16, tiny_lm.backbone.vocabulary_size)
    expected = transformer.logits(tiny_lm.backbone.params(), tiny_lm.backbone(x))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    targets = np.roll(x["token_ids"], -1, axis=1)
    loss = tiny_lm.score(x["token_ids"], x["padding_mask"], scoring_mode="loss", target_ids=targets)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(loss, -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0], atol=1e-4)


def test_fit_on_raw_strings_lowers_the_loss(tiny_config):
    import keras

    from model.backbone import LlamaBackbone
    from model.causal_lm import LlamaCausalLM
    from model.preprocessor import LlamaCausalLMPreprocessor
    from model.tokenizers import BytePairTokenizer
    from tests.conftest import TINY, TINY_LLAMA3_TOKENIZER
    from model.config import LlamaConfig

    tokenizer = BytePairTokenizer.from_huggingface(TINY_LLAMA3_TOKENIZER)
    keras.utils.set_random_seed(0)
    lm = LlamaCausalLM(
        LlamaBackbone(LlamaConfig(**{**TINY, "vocabulary_size": tokenizer.vocabulary_size()})),
        LlamaCausalLMPreprocessor(tokenizer, sequence_length=16),
    )
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    corpus = ["the cat sat on the mat", "the dog sat on the log"] * 4
    history = lm.fit(corpus, batch_size=4, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0], losses


def test_int8_quantized_model_generates(tiny_lm):
    import copy

    from model.backbone import LlamaBackbone
    from model.causal_lm import LlamaCausalLM

    backbone = LlamaBackbone.from_config(tiny_lm.backbone.get_config())
    for path in tiny_lm.backbone.weight_paths():
        backbone.weight(path).assign(tiny_lm.backbone.weight(path).value)
    lm = LlamaCausalLM(backbone, copy.copy(tiny_lm.preprocessor))
    lm.compile(sampler="greedy")
    float_out = lm.generate(PROMPTS, max_length=24, stop_token_ids=None)
    lm.quantize("int8")
    assert lm.backbone.weight("layers/up").dtype == "int8"
    int8_out = lm.generate(PROMPTS, max_length=24, stop_token_ids=None)
    assert len(int8_out) == 3 and all(o.startswith(p) for o, p in zip(int8_out, PROMPTS))
    # How close int8 stays to float is measured on logits (test_backbone) and on the demo model (batchgen
    # bench); a random tiny model's near-flat logits make its greedy text too sensitive to compare here.
    assert int8_out != [p for p in PROMPTS] and len(float_out) == 3


def test_presets_lists_the_seed_table_llama_3_1_and_3_2_and_the_demo_model():
    from model.causal_lm import LlamaCausalLM

    names = set(LlamaCausalLM.presets)
    assert {"llama2_7b_en", "llama3_instruct_8b_en_int8", "vicuna_1.5_7b_en", "smollm2_135m_instruct"} <= names
    assert {"llama3.1_instruct_8b", "llama3.2_1b", "llama3.2_instruct_3b"} <= names
    assert len(names) == 18  # 9 of the seed table, 8 of Llama 3.1 / 3.2, the demo model


def test_contrastive_search_honours_stop_strings_and_beam_search_refuses_them(tiny_lm):
    tiny_lm.compile(sampler=samplers.Contrastive(k=3, alpha=0.4))
    free = tiny_lm.generate(PROMPTS[0], max_length=30, stop_token_ids=None, strip_prompt=True)
    clean = [c for c in free[3:] if c.strip() and c != "\ufffd" and free.find(c) >= 3]
    assert clean, f"no character to stop on in {free!r}"
    stop = clean[0]
    stopped = tiny_lm.generate(PROMPTS[0], max_length=30, stop_token_ids=None, stop=stop, strip_prompt=True)
    assert stopped == free[: free.find(stop)]
    tiny_lm.compile(sampler=samplers.Beam(num_beams=2))
    with pytest.raises(ValueError, match=r"BeamSampler does not support stop strings \(got \['x'\]\)"):
        tiny_lm.generate(PROMPTS[0], max_length=30, stop="x")
    tiny_lm.compile(sampler="greedy")
