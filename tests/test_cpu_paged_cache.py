"""The CPU cache kernel (prefill's pool writes and page copies) against XLA's writes it replaces
(model/generation/paged_cache.py), for float32 and bfloat16 pools."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.generation import paged_cache
from model.generation.paged_cache import PAGE_SIZE, chunk_sizes, copy_layer, write_layer
from model.kernels import cpu_paged_cache

DTYPES = [jnp.float32, jnp.bfloat16]


def random_pool(rng, pages, kv_heads, dim, dtype):
    """One layer's keys [n, K, D, P] and values [n, K, P, D] in chunks, random entries."""
    chunks_k = tuple(jnp.asarray(rng.normal(size=(n, kv_heads, dim, PAGE_SIZE)), dtype) for n in chunk_sizes(pages))
    chunks_v = tuple(jnp.asarray(rng.normal(size=(n, kv_heads, PAGE_SIZE, dim)), dtype) for n in chunk_sizes(pages))
    return chunks_k, chunks_v


def assert_pools_equal(want, have):
    for a, b in zip(want, have):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads, dim", [(3, 64), (2, 128), (1, 8)])
def test_the_kernel_writes_tokens_as_xlas_scatter(dtype, kv_heads, dim):
    if not cpu_paged_cache.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(kv_heads * dim)
    pages = 1500  # several chunks: tokens land in each of them
    assert len(chunk_sizes(pages)) > 1
    chunks_k, chunks_v = random_pool(rng, pages, kv_heads, dim, dtype)
    x = 300
    # Whole prompts over runs of pages, some tokens on pages past the pool (padding: nothing written).
    page_ids = rng.choice(pages, size=x // PAGE_SIZE + 1, replace=False)[np.arange(x) // PAGE_SIZE]
    page_ids[-20:] = pages + 3
    offsets = np.arange(x) % PAGE_SIZE
    new_k, new_v = (jnp.asarray(rng.normal(size=(x, kv_heads, dim)), jnp.float32) for _ in range(2))
    args = (new_k, new_v, jnp.asarray(page_ids, jnp.int32), jnp.asarray(offsets, jnp.int32))
    want_k, want_v = jax.jit(lambda ck, cv, *a: write_layer(ck, cv, *a))(chunks_k, chunks_v, *args)
    have_k, have_v = jax.jit(lambda ck, cv, *a: cpu_paged_cache.write(ck, cv, *a))(chunks_k, chunks_v, *args)
    # Bit for bit: the same entries written, rounded to bfloat16 as XLA rounds, and nothing else touched.
    assert_pools_equal((*want_k, *want_v), (*have_k, *have_v))


@pytest.mark.parametrize("dtype", [*DTYPES, jnp.float16, jnp.int8])
def test_the_kernel_copies_pages_as_xlas_gather_and_scatter(dtype):
    if not cpu_paged_cache.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(7)
    pages = 1500
    chunks = tuple(jnp.asarray(rng.normal(size=(n, 2, 16, PAGE_SIZE)) * 10, dtype) for n in chunk_sizes(pages))
    # Copies within and across chunks, a page copied onto itself, a page that is both a source and a target (read
    # before it is written), and padding: targets past the pool.
    source = jnp.asarray([3, 1400, 17, 900, 5, 0, 0], jnp.int32)
    target = jnp.asarray([1200, 2, 17, 3, 6, pages, pages + 9], jnp.int32)
    want = jax.jit(copy_layer)(chunks, source, target)
    have = jax.jit(cpu_paged_cache.copy)(chunks, source, target)
    for a, b in zip(want, have):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefill_writes_and_copies_take_the_kernel_in_place(monkeypatch):
    if not cpu_paged_cache.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(3)
    layers, kv_heads, dim, pages = 2, 3, 64, 40
    pools = [random_pool(rng, pages, kv_heads, dim, jnp.bfloat16) for _ in range(layers)]
    cache = paged_cache.PagedKVCache(tuple(k for k, _ in pools), tuple(v for _, v in pools))
    expected = paged_cache.PagedKVCache(
        tuple(tuple(jnp.array(c) for c in k) for k, _ in pools), tuple(tuple(jnp.array(c) for c in v) for _, v in pools)
    )
    new_k, new_v = (jnp.asarray(rng.normal(size=(layers, 40, kv_heads, dim)), jnp.float32) for _ in range(2))
    page_ids, offsets = jnp.asarray(np.arange(40) // PAGE_SIZE + 5, jnp.int32), jnp.asarray(np.arange(40) % PAGE_SIZE)
    calls = []
    write = cpu_paged_cache.write
    copy = cpu_paged_cache.copy
    monkeypatch.setattr(cpu_paged_cache, "write", lambda *a: calls.append("write") or write(*a))
    monkeypatch.setattr(cpu_paged_cache, "copy", lambda *a: calls.append("copy") or copy(*a))
    jax.clear_caches()
    pointers = [c.unsafe_buffer_pointer() for c in cache.k[0]]
    written = paged_cache.write(cache, new_k, new_v, page_ids, offsets)
    assert calls == ["write"]  # the prefill write traced the kernel
    assert [c.unsafe_buffer_pointer() for c in written.k[0]] == pointers  # the donated pool written where it lies
    for layer in range(layers):
        want_k, want_v = write_layer(expected.k[layer], expected.v[layer], new_k[layer], new_v[layer], page_ids, offsets)
        assert_pools_equal((*want_k, *want_v), (*written.k[layer], *written.v[layer]))
    before_k = [np.asarray(jnp.concatenate(chunks).astype(jnp.float32)) for chunks in written.k]
    before_v = [np.asarray(jnp.concatenate(chunks).astype(jnp.float32)) for chunks in written.v]
    copied = paged_cache.copy_pages(written, jnp.asarray([5, 6]), jnp.asarray([30, pages]))  # the second: padding
    assert calls == ["write", "copy", "copy"]  # one program for the keys, one for the values (two shapes)
    for layer in range(layers):
        for before, after in ((before_k[layer], copied.k[layer]), (before_v[layer], copied.v[layer])):
            want = before.copy()
            want[30] = before[5]
            np.testing.assert_array_equal(np.asarray(jnp.concatenate(after).astype(jnp.float32)), want)


def test_generation_over_a_bfloat16_cache_is_the_same_with_the_kernel_and_without(monkeypatch):
    import keras

    from model.backbone import LlamaBackbone
    from model.config import LlamaConfig
    from model.generation.engine import GenerationEngine
    from model.generation.requests import Request

    if not cpu_paged_cache.available():
        pytest.skip("no kernel on this machine")
    keras.utils.set_random_seed(4)
    config = LlamaConfig(vocabulary_size=96, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=128,
                         intermediate_dim=64, max_sequence_length=256)
    backbone = LlamaBackbone(config)
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(1, 90, n)) for n in (70, 5, 40)]
    # Each prompt twice: the second copy of its whole pages comes from the prefix cache (a page copy).
    requests = [Request(i, prompts[i % 3], 12) for i in range(6)]

    def generate():
        jax.clear_caches()  # the prefill and copy programs are traced again, with or without the kernel
        engine = GenerationEngine(backbone, max_slots=4, max_length=128, steps_per_call=4, cache_dtype="bfloat16")
        tokens = [c.token_ids for c in engine.generate(requests)]
        return tokens, engine.stats.prompt_tokens_shared

    calls = []
    write, copy = cpu_paged_cache.write, cpu_paged_cache.copy
    monkeypatch.setattr(cpu_paged_cache, "write", lambda *a: calls.append("write") or write(*a))
    monkeypatch.setattr(cpu_paged_cache, "copy", lambda *a: calls.append("copy") or copy(*a))
    with_kernel, shared = generate()
    assert "write" in calls and "copy" in calls and shared > 0
    monkeypatch.setattr(cpu_paged_cache, "available", lambda: False)
    calls.clear()
    assert generate() == (with_kernel, shared)
    assert not calls
