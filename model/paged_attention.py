"""Decode attention over a paged KV cache: every slot reads only the pages it filled.

A dense cache [B, K, S, D] makes each decode step read S positions for every slot, S set by the longest
sequence in flight: with one 400-token prompt among 63 of 40 tokens, nine tenths of what is read is padding.
Here the cache is a pool of fixed-size pages (see `model.generation.paged_cache`); page n holds
positions start[n] .. start[n] + P - 1 of slot owner[n]. One decode step scores its query against every page
in use at once (one vectorised pass over the pool, whichever slot owns what), then combines each slot's pages
with a softmax taken across pages: per page the largest score, the sum of exponentials and the weighted sum of
values, gathered per slot through its row of the page table, the split softmax of flash-decoding.

Dimension letters as in `model.transformer`: B slots, K KV heads, G query heads per KV head, D head dim,
N pages, P positions per page, W pages per slot (the page table's width).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from model.kernels import cpu_paged_attention, platform

_MASKED = -1e30  # as in model.transformer: a masked score's exponential is exactly 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageView:
    """What one decode step needs to read the pool: which slot owns each page, where the page starts, and each
    slot's pages.

    owner [N] int32: the slot whose positions page n holds; B (one past the last slot) for a free page.
    start [N] int32: the position of the page's first entry in its slot's sequence.
    lengths [B] int32: each slot's new token's position; entries 0..lengths[b] are in the pool (the new token's
    key and value are written before attention reads them) and visible.
    table [B, W] int32: each slot's pages in order, N (or more) past its last; W covers the most pages any slot
    holds.
    write_pages [B] int32: the page each slot's new key and value go to (at offset lengths % P), N (or more) for
    a slot that writes nothing (idle); None where the caller writes no new entries (`decode_attention` alone).
    """

    owner: jax.Array
    start: jax.Array
    lengths: jax.Array
    table: jax.Array
    write_pages: jax.Array | None = None


def takes_kernel(q: Any, chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], kernel: bool) -> bool:
    """Whether `step_attention` runs the CPU kernel on CPU for q [B, 1, H, D] (an array or its shape) over these
    chunks: asked to (`kernel`), shapes the kernel is built for, and the kernel built here."""
    return kernel and cpu_paged_attention.supports(q, chunks_k, chunks_v) and cpu_paged_attention.available()


def step_attention(
    q: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    chunks_k: Sequence[jax.Array],
    chunks_v: Sequence[jax.Array],
    view: PageView,
    write: Callable[[Sequence[jax.Array], Sequence[jax.Array], jax.Array, jax.Array], tuple[tuple, tuple]],
    kernel: bool,
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """One decode step's attention, its cache write first: the new tokens' keys and values new_k/new_v [B, K, D]
    go into the pool at view.write_pages, then q [B, 1, H, D] attends over each slot's pages, its new entry
    among them. Returns the attention [B, 1, H, D] and the written chunks.

    With `kernel`, on CPU and for the shapes it is built for, the CPU kernel does both in one pass
    (`model.kernels.cpu_paged_attention`: it writes in place and reads only the pages of the rows in the call,
    on every core); else, and on every other platform, `write(chunks_k, chunks_v, new_k, new_v)` (XLA's
    scatter, which must put the entries where view.write_pages says) then `decode_attention`. The caller passes
    kernel=False for a pool split across devices: XLA cannot split a custom call, it would gather the whole pool
    onto every device."""

    def reference():
        written_k, written_v = write(chunks_k, chunks_v, new_k, new_v)
        return decode_attention(q, written_k, written_v, view), tuple(written_k), tuple(written_v)

    if takes_kernel(q, chunks_k, chunks_v, kernel):
        return platform.on_cpu(
            lambda: cpu_paged_attention.write_and_attend(q, new_k, new_v, chunks_k, chunks_v, view), reference
        )
    return reference()


def decode_attention(
    q: jax.Array,  # [B, 1, H, D] the new token's queries (rotated)
    chunks_k: Sequence[jax.Array],  # this layer's pool of keys in chunks of pages, each [n, K, D, P] (positions last)
    chunks_v: Sequence[jax.Array],  # this layer's pool of values, each [n, K, P, D]
    view: PageView,  # owner and start of the pages of these chunks, one after another
) -> jax.Array:
    """Grouped-query attention of one new token per slot over its pages, the new token's own included: [B, 1, H, D].

    Per page (one vectorised pass over the pages of every slot): its owner's queries, gathered by the page's
    owner, scored against the page's keys; the page's largest score m, its sum of exponentials s and its
    weighted sum of values o, each relative to m. Per slot: its pages' (m, s, o), gathered through its row of
    the page table, rescaled to the slot's largest m and summed (the split softmax of flash-decoding).
    Both moves are gathers of whole rows, linear in slots and pages. (One-hot matrix products did the same
    moves before, [pages, slots] each: quadratic in the batch, 29% of a 64-slot step's op time and 45% of a
    256-slot one's; gathers of rows run as copies.) The pool comes in chunks (see
    `model.generation.paged_cache`) so that reading its first pages needs no slice, which XLA would copy.
    """
    b, _, h, d = q.shape
    k_heads, page = chunks_k[0].shape[1], chunks_k[0].shape[3]
    g = h // k_heads
    qg = (q[:, 0].astype(jnp.float32) * d**-0.5).reshape(b, h * d)

    page_max, page_sum, page_out, offset = [], [], [], 0
    for pages_k, pages_v in zip(chunks_k, chunks_v):
        n = pages_k.shape[0]
        owner, start = view.owner[offset : offset + n], view.start[offset : offset + n]
        offset += n
        # A free page's owner is B: out of range, so it gets zero queries and sees no position.
        page_q = jnp.take(qg, owner, axis=0, mode="fill", fill_value=0).reshape(n, k_heads, g, d)
        page_length = jnp.take(view.lengths, owner, mode="fill", fill_value=-1)  # the owner's new token's position
        positions = start[:, None] + jnp.arange(page)[None]  # [n, P]
        visible = positions <= page_length[:, None]
        scores = jnp.einsum("nkgd,nkdp->nkgp", page_q, pages_k.astype(jnp.float32))
        scores = jnp.where(visible[:, None, None, :], scores, _MASKED)
        top = jnp.max(scores, axis=-1)  # [n, K, G]; _MASKED for a page with nothing visible
        weights = jnp.where(visible[:, None, None, :], jnp.exp(scores - top[..., None]), 0.0)
        page_max.append(top)
        page_sum.append(jnp.sum(weights, axis=-1))
        page_out.append(jnp.einsum("nkgp,nkpd->nkgd", weights, pages_v.astype(jnp.float32)))  # [n, K, G, D]

    # Each slot's pages, in page-table order; entries past its last page fill with (masked, 0, 0).
    take = lambda parts, fill: jnp.take(jnp.concatenate(parts), view.table, axis=0, mode="fill", fill_value=fill)  # noqa: E731
    slot_pages_max = take(page_max, _MASKED)  # [B, W, K, G]
    slot_max = jnp.max(slot_pages_max, axis=1, keepdims=True)
    rescale = jnp.exp(slot_pages_max - slot_max)  # a page with nothing visible: exp(-1e30 - max) = 0
    total = jnp.sum(take(page_sum, 0.0) * rescale, axis=1)  # [B, K, G]
    out = jnp.sum(take(page_out, 0.0) * rescale[..., None], axis=1)  # [B, K, G, D]
    # An active slot sees at least its new token; an idle one may see nothing and gets 0, never NaN.
    out = out / jnp.maximum(total, 1e-30)[..., None]
    return out.reshape(b, 1, h, d).astype(q.dtype)
