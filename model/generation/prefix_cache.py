"""Prompt sharing: prompt tokens already in the KV cache are not prefilled again.

Dataset synthesis asks for n samples of each prompt, behind one long system prompt or the same few-shot
examples; evaluation sweeps run the same prompts under several sampling configurations. Without sharing, every
copy is prefilled again. Here the pages that hold prefilled prompts are remembered, each page keyed by a hash
of every token up to its end (a chain: page i's key hashes page i-1's key and page i's tokens), so a page is
found only by a prompt with the same tokens before it, as in vLLM's prefix caching. A new request looks up its
pages' keys in order:
- every page found (the same prompt, the last partly filled page included): the pages are copied into its own
  (one jitted page copy, no model work) and it starts decoding at the prompt's last token: the decode step
  recomputes that one token against the copied pages and samples the first generated token with the request's
  own seed, sampler and penalties;
- its first full pages found (a shared system prompt, different questions): those pages are copied and only
  the rest of the prompt is prefilled, attending to them (`steps.prefill`'s context: packed with other prompts,
  and each cached page read once per call however many prompts continue it);
- and past its last full page found, a cached page that continues the same prefix and starts with the same
  MIN_SHARED_TOKENS tokens or more (`match`): its first tokens, up to where the prompts part, are shared as well.
  Chat prompts behind a short system line share less than a page, and a long one rarely ends on a page boundary;
  the context then covers that page's common tokens only, each later prompt seeing its own count of them.
A round that admits several prompts with the same first tokens prefills one of them first, and the others
after it, against its pages (`admission.py`): a batch's first prompts otherwise all compute their system
prompt again, before any of it is cached.
Each slot owns its own copy (so no page is ever written by two sequences, and decode attention reads a page
for its one owner, `model.paged_attention`): what is shared is the compute, and a copy costs a memory copy,
~1/1000 of prefilling it here.

Where the pages live:
- while the slot that prefilled them decodes, in its own pages (positions below its prompt's length are never
  written again; positions past it are, in the last page, and a copy overwrites them before reading them);
- when that slot finishes, they stay out of the free list, owned by no slot (decode never reads them), until
  the pool needs a page: then the least recently used page goes back to the free list. A lookup marks the pages
  it walked most recent first page last, so a prompt's first pages outlive its later ones.
A cached page is never promised to anyone (`PageTable.can_admit` counts promises only), so evicting one never
breaks a promise; a slot that grows takes a free page first and evicts only when there is none.

Example:
    >>> cache = PrefixCache()
    >>> keys = page_keys([1, 2, 3, 4, 5], page_size=2)  # pages [1, 2], [3, 4], [5]
    >>> cache.remember(keys, pages=[7, 8, 9], slot=0)
    >>> cache.lookup(page_keys([1, 2, 3, 4, 6], page_size=2))  # the first two pages match
    [7, 8]
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Collection, Sequence

import numpy as np

# The fewest tokens of a partly shared page worth sharing: a context page and a second prefill stage cost more
# than prefilling a few tokens again.
MIN_SHARED_TOKENS = 8


def page_keys(prompt_ids: Sequence[int], page_size: int) -> list[bytes]:
    """One key per page of the prompt (the last one partly filled or not): a 128-bit hash of the tokens up to
    the page's end, chained so that equal keys mean equal prefixes (collisions negligible)."""
    ids = np.asarray(prompt_ids, np.int64)
    keys, previous = [], b""
    for start in range(0, len(ids), page_size):
        previous = hashlib.blake2b(previous + ids[start : start + page_size].tobytes(), digest_size=16).digest()
        keys.append(previous)
    return keys


def page_tokens(prompt_ids: Sequence[int], page_size: int) -> list[tuple[int, ...]]:
    """The prompt's tokens page by page (the last page partly filled or not), as `page_keys` hashes them."""
    ids = [int(t) for t in prompt_ids]
    return [tuple(ids[start : start + page_size]) for start in range(0, len(ids), page_size)]


@dataclasses.dataclass
class CachedPage:
    page: int
    slot: int | None  # the live slot whose page this is; None once it finished (then the cache owns the page)
    parent: bytes = b""  # the key of the page before it in its prompt (b"" for a first page)
    tokens: tuple[int, ...] = ()  # its prompt's tokens in it (known when remembered with them)


@dataclasses.dataclass(frozen=True)
class Match:
    """The cached pages that hold a prompt's first `tokens` tokens, in order, and their keys: full pages, then
    possibly one page whose first tokens only are the prompt's."""

    pages: tuple[int, ...] = ()
    keys: tuple[bytes, ...] = ()
    tokens: int = 0


class PrefixCache:
    """Page key -> the page holding those tokens' keys and values, least recently used first."""

    def __init__(self) -> None:
        self._pages: collections.OrderedDict[bytes, CachedPage] = collections.OrderedDict()
        self._by_slot: dict[int, list[bytes]] = collections.defaultdict(list)
        # (parent key, first m tokens) -> the keys of the cached pages that continue that parent with those
        # tokens, for every m from MIN_SHARED_TOKENS to the page's tokens: the longest common start of a prompt's
        # next page and a cached one is then a binary search over m, however many pages start alike (a
        # synthesis job caches thousands of prompts behind one short system prompt).
        self._continuations: dict[tuple[bytes, tuple[int, ...]], set[bytes]] = collections.defaultdict(set)

    def __len__(self) -> int:
        return len(self._pages)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of `keys` (possibly none), marked most recently used."""
        found = []
        for key in keys:
            entry = self._pages.get(key)
            if entry is None:
                break
            found.append(key)
        for key in reversed(found):  # the first page last: the most recent, evicted last
            self._pages.move_to_end(key)
        return [self._pages[key].page for key in found]

    def match(self, prompt_ids: Sequence[int], page_size: int, keys: Sequence[bytes] | None = None) -> Match:
        """The longest cached prefix of the prompt (marked most recently used): its full pages found by key, then
        the cached page continuing them that has the most first tokens in common with the prompt's next ones (at
        least MIN_SHARED_TOKENS). A partial match leaves the prompt's last token out: a prefill computes at least
        one token, whose logits give the first new token. A whole prompt found ends at its last page's key.
        `keys`: the prompt's `page_keys`, where the caller has them already."""
        keys = page_keys(prompt_ids, page_size) if keys is None else keys
        pages = self.lookup(keys)
        found = Match(tuple(pages), tuple(keys[: len(pages)]), min(len(pages) * page_size, len(prompt_ids)))
        if len(pages) == len(keys):
            return found
        start = found.tokens
        rest = tuple(int(t) for t in prompt_ids[start : min(start + page_size, len(prompt_ids) - 1)])
        parent = found.keys[-1] if found.keys else b""
        continuing = lambda m: self._continuations.get((parent, rest[:m]))  # noqa: E731
        if len(rest) < MIN_SHARED_TOKENS or not continuing(MIN_SHARED_TOKENS):
            return found
        common, beyond = MIN_SHARED_TOKENS, len(rest) + 1  # a page continues with `common` tokens, none `beyond`
        while beyond - common > 1:
            middle = (common + beyond) // 2
            common, beyond = (middle, beyond) if continuing(middle) else (common, middle)
        best = next(iter(continuing(common)))
        self._pages.move_to_end(best)
        for key in reversed(found.keys):
            self._pages.move_to_end(key)
        return Match(found.pages + (self._pages[best].page,), found.keys + (best,), start + common)

    def remember(
        self, keys: Sequence[bytes], pages: Sequence[int], slot: int, tokens: Sequence[Sequence[int]] = ()
    ) -> None:
        """Records that live `slot` holds the prompt pages `keys` in `pages`; a key already cached keeps its page
        (the slot's own copy of it is then an ordinary page, freed when the slot finishes). `tokens`, each page's
        tokens (`page_tokens`), let later prompts share part of a page (`match`)."""
        fresh = []
        for i, (key, page) in enumerate(zip(keys, pages)):
            if key not in self._pages:
                page_ids = tuple(tokens[i]) if i < len(tokens) else ()
                self._pages[key] = CachedPage(int(page), slot, keys[i - 1] if i else b"", page_ids)
                self._by_slot[slot].append(key)
                for index in self._continuation_index(self._pages[key]):
                    self._continuations[index].add(key)
                fresh.append(key)
        for key in reversed(fresh):
            self._pages.move_to_end(key)

    @staticmethod
    def _continuation_index(entry: CachedPage) -> list[tuple[bytes, tuple[int, ...]]]:
        return [(entry.parent, entry.tokens[:m]) for m in range(MIN_SHARED_TOKENS, len(entry.tokens) + 1)]

    def pages_kept_at_release(self, slot: int) -> set[int]:
        """The pages of `slot` that stay cached when it finishes; the cache owns them from now."""
        kept = set()
        for key in self._by_slot.pop(slot, ()):
            entry = self._pages[key]
            entry.slot = None
            kept.add(entry.page)
        return kept

    def moved(self, source: int, target: int) -> None:
        """Follows a slot moved by compaction (its pages did not move)."""
        keys = self._by_slot.pop(source, None)
        if keys:
            self._by_slot[target] = keys
            for key in keys:
                self._pages[key].slot = target

    def evict(self, keep: Collection[bytes] = ()) -> int | None:
        """Forgets the least recently used page that no live slot holds (none of `keep`); returns it to free,
        None when there is none."""
        for key, entry in self._pages.items():
            if entry.slot is None and key not in keep:
                del self._pages[key]
                for index in self._continuation_index(entry):
                    self._continuations[index].discard(key)
                    if not self._continuations[index]:
                        del self._continuations[index]
                return entry.page
        return None

    def cached_pages(self, keys: Collection[bytes] | None = None) -> int:
        """Pages held by the cache alone (no live slot), of every key or of `keys`: neither free nor promised."""
        entries = self._pages.values() if keys is None else [self._pages[k] for k in keys if k in self._pages]
        return sum(1 for entry in entries if entry.slot is None)
