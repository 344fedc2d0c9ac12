"""Prompt sharing: a prompt already in the KV cache is not prefilled again.

Dataset synthesis asks for n samples of each prompt, and evaluation sweeps run the same prompts under several
sampling configurations; without sharing, every copy of a prompt is prefilled again. Here the pages that hold a
prefilled prompt's keys and values are remembered, keyed by a hash of its tokens. A later request with the
same tokens gets a copy of those pages (one jitted page copy, no model work) and starts decoding at the
prompt's last token: the decode step recomputes that one token against the copied pages and samples the
first generated token from it, with the request's own seed, sampler and penalties.

Each slot owns its own copy (the last, partly filled page included, so no page is ever written by two
sequences): the decode step's attention reads a page for its one owner (`model.paged_attention`). What is
shared is the compute; a copy of a prompt's pages costs a memory copy, ~1/1000 of prefilling it here.

Where the pages live:
- while the slot that prefilled the prompt decodes, in its own pages (positions below the prompt's length are
  never written again; positions past it are, and a copy overwrites them before reading, position by position);
- when that slot finishes, its prompt pages stay out of the free list, owned by no slot (decode never reads
  them), until the pool needs a page: then the least recently used prompt's pages go back to the free list.
A cached page is never promised to anyone (`PageTable.can_admit` counts promises only), so evicting one never
breaks a promise; a slot that grows takes a free page first and evicts only when there is none.

Example:
    >>> cache = PrefixCache()
    >>> key = prompt_key([1, 2, 3])
    >>> cache.remember(key, pages=(4, 5), tokens=3, slot=0)
    >>> cache.lookup(key).pages
    (4, 5)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Collection, Sequence

import numpy as np


def prompt_key(prompt_ids: Sequence[int]) -> bytes:
    """A digest of the prompt's tokens: equal prompts, equal keys (a 128-bit hash, collisions negligible)."""
    return hashlib.blake2b(np.asarray(prompt_ids, np.int64).tobytes(), digest_size=16).digest()


@dataclasses.dataclass
class CachedPrompt:
    pages: tuple[int, ...]  # the pages holding positions 0 .. tokens-1, in order
    tokens: int
    slot: int | None  # the live slot whose pages these are; None once it finished (then the cache owns them)


class PrefixCache:
    """Prompt key -> the pages holding that prompt's keys and values, least recently used first."""

    def __init__(self) -> None:
        self._prompts: collections.OrderedDict[bytes, CachedPrompt] = collections.OrderedDict()
        self._by_slot: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._prompts)

    def lookup(self, key: bytes) -> CachedPrompt | None:
        """The prompt's pages, marked most recently used; None when the prompt is not cached."""
        found = self._prompts.get(key)
        if found is not None:
            self._prompts.move_to_end(key)
        return found

    def remember(self, key: bytes, pages: Sequence[int], tokens: int, slot: int) -> None:
        """Records that live `slot` holds the prompt `key` in `pages` (a prompt cached already is kept as is)."""
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return
        self._prompts[key] = CachedPrompt(tuple(int(p) for p in pages), tokens, slot)
        self._by_slot[slot] = key

    def pages_kept_at_release(self, slot: int) -> tuple[int, ...]:
        """The pages of `slot` that stay cached when it finishes (its prompt's); the cache owns them from now."""
        key = self._by_slot.pop(slot, None)
        if key is None:
            return ()
        prompt = self._prompts[key]
        prompt.slot = None
        return prompt.pages

    def moved(self, source: int, target: int) -> None:
        """Follows a slot moved by compaction (its pages did not move)."""
        key = self._by_slot.pop(source, None)
        if key is not None:
            self._by_slot[target] = key
            self._prompts[key].slot = target

    def evict(self, keep: Collection[bytes] = ()) -> tuple[int, ...]:
        """Forgets the least recently used prompt that no live slot holds (none of `keep`); returns its pages to
        free, () when there is none."""
        for key, prompt in self._prompts.items():
            if prompt.slot is None and key not in keep:
                del self._prompts[key]
                return prompt.pages
        return ()

    def cached_pages(self, keys: Collection[bytes] | None = None) -> int:
        """Pages held by the cache alone (no live slot), of every prompt or of `keys`: neither free nor promised."""
        prompts = self._prompts.values() if keys is None else [self._prompts[k] for k in keys if k in self._prompts]
        return sum(len(p.pages) for p in prompts if p.slot is None)
