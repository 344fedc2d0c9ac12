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
from model.generation.paged_cache import PAGE_SIZE, PageTable, chunk_sizes, write_layer
from model.generation.requests import Request
from model.kernels import cpu_paged_attention


def test_the_kernel_builds_wherever_there_is_a_compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine keeps XLA's attention")
    assert cpu_paged_attention.available()
    assert cpu_paged_attention.library_path().exists()


def pool_and_view(rng, slots, kv_heads, dim, lengths, pages, dtype=jnp.float32):
    """A pool of `pages` pages in chunks, random keys and values, and the view of slots with `lengths` (a slot
    of length -1 is idle: it holds no page and writes nothing), each slot's pages scattered among the others' as
    decoding leaves them, each active slot's new entry going to position `length`."""
    table = PageTable(pages, PAGE_SIZE, slots, max(lengths) + 1)
    for slot, length in enumerate(lengths):
        if length >= 0:
            table.admit(slot, 1, length + 1)
    for tokens in range(PAGE_SIZE + 1, max(lengths) + 2, PAGE_SIZE):  # slots grow in turns: their pages interleave
        for slot, length in enumerate(lengths):
            if length >= 0:
                table.grow(slot, min(tokens, length + 1))
    chunks_k = [jnp.asarray(rng.normal(size=(n, kv_heads, dim, PAGE_SIZE)), dtype) for n in chunk_sizes(pages)]
    chunks_v = [jnp.asarray(rng.normal(size=(n, kv_heads, PAGE_SIZE, dim)), dtype) for n in chunk_sizes(pages)]
    positions = np.maximum(lengths, 0)
    write_pages = np.where(np.asarray(lengths) >= 0, table.table[np.arange(slots), positions // PAGE_SIZE], pages)
    view = paged_attention.PageView(
        jnp.asarray(table.owner), jnp.asarray(table.start), jnp.asarray(positions, jnp.int32),
        jnp.asarray(table.table[:, : table.width(slots)]), jnp.asarray(write_pages, jnp.int32),
    )
    return chunks_k, chunks_v, view


def reference_write(view):
    """XLA's write of a step's new entries, as the decode step passes it to `step_attention`."""
    def write(chunks_k, chunks_v, k, v):
        return write_layer(chunks_k, chunks_v, k, v, view.write_pages, view.lengths % PAGE_SIZE)
    return write


@pytest.mark.parametrize("heads, kv_heads, dim, dtype", [
    (9, 3, 64, jnp.float32), (8, 2, 128, jnp.float32), (4, 4, 64, jnp.float32), (16, 2, 64, jnp.float32),
    (9, 3, 64, jnp.bfloat16), (8, 2, 128, jnp.bfloat16),
])
def test_the_kernel_writes_and_attends_as_the_pure_jax_write_and_paged_attention(heads, kv_heads, dim, dtype):
    if not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(heads * dim)
    slots = 12
    # Lengths across page boundaries (31, 32, 33), a slot past several pages, a one-token slot, an idle slot.
    lengths = [0, 31, 32, 33, 200, 5, -1, 64, 95, 96, 150, 7]
    chunks_k, chunks_v, view = pool_and_view(rng, slots, kv_heads, dim, lengths, pages=120, dtype=dtype)
    q = jnp.asarray(rng.normal(size=(slots, 1, heads, dim)), jnp.float32)
    new_k, new_v = (jnp.asarray(rng.normal(size=(slots, kv_heads, dim)), jnp.float32) for _ in range(2))
    assert cpu_paged_attention.supports(q, chunks_k, chunks_v)
    write = reference_write(view)
    expected, expected_k, expected_v = jax.jit(
        lambda *a: paged_attention.step_attention(*a, view, write, False)
    )(q, new_k, new_v, chunks_k, chunks_v)
    got, got_k, got_v = jax.jit(
        lambda *a: cpu_paged_attention.write_and_attend(*a, view)
    )(q, new_k, new_v, chunks_k, chunks_v)
    # The pool: every new entry where XLA's scatter puts it (rounded alike for bfloat16), nothing else touched.
    for want, have in zip((*expected_k, *expected_v), (*got_k, *got_v)):
        np.testing.assert_array_equal(np.asarray(have.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[6], 0)  # the idle slot sees nothing: zeros, never NaN
    stepped, *_ = jax.jit(lambda *a: paged_attention.step_attention(*a, view, write, True))(
        q, new_k, new_v, chunks_k, chunks_v
    )
    np.testing.assert_array_equal(np.asarray(stepped), np.asarray(got))  # the decode step takes the kernel


def test_the_kernel_updates_the_pool_in_place_inside_a_jitted_step():
    if not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    rng = np.random.default_rng(5)
    chunks_k, chunks_v, view = pool_and_view(rng, 4, 2, 64, [3, 40, -1, 70], pages=24)
    q = jnp.asarray(rng.normal(size=(4, 1, 4, 64)), jnp.float32)
    new = jnp.asarray(rng.normal(size=(4, 2, 64)), jnp.float32)
    step = jax.jit(lambda q, k, v, ck, cv: cpu_paged_attention.write_and_attend(q, k, v, ck, cv, view), donate_argnums=(3, 4))
    hlo = step.lower(q, new, new, chunks_k, chunks_v).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line]
    # The donated pool is written where it lies, not copied first.
    assert not [line for line in copies if "[24,2,64,32]" in line or "[24,2,32,64]" in line], copies
    pointers = [c.unsafe_buffer_pointer() for c in chunks_k]
    _, written_k, _ = step(q, new, new, chunks_k, chunks_v)
    assert [c.unsafe_buffer_pointer() for c in written_k] == pointers


def test_shapes_the_kernel_is_not_built_for_keep_xlas_attention():
    q = jnp.zeros((2, 1, 4, 8), jnp.float32)  # head size 8
    pool = [jnp.zeros((4, 2, 8, PAGE_SIZE), jnp.float32)]
    assert not cpu_paged_attention.supports(q, pool, pool)
    q = jnp.zeros((2, 1, 4, 64))
    half = [jnp.zeros((4, 2, 64, PAGE_SIZE), jnp.float16)]
    assert not cpu_paged_attention.supports(q, half, half)
    mixed = [jnp.zeros((4, 2, 64, PAGE_SIZE), jnp.bfloat16)], [jnp.zeros((4, 2, PAGE_SIZE, 64), jnp.float32)]
    assert not cpu_paged_attention.supports(q, *mixed)


def kernel_sized_backbone(seed: int):
    """A random two-layer model of head size 64 (the kernel's), small otherwise."""
    import keras

    from model.backbone import LlamaBackbone

    keras.utils.set_random_seed(seed)
    config = LlamaConfig(vocabulary_size=96, num_layers=2, num_query_heads=6, num_key_value_heads=2, hidden_dim=384,
                         intermediate_dim=64, max_sequence_length=256)
    return LlamaBackbone(config)


@pytest.mark.parametrize("cache_dtype", [None, "bfloat16"])
def test_greedy_generation_is_the_same_with_the_kernel_and_without(monkeypatch, cache_dtype):
    if not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    backbone = kernel_sized_backbone(3)
    rng = np.random.default_rng(2)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 80))), 20) for i in range(10)]

    def generate():
        jax.clear_caches()  # the decode programs are traced again, with or without the kernel
        engine = GenerationEngine(backbone, max_slots=4, max_length=128, steps_per_call=4, cache_dtype=cache_dtype)
        return [c.token_ids for c in engine.generate(requests)]

    traced = []
    kernel = cpu_paged_attention.write_and_attend
    monkeypatch.setattr(cpu_paged_attention, "write_and_attend", lambda *args: traced.append(1) or kernel(*args))
    with_kernel = generate()
    assert traced  # the decode programs ran the kernel
    monkeypatch.setattr(cpu_paged_attention, "available", lambda: False)
    traced.clear()
    assert generate() == with_kernel
    assert not traced


@pytest.mark.parametrize("kernel", [True, False])
def test_a_decode_call_passes_the_whole_pool_to_the_kernel_and_the_chunks_in_use_to_xla(monkeypatch, kernel):
    # The kernel reads each slot's own pages wherever they lie: one decode program per rows bucket however far
    # the pages in use spread. XLA's attention reads every page of the chunks it is given: only those in use.
    from model.generation.paged_cache import CHUNK_PAGES

    if kernel and not cpu_paged_attention.available():
        pytest.skip("no kernel on this machine")
    monkeypatch.setattr(cpu_paged_attention, "available", lambda: kernel)
    backbone = kernel_sized_backbone(4)
    rng = np.random.default_rng(5)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 60))), 6) for i in range(6)]
    engine = GenerationEngine(backbone, max_slots=4, max_length=96, cache_tokens=PAGE_SIZE * CHUNK_PAGES * 3)
    completions = engine.generate(requests)
    whole = len(chunk_sizes(engine.cache_pages))
    assert whole == 3
    assert {shape[2] for shape in engine.stats.shapes if shape[0] == "decode"} == ({whole} if kernel else {1})
    assert engine._chunks_to_read(CHUNK_PAGES + 1) == (whole if kernel else 2)
    one_chunk = GenerationEngine(backbone, max_slots=4, max_length=96)  # the same tokens either way
    assert [c.token_ids for c in completions] == [c.token_ids for c in one_chunk.generate(requests)]
