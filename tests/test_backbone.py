"""The forward pass: config round trip, cache consistency, grouped KV, dtypes and int8."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from model import transformer
from model.backbone import LlamaBackbone, weight_shapes
from model.config import LlamaConfig, RopeScaling
from tests.conftest import TINY


def _positions(b: int, t: int, start: int = 0) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(start, start + t)[None], (b, t))


def test_get_config_round_trips_every_dataclass_field(tiny_backbone):
    config = tiny_backbone.get_config()
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    assert fields <= set(config)
    assert set(config) - fields == {"name", "dtype"}
    rebuilt = LlamaBackbone.from_config(config)
    assert rebuilt.config == tiny_backbone.config


def test_config_round_trips_rope_scaling():
    config = LlamaConfig(**TINY, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64))
    backbone = LlamaBackbone(config)
    assert LlamaBackbone.from_config(backbone.get_config()).config == config


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 2.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 32)])
def test_prefill_then_token_by_token_decode_equals_full_forward(scaling):
    """MaxText's most useful test: a full pass and a cached pass must agree at every position."""
    keras.utils.set_random_seed(1)
    backbone = LlamaBackbone(LlamaConfig(**TINY, rope_scaling=scaling))
    params = backbone.params()
    config = backbone.config
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocabulary_size, (3, 11)), jnp.int32)
    full, _, _ = transformer.forward(params, config, ids, _positions(3, 11))

    prefill = 5
    hidden, k, v = transformer.forward(params, config, ids[:, :prefill], _positions(3, prefill))
    shape = (config.num_layers, 3, config.num_key_value_heads, 16, config.head_dim)
    cache_k = jnp.zeros(shape).at[:, :, :, :prefill].set(k.swapaxes(2, 3))
    cache_v = jnp.zeros(shape).at[:, :, :, :prefill].set(v.swapaxes(2, 3))
    outputs = [hidden]
    for t in range(prefill, 11):
        h, k, v = transformer.forward(
            params, config, ids[:, t : t + 1], _positions(3, 1, t),
            cache_k=cache_k, cache_v=cache_v, cache_lengths=jnp.full((3,), t),
        )
        assert k.shape == (config.num_layers, 3, 1, config.num_key_value_heads, config.head_dim)  # never repeated
        cache_k = cache_k.at[:, :, :, t].set(k[:, :, 0])
        cache_v = cache_v.at[:, :, :, t].set(v[:, :, 0])
        outputs.append(h)
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), full, atol=1e-5)


def test_padding_does_not_change_real_positions(tiny_backbone):
    ids = np.array([[5, 6, 7, 8, 9]], np.int32)
    alone = tiny_backbone({"token_ids": ids[:, :3], "padding_mask": np.ones((1, 3), bool)})
    padded = tiny_backbone({"token_ids": ids, "padding_mask": np.array([[1, 1, 1, 0, 0]], bool)})
    np.testing.assert_allclose(padded[:, :3], alone, atol=1e-6)


def test_tied_head_reuses_embedding():
    backbone = LlamaBackbone(LlamaConfig(**TINY, tie_word_embeddings=True))
    assert "lm_head" not in weight_shapes(backbone.config)
    params = backbone.params()
    hidden = jnp.ones((1, 1, backbone.config.hidden_dim))
    expected = hidden[0, 0] @ np.asarray(params["token_embedding"]).T
    np.testing.assert_allclose(transformer.logits(params, hidden)[0, 0], expected, rtol=1e-5)


def test_bfloat16_policy_stores_bfloat16_and_stays_close_to_float32(tiny_backbone):
    bf16 = LlamaBackbone(tiny_backbone.config, dtype="bfloat16")
    for path in tiny_backbone.weight_paths():
        bf16.weight(path).assign(tiny_backbone.weight(path).value)
    assert bf16.weight("layers/query").dtype == "bfloat16"
    ids = np.arange(1, 9, dtype=np.int32)[None]
    out32 = tiny_backbone({"token_ids": ids})
    out16 = bf16({"token_ids": ids})
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1)


def test_int8_quantize_stores_int8_and_stays_close(tiny_backbone):
    ids = np.arange(1, 9, dtype=np.int32)[None]
    before = transformer.logits(tiny_backbone.params(), tiny_backbone({"token_ids": ids}))
    tiny_backbone.quantize("int8")
    assert tiny_backbone.weight("layers/gate").dtype == "int8"
    assert tiny_backbone.weight("layers/gate_scale").shape == (TINY["num_layers"], 1, TINY["intermediate_dim"])
    after = transformer.logits(tiny_backbone.params(), tiny_backbone({"token_ids": ids}))
    assert np.abs(np.asarray(after) - np.asarray(before)).max() < 0.02 * np.abs(np.asarray(before)).max() + 1e-3
    with pytest.raises(ValueError, match="already quantized"):
        tiny_backbone.quantize("int8")
    rebuilt = LlamaBackbone.from_config(tiny_backbone.get_config())
    assert rebuilt.weight("layers/gate").dtype == "int8"


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="num_query_heads 4 must be a multiple of num_key_value_heads 3"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unknown Llama config fields"):
        LlamaConfig.from_dict({**TINY, "num_experts": 8})


@pytest.mark.parametrize("t", [64, 256, 512])
def test_self_attention_equals_a_plain_masked_softmax_with_packed_segments(t):
    # Long rows skip the causally hidden score blocks; the result must be the plain computation's.
    rng = np.random.default_rng(t)
    b, k_heads, g, d = 2, 3, 3, 8
    qg = rng.normal(size=(b, t, k_heads, g, d)).astype(np.float32)
    k = rng.normal(size=(b, t, k_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, t, k_heads, d)).astype(np.float32)
    segments = np.sort(rng.integers(0, 5, (b, t)), axis=1)  # packed prompts, each attending to itself
    mask = np.arange(t)[None] < np.array([[t], [t - 17]])  # the second row ends in padding
    visible = np.asarray(transformer.visibility(jnp.asarray(mask), jnp.asarray(segments)))
    scores = np.einsum("btkgd,bskd->bkgts", qg, k)
    scores = np.where(visible[:, None, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bkgts,bskd->btkgd", probs, v)
    got = np.asarray(transformer._self_attention(jnp.asarray(qg), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t, width", [(128, 32), (512, 64), (512, 128)])
def test_banded_attention_of_short_packed_segments_equals_the_plain_masked_softmax(t, width):
    # Segments of at most `width` tokens: each block of queries scores only its own and the block before's keys.
    rng = np.random.default_rng(width)
    k_heads, g, d = 3, 3, 8
    lengths = []
    while sum(lengths) < t - 20:  # segments of 1..width tokens, then 20 or more tokens of padding
        lengths.append(int(min(rng.integers(1, width + 1), t - 20 - sum(lengths))))
    segments = np.concatenate([np.full(n, j) for j, n in enumerate(lengths)] + [np.full(t - sum(lengths), -1)])[None]
    qg = rng.normal(size=(1, t, k_heads, g, d)).astype(np.float32)
    k = rng.normal(size=(1, t, k_heads, d)).astype(np.float32)
    v = rng.normal(size=(1, t, k_heads, d)).astype(np.float32)
    visible = np.asarray(transformer.visibility(jnp.asarray(segments >= 0), jnp.asarray(segments)))
    scores = np.where(visible[:, None, None], np.einsum("btkgd,bskd->bkgts", qg, k), -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bkgts,bskd->btkgd", probs / probs.sum(-1, keepdims=True), v)
    args = jnp.asarray(qg), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible)
    banded = np.asarray(transformer._self_attention(*args, segment_length=width))
    real = segments[0] >= 0  # a padding token's output is never read
    np.testing.assert_allclose(banded[0, real], expected[0, real], atol=1e-5, rtol=1e-5)
    # A segment longer than the bound would lose keys: the bound must cover the longest.
    too_narrow = np.asarray(transformer._self_attention(*args, segment_length=width // 2))
    assert max(lengths) <= width // 2 or not np.allclose(too_narrow[0, real], expected[0, real], atol=1e-3)


@pytest.mark.parametrize("t, width", [(64, None), (512, None), (512, 64)])
def test_packed_prompts_after_their_own_cached_pages_attend_as_one_masked_softmax(t, width):
    # The engine's prefill with prompt sharing: each segment of a packed row also sees some of the context keys
    # (its own cached pages); the causal blocks and the band must give the plain computation over both.
    rng = np.random.default_rng(t + (width or 0))
    k_heads, g, d, s = 3, 3, 8, 96
    lengths = []
    while sum(lengths) < t - 10:
        lengths.append(int(min(rng.integers(1, (width or 100) + 1), t - 10 - sum(lengths))))
    segments = np.concatenate([np.full(n, j) for j, n in enumerate(lengths)] + [np.full(t - sum(lengths), -1)])[None]
    sees = rng.random((len(lengths), s)) < 0.4  # which context keys each segment sees
    context_visible = np.where(segments[0, :, None] >= 0, sees[np.maximum(segments[0], 0)], False)[None]
    qg = rng.normal(size=(1, t, k_heads, g, d)).astype(np.float32)
    k, v = (rng.normal(size=(1, t, k_heads, d)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.normal(size=(1, k_heads, s, d)).astype(np.float32) for _ in range(2))
    visible = np.asarray(transformer.visibility(jnp.asarray(segments >= 0), jnp.asarray(segments)))
    scores = np.concatenate(
        [np.einsum("btkgd,bksd->bkgts", qg, ck), np.einsum("btkgd,bskd->bkgts", qg, k)], axis=-1
    )
    scores = np.where(np.concatenate([context_visible, visible], -1)[:, None, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bkgts,bksd->btkgd", probs[..., :s], cv) + np.einsum("bkgts,bskd->btkgd", probs[..., s:], v)
    context = (jnp.asarray(ck), jnp.asarray(cv), jnp.asarray(context_visible))
    got = np.asarray(transformer._self_attention(
        jnp.asarray(qg), jnp.asarray(k), jnp.asarray(v), jnp.asarray(visible), width, context
    ))
    real = segments[0] >= 0
    np.testing.assert_allclose(got[0, real], expected[0, real], atol=1e-5, rtol=1e-5)
