"""The paged KV cache: the host page table, paged decode attention against dense attention, and the engine
running with a cache smaller than every slot at full length."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from model import paged_attention, transformer
from model.generation import paged_cache
from model.generation.engine import GenerationEngine
from model.generation.paged_cache import PageTable
from model.generation.requests import Request


def test_pages_are_handed_out_lowest_first_and_come_back_on_release():
    table = PageTable(pages=10, page_size=4, slots=3, max_length=16)
    table.admit(0, prompt_tokens=5, max_tokens=9)  # 2 pages now, 3 promised
    table.admit(1, prompt_tokens=3, max_tokens=8)  # 1 page now, 2 promised
    assert list(table.table[0, :2]) == [0, 1] and table.table[1, 0] == 2
    assert list(table.owner[:4]) == [0, 0, 1, 3] and list(table.start[:3]) == [0, 4, 0]
    assert table.extent() == 3
    table.grow(0, 9)
    assert table.table[0, 2] == 3 and table.start[3] == 8
    table.grow(0, 100)  # never beyond the promise
    assert (table.owner == 0).sum() == 3
    pages, offsets = table.token_locations(0, 9)
    assert list(pages) == [0, 0, 0, 0, 1, 1, 1, 1, 3] and list(offsets) == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    table.release(0)
    assert list(table.owner[:4]) == [3, 3, 1, 3] and (table.table[0] == 10).all()
    assert table.extent() == 3
    table.admit(2, prompt_tokens=4, max_tokens=4)
    assert table.table[2, 0] == 0  # the lowest free page again


def test_admission_keeps_every_promise():
    table = PageTable(pages=6, page_size=4, slots=4, max_length=16)
    table.admit(0, prompt_tokens=1, max_tokens=16)  # promises 4 pages, takes 1
    assert table.can_admit(8) and not table.can_admit(9)
    table.admit(1, prompt_tokens=8, max_tokens=8)
    with pytest.raises(ValueError, match="no room"):
        table.admit(2, prompt_tokens=1, max_tokens=1)
    with pytest.raises(ValueError, match="still in use"):
        table.admit(1, prompt_tokens=1, max_tokens=1)
    table.release(1)
    table.admit(2, prompt_tokens=1, max_tokens=2)


def test_write_puts_each_token_at_its_page_and_offset_and_drops_the_rest():
    # Per layer, in chunks of pages (here 2 + 1): keys [n, K, D, P] (positions last), values [n, K, P, D].
    chunks = lambda shape: (jnp.zeros((2,) + shape), jnp.zeros((1,) + shape))  # noqa: E731
    # Arrays of their own per layer, as allocate() makes them: the write updates each layer's chunks in place.
    cache = paged_cache.PagedKVCache(tuple(chunks((1, 2, 4)) for _ in range(2)), tuple(chunks((1, 4, 2)) for _ in range(2)))
    new = jnp.arange(2 * 3 * 1 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2) + 1  # [L, X, K, D]
    written = paged_cache.write(cache, new, -new, jnp.array([2, 0, 3]), jnp.array([1, 3, 0]))
    k = np.stack([np.concatenate(layer) for layer in written.k])
    v = np.stack([np.concatenate(layer) for layer in written.v])
    np.testing.assert_array_equal(k[:, 2, :, :, 1], np.asarray(new[:, 0]))
    np.testing.assert_array_equal(k[:, 0, :, :, 3], np.asarray(new[:, 1]))
    np.testing.assert_array_equal(v[:, 2, :, 1], -np.asarray(new[:, 0]))
    np.testing.assert_array_equal(v[:, 0, :, 3], -np.asarray(new[:, 1]))
    assert np.count_nonzero(k) == np.count_nonzero(v) == 2 * 2 * 2  # page 3 does not exist: the third was dropped


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_paged_decode_attention_equals_dense_attention(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, d, page, max_length = 5, 8, 4, 24
    lengths = np.array([0, 1, 7, 13, 23], np.int32)
    dense_k = rng.normal(size=(b, kv_heads, max_length, d)).astype(np.float32)
    dense_v = rng.normal(size=(b, kv_heads, max_length, d)).astype(np.float32)
    q = rng.normal(size=(b, 1, heads, d)).astype(np.float32)
    new_k = rng.normal(size=(b, 1, kv_heads, d)).astype(np.float32)
    new_v = rng.normal(size=(b, 1, kv_heads, d)).astype(np.float32)

    # Scatter each slot's positions over pages in a shuffled order, with free pages between them.
    table = PageTable(pages=40, page_size=page, slots=b, max_length=max_length)
    for slot in [0, *rng.permutation(np.arange(1, b))]:
        table.admit(int(slot), max(int(lengths[slot]), 1), max_length)
    table.release(0)  # slot 0 has nothing cached: its page becomes a free page inside the window
    assert (table.owner[: table.extent()] == b).any()
    pool_k = np.zeros((40, kv_heads, d, page), np.float32)  # positions last, as the engine's pool keeps keys
    pool_v = np.zeros((40, kv_heads, page, d), np.float32)
    for slot in range(b):
        pages, offsets = table.token_locations(slot, int(lengths[slot]))
        pool_k[pages, :, :, offsets] = dense_k[slot, :, : lengths[slot]].swapaxes(0, 1)
        pool_v[pages, :, offsets] = dense_v[slot, :, : lengths[slot]].swapaxes(0, 1)
    # The new token goes into the pool first (at position `lengths`), then attention reads it with the rest.
    # Slot 0 was released: it is idle, owns no page and writes nothing.
    for slot in range(1, b):
        table.grow(slot, int(lengths[slot]) + 1)
        (new_page,), (offset,) = (a[-1:] for a in table.token_locations(slot, int(lengths[slot]) + 1))
        pool_k[new_page, :, :, offset], pool_v[new_page, :, offset] = new_k[slot, 0], new_v[slot, 0]
    window = table.extent()
    view = paged_attention.PageView(
        jnp.asarray(table.owner[:window]), jnp.asarray(table.start[:window]), jnp.asarray(lengths),
        jnp.asarray(table.table[:, : table.width(b)]),
    )
    paged = paged_attention.decode_attention(q, [pool_k[:window]], [pool_v[:window]], view)
    # The same pool read in chunks of 3 pages: the softmax across chunks gives the same attention.
    cuts = list(range(3, window, 3))
    chunked = paged_attention.decode_attention(q, np.split(pool_k[:window], cuts), np.split(pool_v[:window], cuts), view)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(paged), atol=1e-6, rtol=1e-6)
    dense = transformer._attention(q, new_k, new_v, dense_k, dense_v, lengths, np.ones((b, 1, 1), bool))
    # Slot 0 is idle (it owns no page): its output is 0, never NaN; every other slot equals dense attention.
    np.testing.assert_array_equal(np.asarray(paged)[0], 0)
    np.testing.assert_allclose(np.asarray(paged)[1:], np.asarray(dense)[1:], atol=1e-5, rtol=1e-5)


def test_a_cache_smaller_than_every_slot_at_full_length_makes_requests_wait_not_fail(tiny_backbone):
    rng = np.random.default_rng(8)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(1, 50))), 12) for i in range(12)]
    roomy = GenerationEngine(tiny_backbone, max_slots=8, max_length=64).generate(requests)
    # Room for about two requests at a time although there are eight slots.
    tight = GenerationEngine(tiny_backbone, max_slots=8, max_length=64, cache_tokens=128)
    assert tight.cache_pages * paged_cache.PAGE_SIZE == 128
    completions = tight.generate(requests)
    assert [c.token_ids for c in completions] == [c.token_ids for c in roomy]
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        GenerationEngine(tiny_backbone, max_slots=8, max_length=64, cache_tokens=32)


def test_the_default_cache_runs_every_slot_at_full_length_when_max_length_is_not_whole_pages(tiny_backbone):
    # 40 positions take two pages of 32: a pool of 8 x 40 positions (10 pages) would run five of these at once and
    # make three wait; the default pool holds every slot's whole pages, so all eight decode together.
    rng = np.random.default_rng(3)
    requests = [Request(i, list(rng.integers(1, 90, 20)), 20) for i in range(8)]
    engine = GenerationEngine(tiny_backbone, max_slots=8, max_length=40, steps_per_call=4)
    assert engine.cache_pages == 8 * paged_cache.pages_for(40, paged_cache.PAGE_SIZE)
    completions = engine.generate(requests)
    assert all(len(c.token_ids) == 20 for c in completions)
    assert engine.stats.decode_calls == 5  # the first token from prefill, then 19 in ceil(19 / 4) calls, all rows at once


def test_moving_a_slot_hands_over_its_pages_and_its_promise():
    table = PageTable(pages=8, page_size=4, slots=3, max_length=16)
    table.admit(2, prompt_tokens=6, max_tokens=12)  # 2 pages now, 3 promised
    pages = list(table.table[2, :2])
    table.move(2, 0)
    assert list(table.table[0, :2]) == pages and (table.table[2] == 8).all()
    assert list(table.owner[pages]) == [0, 0]
    table.grow(0, 12)  # the promise moved too: a third page is granted to slot 0
    assert (table.owner < 3).sum() == 3 and not table.can_admit(24)
    with pytest.raises(ValueError, match="still in use"):
        table.move(1, 0)
    table.release(0)
    assert (table.owner == 3).all() and table.can_admit(32)


def test_a_bfloat16_cache_for_a_float32_model_halves_the_pool_and_keeps_greedy_close(tiny_backbone):
    rng = np.random.default_rng(5)
    requests = [Request(i, list(rng.integers(1, 90, rng.integers(3, 30))), 16) for i in range(8)]
    full = GenerationEngine(tiny_backbone, max_slots=8, max_length=64)
    half = GenerationEngine(tiny_backbone, max_slots=8, max_length=64, cache_dtype="bfloat16")
    a, b = full.generate(requests), half.generate(requests)
    assert half._cache.dtype == jnp.bfloat16 and half._cache.nbytes() * 2 == full._cache.nbytes()
    same = sum(x == y for ca, cb in zip(a, b) for x, y in zip(ca.token_ids, cb.token_ids))
    assert same >= 0.9 * sum(len(c.token_ids) for c in a)
    assert [c.token_ids[0] for c in a] == [c.token_ids[0] for c in b]  # prefill attends in float32 either way
