"""The engine's KV cache: a pool of fixed-size pages, and the host-side table of which slot owns which page.

The pool is preallocated in grouped form, one pool per layer: values [N, K, P, D] (pages, KV heads, positions per
page, head dim), keys [N, K, D, P]. K/V heads are stored once, never repeated to the query heads; heads before
positions, as in the dense cache (`kv_cache.py`). Keys keep a page's positions last, so that a decode step's
scores (a sum over D for each position) run along contiguous positions, and values keep D last, so that their
weighted sum over positions runs along contiguous D: both reductions vectorise, 1.8x faster than keys with D
last (decode attention over 320 pages of the demo model, all layers: 96 -> 53 ms). A slot's sequence lives in the pages its
row of the page table lists, position p in page table[p // P] at offset p % P. Pages are handed out lowest
free id first, so the pages in use stay packed at the low end of the pool and a decode step reads only a
window of the first pages (see `model.paged_attention`): its cost follows the tokens in flight, not slots x
the longest sequence.

Admission reserves a request's worst case (prompt + token budget) in whole pages, so a slot admitted is never
starved of a page later; pages themselves are taken only as the sequence grows.

Example:
    >>> table = PageTable(pages=64, page_size=32, slots=4, max_length=256)
    >>> table.admit(slot=0, prompt_tokens=40, max_tokens=104)
    >>> table.owner[:3], table.start[:3]  # two pages for the prompt, their first positions
    (array([0, 0, 4]...), array([ 0, 32,  0]...))
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import LlamaConfig
from model.generation.kv_cache import keep_layout
from model.generation.prefix_cache import PrefixCache
from model.kernels import cpu_paged_cache, platform

PAGE_SIZE = 32  # positions per page: a slot wastes P / 2 on average; smaller pages mean more, slower pages


# A layer's pool is cut into chunks. A decode call reads the chunks below the highest page in use, each a whole
# array: slicing the first pages off one big array made XLA copy them on every step (~0.5 GB per step with a
# pool three times the pages in use). Chunks of at least 64 pages (2,048 positions) keep the pages read within a
# chunk of those in use; at most 8 chunks per pool keep the programs few and small: a decode program is one
# attention block per chunk per layer, so its compile time grows with the chunks it reads (4 chunks: ~13 s,
# 18 chunks: ~55 s on the bench machine), and there is one program per number of chunks read.
CHUNK_PAGES = 64
MAX_CHUNKS = 8

# Page-table columns a decode call reads: a slot's whole row when rows are this short (one program, whatever
# the lengths in flight; the per-slot combine of [B, W] pages costs little at W <= 32), else the most pages a
# slot of the call holds, rounded up to a power of two.
WHOLE_ROW_PAGES = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """One pool of pages per layer, in chunks: k[l][c] [n, K, D, P] (positions last), v[l][c] [n, K, P, D].

    Per-layer arrays rather than one [L, ...] array: the decode step runs its layers unrolled and reads and
    writes layer l's pool directly. A stacked pool sliced per layer inside a loop makes XLA copy the layer's
    whole pool on every step (it cannot hand a dynamic slice to a dot or library call without materialising it).
    Page ids run across the chunks: page p is entry p % c of chunk p // c, c = chunk_pages(pages).
    """

    k: tuple[tuple[jax.Array, ...], ...]
    v: tuple[tuple[jax.Array, ...], ...]
    # Static: a split pool's layout, restated after every write (see kv_cache.KVCache.sharding).
    sharding: jax.sharding.Sharding | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def allocate(
        cls, config: LlamaConfig, pages: int, page_size: int, dtype, sharding: jax.sharding.Sharding | None = None
    ) -> "PagedKVCache":
        """Zeros; with `sharding` (`model.parallel.cache_sharding`, whose layer axis is dropped here) each device
        allocates only its own KV heads."""
        layer_sharding = _per_layer(sharding)
        sizes = chunk_sizes(pages)
        heads, d = config.num_key_value_heads, config.head_dim
        zeros = lambda shape: jnp.zeros(shape, dtype, device=layer_sharding)  # noqa: E731
        layers = range(config.num_layers)
        keys = tuple(tuple(zeros((n, heads, d, page_size)) for n in sizes) for _ in layers)
        values = tuple(tuple(zeros((n, heads, page_size, d)) for n in sizes) for _ in layers)
        return cls(keys, values, layer_sharding)

    @property
    def pages(self) -> int:
        return sum(chunk.shape[0] for chunk in self.k[0])

    @property
    def page_size(self) -> int:
        return self.v[0][0].shape[2]

    @property
    def dtype(self):
        return self.k[0][0].dtype

    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves((self.k, self.v)))


def chunk_pages(pages: int) -> int:
    """Pages per chunk of a pool of `pages` pages: CHUNK_PAGES, or more so that there are at most MAX_CHUNKS."""
    return max(CHUNK_PAGES, -(-pages // MAX_CHUNKS))


def chunk_sizes(pages: int) -> list[int]:
    """Pages in each chunk of a pool of `pages` pages: chunk_pages(pages) each, the last one the rest."""
    size = chunk_pages(pages)
    return [min(size, pages - start) for start in range(0, pages, size)]


def chunks_to_read(extent: int, pages: int) -> int:
    """Chunks a decode call reads when every page in use is below `extent`."""
    return max(1, min(-(-extent // chunk_pages(pages)), len(chunk_sizes(pages))))


def _per_layer(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """The layout of one layer's pool, from the layout of a stacked [L, ...] cache."""
    if sharding is None:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))


def write_layer(
    chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], new_k: jax.Array, new_v: jax.Array,
    pages: jax.Array, offsets: jax.Array, sharding: jax.sharding.Sharding | None = None,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Writes X tokens' keys/values [X, K, D] into (the given first chunks of) one layer's pool at (pages [X],
    offsets [X]). A page past these chunks is dropped: padding tokens and idle slots point there."""
    out_k, out_v, first = [], [], 0
    for k, v in zip(chunks_k, chunks_v):
        n = k.shape[0]
        local = pages - first
        local = jnp.where((local >= 0) & (local < n), local, n)  # n: out of range, dropped
        first += n
        # Indexing pages (axis 0) and offsets (the position axis) together puts their shared X axis first.
        k = k.at[local, :, :, offsets].set(new_k.astype(k.dtype), mode="drop")
        v = v.at[local, :, offsets].set(new_v.astype(v.dtype), mode="drop")
        k, v = keep_layout(sharding, k, v)
        out_k.append(k)
        out_v.append(v)
    return tuple(out_k), tuple(out_v)


@functools.partial(jax.jit, static_argnames=("sharding",), donate_argnums=(0, 1))
def _write_one_layer(chunks_k, chunks_v, new_k, new_v, layer, pages, offsets, sharding=None):
    xla = lambda: write_layer(chunks_k, chunks_v, new_k[layer], new_v[layer], pages, offsets, sharding)  # noqa: E731
    # On CPU the kernel writes instead: XLA's CPU scatter into a bfloat16 pool converts the whole pool to float32
    # and back (see model/kernels/cpu_paged_cache.py). A pool split across devices keeps XLA's writes.
    if sharding is None and cpu_paged_cache.supports_write(chunks_k, chunks_v) and cpu_paged_cache.available():
        kernel = lambda: cpu_paged_cache.write(chunks_k, chunks_v, new_k[layer], new_v[layer], pages, offsets)  # noqa: E731
        return platform.on_cpu(kernel, xla)
    return xla()


def write(cache: PagedKVCache, new_k: jax.Array, new_v: jax.Array, pages: jax.Array, offsets: jax.Array) -> PagedKVCache:
    """Writes X tokens' keys/values [L, X, K, D] of every layer at (pages [X], offsets [X]) (prefill), each
    layer's pool updated in place.

    One call per layer of one small program (the layer index is an argument, not a constant): a program that
    writes every layer grows with layers x chunks, and so does its compile time (~10 s for the demo model)."""
    written = [
        _write_one_layer(k, v, new_k, new_v, layer, pages, offsets, sharding=cache.sharding)
        for layer, (k, v) in enumerate(zip(cache.k, cache.v))
    ]
    return PagedKVCache(tuple(k for k, _ in written), tuple(v for _, v in written), cache.sharding)


def gather_pages(chunks: Sequence[jax.Array], pages: jax.Array) -> jax.Array:
    """Pages `pages` (any shape of ids, all in range) of one layer's pool in chunks: [*pages.shape, ...page]."""
    flat = pages.reshape(-1)
    picked, first = None, 0
    for chunk in chunks:
        n = chunk.shape[0]
        local = flat - first
        inside = ((local >= 0) & (local < n)).reshape((-1,) + (1,) * (chunk.ndim - 1))
        taken = chunk[jnp.clip(local, 0, n - 1)]
        picked = taken if picked is None else jnp.where(inside, taken, picked)
        first += n
    return picked.reshape(pages.shape + chunks[0].shape[1:])


def copy_layer(
    chunks: Sequence[jax.Array], source: jax.Array, target: jax.Array, sharding: jax.sharding.Sharding | None = None
) -> tuple[jax.Array, ...]:
    """Copies pages source [M] -> target [M] within one layer's keys or values; a target past the chunks is
    dropped (padding). XLA's copy: the reference, and what other platforms run."""
    pages = gather_pages(chunks, source)
    out, first = [], 0
    for chunk in chunks:
        n = chunk.shape[0]
        local = target - first
        local = jnp.where((local >= 0) & (local < n), local, n)  # n: not in this chunk, dropped
        out.append(keep_layout(sharding, chunk.at[local].set(pages, mode="drop"))[0])
        first += n
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("sharding",), donate_argnums=(0,))
def _copy_in_layer(chunks: tuple[jax.Array, ...], source: jax.Array, target: jax.Array, sharding=None):
    """`copy_layer` as one program, the chunks updated in place; on CPU the kernel copies (as `_write_one_layer`:
    XLA's bfloat16 scatter converts the whole pool)."""
    xla = lambda: copy_layer(chunks, source, target, sharding)  # noqa: E731
    if sharding is None and cpu_paged_cache.available():
        return platform.on_cpu(lambda: cpu_paged_cache.copy(chunks, source, target), xla)
    return xla()


def copy_pages(cache: PagedKVCache, source: jax.Array, target: jax.Array) -> PagedKVCache:
    """Copies whole pages source [M] -> target [M] in every layer (a target of N or more is dropped: padding),
    one call of one small program per layer's keys and values (as `write`, so that compiles stay short)."""
    keys = tuple(_copy_in_layer(chunks, source, target, sharding=cache.sharding) for chunks in cache.k)
    values = tuple(_copy_in_layer(chunks, source, target, sharding=cache.sharding) for chunks in cache.v)
    return PagedKVCache(keys, values, cache.sharding)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class PageTable:
    """Which pages each slot owns, kept on the host and handed to the jitted steps as small int32 arrays.

    owner [N]: the slot owning each page, `slots` for a free page; start [N]: the sequence position of each
    page's first entry; table [B, pages per slot]: each slot's pages in order, N where none is allocated yet.
    """

    def __init__(
        self, pages: int, page_size: int, slots: int, max_length: int, prefix: PrefixCache | None = None
    ) -> None:
        self.pages, self.page_size, self.slots = pages, page_size, slots
        # Prompts kept for sharing (`prefix_cache.py`): their pages are neither free nor promised, and go back
        # to the free list, least recently used first, when a slot needs a page and none is free.
        self.prefix = prefix
        self.pages_per_slot = pages_for(max_length, page_size)
        self.owner = np.full(pages, slots, np.int32)
        self.start = np.zeros(pages, np.int32)
        self.table = np.full((slots, self.pages_per_slot), pages, np.int32)
        self._free = list(range(pages))  # a heap: the lowest free page first keeps the pages in use packed
        self._held = [0] * slots  # pages allocated per slot
        self._reserved = [0] * slots  # pages promised per slot (its worst case), allocated or not
        self._promised = 0  # sum of _reserved

    def can_admit(self, max_tokens: int, keep: Collection[bytes] = ()) -> bool:
        """Whether a request that may grow to `max_tokens` positions fits beside every promise made so far and
        the cached prompts `keep`, which may not be evicted for it."""
        pinned = self.prefix.cached_pages(keep) if self.prefix is not None and keep else 0
        return self._promised + pinned + pages_for(max_tokens, self.page_size) <= self.pages

    def admit(self, slot: int, prompt_tokens: int, max_tokens: int, keep: Collection[bytes] = ()) -> None:
        """Promises `slot` room for `max_tokens` positions and allocates the pages of its prompt, evicting none
        of the cached prompts `keep` (those about to be copied)."""
        if self._reserved[slot]:
            raise ValueError(f"slot {slot} is still in use")
        if not self.can_admit(max_tokens, keep):
            raise ValueError(f"no room for {max_tokens} more tokens in a pool of {self.pages} pages")
        needed = pages_for(max_tokens, self.page_size)
        if needed > self.pages_per_slot:
            raise ValueError(f"{max_tokens} tokens exceed the {self.pages_per_slot} pages a slot may hold")
        self._reserved[slot] = needed
        self._promised += needed
        self.grow(slot, prompt_tokens, keep)

    def grow(self, slot: int, tokens: int, keep: Collection[bytes] = ()) -> None:
        """Allocates pages until `slot` has room for `tokens` positions (at most what it was promised)."""
        wanted = min(pages_for(tokens, self.page_size), self._reserved[slot])
        while self._held[slot] < wanted:
            if not self._free and self.prefix is not None:
                evicted = self.prefix.evict(keep)
                if evicted is not None:
                    heapq.heappush(self._free, evicted)
            page = heapq.heappop(self._free)
            index = self._held[slot]
            self.owner[page], self.start[page] = slot, index * self.page_size
            self.table[slot, index] = page
            self._held[slot] += 1

    def release(self, slot: int) -> None:
        """Returns every page of `slot` and its promise; the pages of a prompt kept for sharing stay cached."""
        kept = self.prefix.pages_kept_at_release(slot) if self.prefix is not None else set()
        for page in self.table[slot, : self._held[slot]]:
            self.owner[page] = self.slots  # owned by no slot: decode attention never reads a cached page
            if int(page) not in kept:
                heapq.heappush(self._free, int(page))
        self.table[slot] = self.pages
        self._held[slot] = 0
        self._promised -= self._reserved[slot]
        self._reserved[slot] = 0

    def move(self, source: int, target: int) -> None:
        """Hands every page and the promise of slot `source` to the free slot `target`."""
        if self._reserved[target]:
            raise ValueError(f"slot {target} is still in use")
        held = self._held[source]
        self.table[target], self.table[source] = self.table[source], self.pages
        self.owner[self.table[target, :held]] = target
        self._held[target], self._held[source] = held, 0
        self._reserved[target], self._reserved[source] = self._reserved[source], 0
        if self.prefix is not None:
            self.prefix.moved(source, target)

    def width(self, slots: int) -> int:
        """Columns of the page table a decode call of the first `slots` slots reads: a slot's whole row when it
        is at most WHOLE_ROW_PAGES, else the most pages one of them holds rounded up to a power of two."""
        if self.pages_per_slot <= WHOLE_ROW_PAGES:
            return self.pages_per_slot
        held = max(self._held[:slots], default=0)
        width = WHOLE_ROW_PAGES
        while width < held:
            width *= 2
        return min(width, self.pages_per_slot)

    def extent(self) -> int:
        """One past the highest page in use: a decode step reads pages [0, extent)."""
        used = np.flatnonzero(self.owner < self.slots)
        return int(used[-1]) + 1 if used.size else 0

    def token_locations(self, slot: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(pages, offsets) of positions 0 .. count-1 of `slot`, which must be allocated."""
        positions = np.arange(count)
        return self.table[slot, positions // self.page_size], (positions % self.page_size).astype(np.int32)
