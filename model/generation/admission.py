"""Admission: which waiting requests take the free slots this round, and how each one's prompt gets into its
slot's pages (the scheduling half of prompt sharing; `engine.py` runs the calls).

Requests are admitted in order while a free slot and room in the cache remain (`SlotTable.reserve`); a request
that cannot be run (`problem`) is rejected alone, and the rest go on. With prompt sharing (`prefix_cache.py`)
each admitted prompt takes one of four ways:
  prefilled whole     no page of it is cached (or, in a small cache, keeping its cached pages leaves no room);
  shared              all its pages are cached, or an earlier request of this round prefills the same prompt:
                      they are copied, and the first decode call recomputes its last token;
  with context        its first pages are cached: they are copied and only the rest is prefilled, packed with
                      the prompts prefilled whole, attending to the cached pages (`steps.prefill`'s context);
  shared later        the same prompt as a with-context one of this round: copied once that one is prefilled.
Constrained requests (a response_format) are always prefilled whole: their first token needs its mask.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from model.generation.prefix_cache import PrefixCache, page_keys
from model.generation.requests import Request
from model.generation.scheduler import SlotTable


@dataclasses.dataclass(frozen=True)
class ContextPrompt:
    """A request to prefill into its slot after the cached pages its prompt starts with (none: prefilled whole).
    Those pages are copied into the slot's first pages, and the rest of the prompt is prefilled attending to
    them (`steps.prefill`'s context)."""

    slot: int
    request: Request
    cached: tuple[int, ...]  # the pages found in the cache, the prompt's first len(cached) pages

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
    while free and waiting:
        request = waiting[0]
        error = problem(request)
        # Constrained rows (response_format) are prefilled whole: their first token needs its mask.
        keys = None
        if prefix is not None and not error and request.response_format is None:
            keys = page_keys(request.prompt_ids, page_size)
        found = prefix.lookup(keys) if keys else []
        whole = keys is not None and (len(found) == len(keys) or keys[-1] in leaders)
        later = keys is not None and not whole and keys[-1] in completing
        new_pins = set(keys[: len(found)]) - pinned if keys else set()
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
            elif found:
                round.with_context.append(ContextPrompt(slot, request, tuple(found)))
                completing.add(keys[-1])
            else:
                round.admitted.append((slot, request))
                leaders.update(keys[-1:] if keys else ())
        elif new_pins and table.reserve(free[0], request, max_length, keep=pinned - new_pins):
            # Keeping the cached pages would leave this request no room (a small cache): prefill it whole
            # instead, and let those pages be reused.
            pinned -= new_pins
            round.admitted.append((free.pop(0), waiting.popleft()))
            leaders.update(keys[-1:])
        else:  # the cache is full: the next request waits (in order) for a sequence to finish
            break
    return round


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
