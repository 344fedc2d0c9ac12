"""Penalties and logit bias in the jitted steps, against the numpy reference and a cache-free greedy loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.generation import penalties
from model.generation.engine import GenerationEngine
from model.generation.penalties_reference import apply_penalties
from model.generation.requests import Request, SamplingParams

SETTINGS = [
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(presence_penalty=1.5, frequency_penalty=0.7),
    SamplingParams(logit_bias={3: 4.0, 10: -100.0}),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=-0.5, logit_bias={7: 2.5}),
    SamplingParams(),
]


def test_kernel_equals_the_reference_on_random_logits():
    rng = np.random.default_rng(0)
    b, v = len(SETTINGS), 40
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    prompts = [list(rng.integers(0, v, 6)) for _ in range(b)]
    generated = [list(rng.integers(0, v, 9)) for _ in range(b)]
    state = penalties.build(SETTINGS, prompts, generated, v)
    expected = apply_penalties(logits, np.asarray(state.counts), [set(p) for p in prompts], SETTINGS)
    np.testing.assert_allclose(np.asarray(penalties.apply(jnp.asarray(logits), state)), expected, rtol=1e-6, atol=1e-5)
    assert penalties.build([SamplingParams()] * 3, prompts[:3], generated[:3], v) is None  # no work when unused


@pytest.mark.parametrize("setting", SETTINGS[:4])
def test_greedy_with_penalties_equals_a_cache_free_loop(tiny_backbone, setting):
    config, params = tiny_backbone.config, tiny_backbone.params()
    prompt = [5, 9, 5, 12, 30, 9]
    request = Request(0, prompt, 12, setting)
    # Other rows in the same calls, without penalties: a row's penalties must not leak into its neighbours.
    others = [Request(i, [7 + i, 3, 3], 12) for i in range(1, 4)]
    engine = GenerationEngine(tiny_backbone, max_slots=4, max_length=64, steps_per_call=4)
    together = engine.generate([request, *others])
    tokens: list[int] = []
    for _ in range(12):
        ids = jnp.asarray([prompt + tokens])
        hidden, _, _ = transformer.forward(params, config, ids, jnp.arange(ids.shape[1])[None])
        logits = np.asarray(transformer.logits(params, hidden[0, -1]))
        counts = np.bincount(tokens, minlength=config.vocabulary_size) if tokens else np.zeros(config.vocabulary_size, int)
        tokens.append(int(np.argmax(apply_penalties(logits, counts, set(prompt), setting))))
    assert list(together[0].token_ids) == tokens
    plain = GenerationEngine(tiny_backbone, max_slots=4, max_length=64, steps_per_call=4).generate(
        [Request(0, prompt, 12), *others]
    )
    assert list(plain[0].token_ids) != tokens  # the setting does change this prompt's greedy text
    assert [c.token_ids for c in together[1:]] == [c.token_ids for c in plain[1:]]
