"""The CPU attention of packed prompts against the XLA attention it replaces (`transformer._self_attention`)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.config import LlamaConfig
from model.kernels import cpu_packed_attention


def test_the_kernel_builds_wherever_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: attention stays XLA's")
    assert cpu_packed_attention.available()
    assert cpu_packed_attention.library_path().exists()


def packed_rows(rows: list[list[int]], tokens: int) -> np.ndarray:
    """segment_ids [B, T]: each row's prompts of the given lengths one after another, then padding (-1)."""
    ids = np.full((len(rows), tokens), -1, np.int32)
    for b, lengths in enumerate(rows):
        begin = 0
        for segment, length in enumerate(lengths):
            ids[b, begin : begin + length] = segment
            begin += length
    return ids


def test_segment_starts_are_each_prompts_first_token_across_rows():
    ids = packed_rows([[2, 3], [1, 2]], 6)
    starts = np.asarray(cpu_packed_attention.segment_starts(jnp.asarray(ids)))
    # row 0: tokens 0-1, then 2-4, then padding; row 1 (from 6): token 6, then 7-8, then padding
    np.testing.assert_array_equal(starts, [0, 0, 2, 2, 2, 12, 6, 7, 7, 12, 12, 12])


@pytest.mark.parametrize("kv_heads, groups, dim", [(3, 3, 64), (2, 4, 128), (4, 1, 64), (1, 8, 64), (2, 5, 64)])
@pytest.mark.parametrize("rows, tokens", [
    ([[256, 250]], 512),  # two long prompts: most of XLA's causal blocks cross them
    ([[40] * 12], 512),  # many short ones
    ([[5, 1, 17, 3], [32]], 32),  # a one-token prompt, a full row, two rows laid end to end
    ([[1]], 8),  # a single token, the rest padding
    ([[23, 19]], 61),  # a length that is no multiple of a vector
])
def test_the_kernel_equals_xla_attention_on_every_real_token_and_gives_padding_zeros(kv_heads, groups, dim, rows,
                                                                                    tokens):
    if not cpu_packed_attention.available():
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(kv_heads * groups + tokens)
    b = len(rows)
    ids = packed_rows(rows, tokens)
    qg = jnp.asarray(rng.normal(size=(b, tokens, kv_heads, groups, dim)) * dim**-0.5, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, tokens, kv_heads, dim)), jnp.float32) for _ in range(2))
    visible = transformer.visibility(jnp.asarray(ids >= 0), jnp.asarray(ids))
    expected = np.asarray(jax.jit(transformer._self_attention)(qg, k, v, visible))
    starts = cpu_packed_attention.segment_starts(jnp.asarray(ids))
    assert cpu_packed_attention.supports(qg)
    got = np.asarray(jax.jit(cpu_packed_attention.attend)(qg, k, v, starts))
    real = ids >= 0
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=2e-6)
    assert not got[~real].any()


def context_visibility(ids: np.ndarray, context: int, page: int, rng) -> np.ndarray:
    """visible [1, T, S], as prefill builds it for prompt sharing: each prompt sees some pages of the context,
    of its last one only the first positions (where it parts from the cached prompt); the first prompt
    sees one page or more, others maybe none."""
    segments = ids.max() + 1
    counts = np.zeros((segments, -(-context // page)), np.int32)
    for segment in range(segments):
        pages = rng.choice(counts.shape[1], size=rng.integers(segment == 0, counts.shape[1] + 1), replace=False)
        counts[segment, pages] = page
        if len(pages):
            counts[segment, pages[-1]] = rng.integers(1, page + 1)  # shared in part
    per_position = (np.arange(page)[None, None] < counts[:, :, None]).reshape(segments, -1)[:, :context]
    return np.where(ids[0, :, None] >= 0, per_position[np.maximum(ids[0], 0)], False)[None]


@pytest.mark.parametrize("kv_heads, groups, dim", [(3, 3, 64), (2, 4, 128), (1, 8, 64)])
@pytest.mark.parametrize("lengths, tokens, context, band", [
    ([12] * 40, 512, 128, 64),  # questions continuing a shared system prompt: prefill's banded row
    ([200, 150, 100], 512, 256, None),  # long prompts continuing cached pages
    ([5, 1, 17, 3], 32, 96, None),  # a one-token prompt; contexts of whole and part pages
    ([23, 19], 61, 40, None),  # a context that is no multiple of a vector
])
def test_with_a_context_the_kernel_equals_xla_attention(kv_heads, groups, dim, lengths, tokens, context, band):
    if not cpu_packed_attention.available():
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(kv_heads * groups + tokens + context)
    ids = packed_rows([lengths], tokens)
    qg = jnp.asarray(rng.normal(size=(1, tokens, kv_heads, groups, dim)) * dim**-0.5, jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, tokens, kv_heads, dim)), jnp.float32) for _ in range(2))
    cache_k, cache_v = (jnp.asarray(rng.normal(size=(1, kv_heads, context, dim)), jnp.float32) for _ in range(2))
    sees = jnp.asarray(context_visibility(ids, context, 32, rng))
    assert sees.any() and not sees.all()
    visible = transformer.visibility(jnp.asarray(ids >= 0), jnp.asarray(ids))
    expected = np.asarray(jax.jit(transformer._self_attention, static_argnums=4)(
        qg, k, v, visible, band, (cache_k, cache_v, sees)))
    starts = cpu_packed_attention.segment_starts(jnp.asarray(ids))
    got = np.asarray(jax.jit(cpu_packed_attention.attend)(qg, k, v, starts, (cache_k, cache_v, sees)))
    real = ids >= 0
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=2e-6)
    assert not got[~real].any()


def test_a_context_belongs_to_one_row():
    qg = jnp.zeros((2, 8, 1, 1, 64), jnp.float32)
    k = jnp.zeros((2, 8, 1, 64), jnp.float32)
    cache = jnp.zeros((2, 1, 32, 64), jnp.float32)
    with pytest.raises(ValueError, match="one row"):
        cpu_packed_attention.attend(qg, k, k, jnp.zeros(16, jnp.int32), (cache, cache, jnp.ones((2, 8, 32), bool)))


def test_supports_only_the_built_sizes_in_float32():
    assert not cpu_packed_attention.supports(jnp.zeros((1, 8, 2, 3, 64), jnp.bfloat16))
    assert not cpu_packed_attention.supports(jnp.zeros((1, 8, 2, 3, 96), jnp.float32))
    assert not cpu_packed_attention.supports(jnp.zeros((1, 8, 1, 9, 64), jnp.float32))


@pytest.mark.parametrize("with_context", [False, True])
def test_the_packed_forward_takes_the_kernel_and_equals_xlas(monkeypatch, with_context):
    if not cpu_packed_attention.available():
        pytest.skip("no C++ compiler")
    config = LlamaConfig(vocabulary_size=97, num_layers=2, num_query_heads=6, num_key_value_heads=2,
                         hidden_dim=128, intermediate_dim=256, head_dim=64, max_sequence_length=128)
    from model.backbone import LlamaBackbone

    params = LlamaBackbone(config, dtype="float32").params()
    rng = np.random.default_rng(3)
    ids = packed_rows([[9, 30, 1, 14]], 64)
    positions = np.zeros_like(ids)
    for segment in range(4):
        where = ids[0] == segment
        positions[0, where] = np.arange(where.sum())
    token_ids = jnp.asarray(rng.integers(0, config.vocabulary_size, ids.shape), jnp.int32)
    calls = []
    attend = cpu_packed_attention.attend
    monkeypatch.setattr(cpu_packed_attention, "attend", lambda *args: calls.append(1) or attend(*args))

    context_k = context_v = sees = None
    if with_context:  # prompts continuing cached pages (prompt sharing): 3 pages of keys per layer
        context_k, context_v = (jnp.asarray(rng.normal(size=(2, 1, 2, 96, 64)), jnp.float32) for _ in range(2))
        sees = jnp.asarray(context_visibility(ids, 96, 32, rng))
        positions = positions + 40  # after the context's tokens

    def forward(kernel):
        hidden, k, _ = transformer.forward(params, config, token_ids, jnp.asarray(positions), jnp.asarray(ids >= 0),
                                           context_k, context_v, segment_ids=jnp.asarray(ids), kernel=kernel,
                                           context_visible=sees)
        return np.asarray(hidden), np.asarray(k)

    (hidden, keys), (reference, reference_keys) = forward(True), forward(False)
    assert calls  # traced once per layer body
    real = ids[0] >= 0
    np.testing.assert_allclose(hidden[0, real], reference[0, real], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keys[:, 0, real], reference_keys[:, 0, real], rtol=1e-4, atol=1e-5)
