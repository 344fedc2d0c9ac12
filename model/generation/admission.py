"""Admission: which waiting requests take the free slots this round, and how each one's prompt gets into its
slot's pages (the scheduling half of prompt sharing; `engine.py` runs the calls).

Requests are admitted in order while a free slot and room in the cache remain (`SlotTable.reserve`); a request
that cannot be run (`problem`) is rejected alone, and the rest go on. With prompt sharing (`prefix_cache.py`)
each admitted prompt takes one of five ways:
  prefilled whole     no page of it is cached (or, in a small cache, keeping its cached pages leaves no room);
  shared              all its pages are cached, or an earlier request of this round prefills the same prompt:
                      they are copied, and the first decode call recomputes its last token;
  with context        its first tokens are cached (`PrefixCache.match`): their pages are copied and only the
                      rest is prefilled, packed with the prompts prefilled whole, attending to the cached pages
                      (`steps.prefill`'s context);
  shared later        the same prompt as a with-context one of this round: copied once that one is prefilled;
  after leaders       its first tokens (MIN_SHARED_TOKENS more than the cache holds) are those of a prompt this
                      round prefills: it is prefilled in a second call, with context, once that one is cached.
                      Without this a batch's first round computes its common system prompt once per prompt.
Constrained requests (a response_format) are always prefilled whole: their first token needs its mask.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import numpy as np

from model.generation.prefix_cache import MIN_SHARED_TOKENS, Match, PrefixCache, page_keys
from model.generation.requests import Request
from model.generation.scheduler import SlotTable


@dataclasses.dataclass(frozen=True)
class ContextPrompt:
    """A request to prefill into its slot after the cached pages its prompt starts with (none: prefilled whole).
    Those pages are copied into the slot's first pages, and the rest of the prompt is prefilled attending to
    them (`steps.prefill`'s context)."""

    slot: int
    request: Request
    cached: tuple[int, ...] = ()  # the pages found in the cache, the prompt's first len(cached) pages
    cached_tokens: int = 0  # the prompt's tokens they hold (the last page may hold only its first ones)

    @classmethod
    def of(cls, slot: int, request: Request, found: Match) -> "ContextPrompt":
        return cls(slot, request, found.pages, found.tokens)

    @property
    def context_pages(self) -> int:
        return len(self.cached)


@dataclasses.dataclass
class Admission:
    """One round's admitted requests, by the way their prompts get into the cache, and the rejected ones."""

    admitted: list[tuple[int, Request]] = dataclasses.field(default_factory=list)  # (slot, request) to prefill whole
    shared: list[tuple[int, Request, list[bytes]]] = dataclasses.field(default_factory=list)  # (.., its page keys)
    with_context: list[ContextPrompt] = dataclasses.field(default_factory=list)
    shared_later: list[tuple[int, Request, list[bytes]]] = dataclasses.field(default_factory=list)
    after_leaders: list[tuple[int, Request]] = dataclasses.field(default_factory=list)  # (slot, request)
    rejected: list[tuple[Request, str]] = dataclasses.field(default_factory=list)  # (request, why), in order


def admit(
    waiting: collections.deque[Request],
    free: list[int],
    table: SlotTable,
    prefix: PrefixCache | None,
    page_size: int,
    max_length: int,
    problem: Any,
) -> Admission:
    """Takes requests off the front of `waiting` into the `free` slots (both consumed) while the cache has room;
    `problem(request)` says why a request cannot run (None: it can)."""
    round = Admission()
    leaders: set[bytes] = set()  # prompts (their last page's key) prefilled by this round's calls
    completing: set[bytes] = set()  # prompts whose rest this round prefills after their cached pages
    pinned: set[bytes] = set()  # cached pages this round copies: no admission may evict them
    prefilled = _RoundPrompts()  # the prompts this round's first prefill writes, by their first tokens
    while free and waiting:
        request = waiting[0]
        error = problem(request)
        # Constrained rows (response_format) are prefilled whole: their first token needs its mask.
        keys = None
        if prefix is not None and not error and request.response_format is None:
            keys = page_keys(request.prompt_ids, page_size)
        found = prefix.match(request.prompt_ids, page_size, keys) if keys else Match()
        whole = keys is not None and (found.tokens == len(request.prompt_ids) or keys[-1] in leaders)
        later = keys is not None and not whole and keys[-1] in completing
        after = keys is not None and not whole and not later and (
            prefilled.longest_common(request.prompt_ids) >= found.tokens + MIN_SHARED_TOKENS)
        new_pins = set(found.keys) - pinned
        pinned |= new_pins
        if error:  # rejected alone; the rest of the batch goes on
            round.rejected.append((waiting.popleft(), error))
        elif table.reserve(free[0], request, max_length, keep=pinned):
            slot = free.pop(0)
            waiting.popleft()
            if whole:
                round.shared.append((slot, request, keys))
            elif later:
                round.shared_later.append((slot, request, keys))
            elif after:  # its pins stay: harmless, and the second stage may still use those pages
                round.after_leaders.append((slot, request))
            elif found.pages:
                round.with_context.append(ContextPrompt.of(slot, request, found))
                completing.add(keys[-1])
                prefilled.add(request.prompt_ids)
            else:
                round.admitted.append((slot, request))
                leaders.update(keys[-1:] if keys else ())
                if keys:
                    prefilled.add(request.prompt_ids)
        elif new_pins and table.reserve(free[0], request, max_length, keep=pinned - new_pins):
            # Keeping the cached pages would leave this request no room (a small cache): prefill it whole
            # instead, and let those pages be reused.
            pinned -= new_pins
            round.admitted.append((free.pop(0), waiting.popleft()))
            leaders.update(keys[-1:])
            prefilled.add(request.prompt_ids)
        else:  # the cache is full: the next request waits (in order) for a sequence to finish
            break
    return round


def after_leaders(
    waiting: list[tuple[int, Request]], prefix: PrefixCache, page_size: int
) -> tuple[list[tuple[int, Request]], list[ContextPrompt]]:
    """The second stage of a round: its `after_leaders` requests, now that the prompts they start like are
    prefilled and cached, as (prefilled whole, with context). Whole only where the cache no longer has their
    first tokens (a page of a leader that finished at once was evicted): never wrong, only slower."""
    whole, with_context = [], []
    for slot, request in waiting:
        found = prefix.match(request.prompt_ids, page_size)
        if found.pages:
            with_context.append(ContextPrompt.of(slot, request, found))
        else:
            whole.append((slot, request))
    return whole, with_context


class _RoundPrompts:
    """The prompts a round prefills first, indexed by their first MIN_SHARED_TOKENS tokens: a later request of
    the round with the same first tokens may wait for one of them and share what they have in common."""

    def __init__(self) -> None:
        self._by_start: dict[tuple[int, ...], list[Any]] = collections.defaultdict(list)

    def add(self, prompt_ids: Any) -> None:
        if len(prompt_ids) > MIN_SHARED_TOKENS:
            self._by_start[tuple(int(t) for t in prompt_ids[:MIN_SHARED_TOKENS])].append(prompt_ids)

    def longest_common(self, prompt_ids: Any) -> int:
        """The most first tokens the prompt has in common with one of them, its last token left out (a prefill
        computes at least one token)."""
        start = tuple(int(t) for t in prompt_ids[:MIN_SHARED_TOKENS])
        if len(start) < MIN_SHARED_TOKENS:
            return 0
        best = max((_common_prefix(other, prompt_ids) for other in self._by_start.get(start, ())), default=0)
        return min(best, len(prompt_ids) - 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


def problem(request: Request, max_length: int, vocabulary_size: int, grammars: Any) -> str | None:
    """Why the engine cannot run `request` (an empty or too long prompt, a token outside the vocabulary, a
    response format that does not compile), or None."""
    n = len(request.prompt_ids)
    if n == 0:
        return "the prompt has no tokens"
    if n + 1 > max_length:
        return f"the prompt has {n} tokens, which leaves no room for a new token in a context of {max_length} tokens"
    if request.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
    bad = [t for t in request.prompt_ids if not 0 <= int(t) < vocabulary_size]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary of {vocabulary_size}"
    if request.response_format is not None:
        reason = grammars.problem(request.response_format)
        if reason:
            return f"response_format {request.response_format:.200} {reason}"
    return None
