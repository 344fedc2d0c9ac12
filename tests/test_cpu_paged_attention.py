"""The CPU decode-attention kernel against the pure-JAX paged attention it replaces (model/paged_attention.py)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import paged_attention
from model.config import LlamaConfig
from model.generation.engine import GenerationEngine
from model.generation.paged_cache import PAGE_SIZE, PageTable, chunk_sizes
from model.generation.requests import Request
from model.kernels import cpu_paged_attention


def test_the_kernel_builds_wherever_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine keeps XLA's attention")
    assert cpu_paged_attention.available()
    assert cpu_paged_attention.library_path().exists()


def pool_and_view(rng, slots, kv_heads, dim, lengths, pages):
    """A pool of `pages` pages in chunks, random keys and values, and the view of slots with `lengths` (a slot
    of length -1 is idle: it holds no page), each slot's pages scattered among the others' as decoding leaves
    them."""
    table = PageTable(pages, PAGE_SIZE, slots, max(lengths) + 1)
    for slot, length in enumerate(lengths):
        if length >= 0:
            table.admit(slot, 1, length + 1)
    for tokens in range(PAGE_SIZE + 1, max(lengths) + 2, PAGE_SIZE):  # slots grow in turns: their pages interleave
        for slot, length in enumerate(lengths):
            if length >= 0:
                table.grow(slot, min(tokens, length + 1))
    chunks_k = [jnp.asarray(rng.normal(size=(n, kv_heads, dim, PAGE_SIZE)), jnp.float32) for n in chunk_sizes(pages)]
    chunks_v = [jnp.asarray(rng.normal(size=(n, kv_heads, PAGE_SIZE, dim)), jnp.float32) for n in chunk_sizes(pages)]
    view = paged_attention.PageView(
        jnp.asarray(table.owner), jnp.asarray(table.start), jnp.asarray(np.maximum(lengths, 0), jnp.int32),
        jnp.asarray(table.table[:, : table.width(slots)]),
    )
    return chunks_k, chunks_v, view


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (16, 2, 64)])
def test_the_kernel_equals_the_pure_jax_paged_attention(heads, kv_heads, dim):
    if not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(heads * dim)
    slots = 12
    # Lengths across page boundaries (31, 32, 33), a slot past several pages, a one-token slot, an idle slot.
    lengths = [0, 31, 32, 33, 200, 5, -1, 64, 95, 96, 150, 7]
    chunks_k, chunks_v, view = pool_and_view(rng, slots, kv_heads, dim, lengths, pages=120)
    q = jnp.asarray(rng.normal(size=(slots, 1, heads, dim)), jnp.float32)
    assert cpu_paged_attention.supports(q, chunks_k)
    expected = jax.jit(paged_attention.decode_attention)(q, chunks_k, chunks_v, view)
    got = jax.jit(cpu_paged_attention.decode_attention)(q, chunks_k, chunks_v, view)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[6], 0)  # the idle slot sees nothing: zeros, never NaN
    stepped = jax.jit(paged_attention.step_attention, static_argnames="kernel")(q, chunks_k, chunks_v, view, True)
    np.testing.assert_array_equal(np.asarray(stepped), np.asarray(got))  # the decode step takes the kernel


def test_shapes_the_kernel_is_not_built_for_keep_xlas_attention():
    q = jnp.zeros((2, 1, 4, 8), jnp.float32)  # head size 8
    assert not cpu_paged_attention.supports(q, [jnp.zeros((4, 2, 8, PAGE_SIZE), jnp.float32)])
    assert not cpu_paged_attention.supports(jnp.zeros((2, 1, 4, 64)), [jnp.zeros((4, 2, 64, PAGE_SIZE), jnp.bfloat16)])


def test_greedy_generation_is_the_same_with_the_kernel_and_without(monkeypatch):
    import keras

    from model.backbone import LlamaBackbone

    if not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    keras.utils.set_random_seed(3)
    config = LlamaConfig(vocabulary_size=96, num_layers=2, num_query_heads=6, num_key_value_heads=2, hidden_dim=384,
                         intermediate_dim=64, max_sequence_length=256)  # head size 64: the kernel's
    backbone = LlamaBackbone(config)
    rng = np.random.default_rng(2)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 80))), 20) for i in range(10)]

    def generate():
        jax.clear_caches()  # the decode programs are traced again, with or without the kernel
        engine = GenerationEngine(backbone, max_slots=4, max_length=128, steps_per_call=4)
        return [c.token_ids for c in engine.generate(requests)]

    traced = []
    kernel = cpu_paged_attention.decode_attention
    monkeypatch.setattr(cpu_paged_attention, "decode_attention", lambda *args: traced.append(1) or kernel(*args))
    with_kernel = generate()
    assert traced  # the decode programs ran the kernel
    monkeypatch.setattr(cpu_paged_attention, "available", lambda: False)
    traced.clear()
    assert generate() == with_kernel
    assert not traced
