"""Scheduling for the generation engine: which request runs in which slot, and how prompts are packed.

Host-side only (numpy and Python): the slot table handed to the jitted steps as [B] arrays, admission of a waiting
request against the KV cache's page budget, packing of admitted prompts into prefill rows, and the buckets that
keep the jitted steps' shapes to a small set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Sequence

import numpy as np

from model.generation.detokenizer import IncrementalDetokenizer
from model.generation.paged_cache import PAGE_SIZE, PageTable, pages_for
from model.generation.requests import Request, SamplingParams

# A prefill call packs whole prompts into one row of up to this many tokens (a longer prompt gets a row of its
# own length bucket): at the demo model's size a row this long runs the weight products near the machine's
# matmul rate, and packing wastes only the tail of the last row instead of padding every prompt to a bucket.
PACK_TOKENS = 512
MIN_PACK_BUCKET = 32
# Distinct cached pages a prefill call's prompts may continue, in all (`plan_packs`): each of the call's tokens
# scores them all, masked but for its own prompt's. Prompts behind one system prompt share its page or two.
CONTEXT_PAGES = 32
# A call's context is read as a power of two of pages from this many, so that a row length has few programs. From
# 4, the variable workload compiled two more prefill programs (~0.7 s each, with their context reads) for calls of
# chat prompts behind system prompts of 1-2 pages; from 16, the main workload's prefill took ~5% longer than from
# 4 or 8 (every call scores every context page it is given; in one process, passes alternated, 3 rounds).
MIN_CONTEXT_PAGES = 8
# A full row of prompts no longer than this (chat prompts: a system line and a question) attends in bands.
BAND_TOKENS = 64
STOP_ID_BUCKET = 4  # stop-id table width grows in steps of this, so a few stop ids never force a recompile
# 'auto' slots: one per two pages of cache (a sequence of up to 64 positions), at most this many. Slots are cheap:
# admission still waits for room in the cache, and a decode call computes only the rows of occupied slots.
AUTO_MAX_SLOTS = 256


def auto_slots(cache_tokens: int) -> int:
    """The slots an engine with `cache_tokens` positions of KV cache runs when asked for max_slots='auto'."""
    return max(1, min(AUTO_MAX_SLOTS, pages_for(cache_tokens, PAGE_SIZE) // 2))


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= n (at least `minimum`)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def segments_for(tokens: int, max_slots: int) -> int:
    """How many prompts a prefill call of `tokens` tokens holds at most: the rows it samples a first token for.

    Each costs an LM-head row whether a prompt fills it or not (at the demo model's size ~1/4 of a token's
    layers). One per 16 tokens keeps the head under 2% of a full call, and holds the prompts that continue a
    shared system prompt (`admission.py`), whose own tokens are a question of ~12: with one per 32, calls of them
    stopped at a quarter full.
    """
    return min(max_slots, max(8, tokens // 16))


def segment_bound(lengths: Sequence[int], row_tokens: int) -> int | None:
    """BAND_TOKENS when a full packed row (PACK_TOKENS or more) holds only sequences that short, else None:
    the static bound on a row's segments that lets attention skip keys further back than any segment reaches
    (`transformer._banded_self_attention`), 2.2x less attention time on a row of chat prompts.

    One bound, and only for full rows, where attention costs most: each bound is a program per row length, and a
    job of mixed lengths would otherwise compile several more prefill programs.
    """
    return BAND_TOKENS if row_tokens >= PACK_TOKENS and max(lengths) <= BAND_TOKENS else None


def plan_packs(
    lengths: Sequence[int], max_slots: int, contexts: Sequence[Collection[int]] | None = None
) -> list[list[int]]:
    """Groups prompts (by index) into prefill calls: first-fit decreasing into rows of PACK_TOKENS tokens.

    A prompt longer than PACK_TOKENS opens a row of its own power-of-two length, which shorter prompts may
    share. A call's row is then padded to the power of two above what it holds, so the padding is at most the
    tail of each call, not the gap between every prompt and its length bucket.
    `contexts`: the cached pages each prompt continues (prompt sharing; `lengths` are then the tokens after
    them). Every token of a call scores every distinct page of its call's context, so a call takes at most
    CONTEXT_PAGES of them (a prompt whose own context is longer gets a call of its own).
    """
    contexts = contexts or [()] * len(lengths)
    packs: list[tuple[int, list[int]]] = []  # (capacity, members)
    used: list[int] = []
    pages: list[set[int]] = []  # each call's distinct context pages
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for j, (capacity, members) in enumerate(packs):
            grown = used[j] + n
            if (
                grown <= capacity
                and len(members) < segments_for(bucket(grown, MIN_PACK_BUCKET), max_slots)
                and len(pages[j].union(contexts[i])) <= CONTEXT_PAGES
            ):
                members.append(i)
                used[j] = grown
                pages[j].update(contexts[i])
                break
        else:
            packs.append((max(PACK_TOKENS, bucket(n, MIN_PACK_BUCKET)), [i]))
            used.append(n)
            pages.append(set(contexts[i]))
    return [members for _, members in packs]


def rows_bucket(occupied: int, max_slots: int) -> int:
    """Rows a decode call computes for `occupied` slots (packed at the low end), capped at max_slots: 8, 16, then
    each power of two and the midpoint above it (24, 32, 48, 64, 96, 128, 192, 256, ...).

    Every row costs a row of every weight product, busy or idle, so a call computes only as many rows as the slots
    in use need. The midpoints halve the idle rows a batch's tail pays for (short prompts at 64 slots: the calls
    at 35-48 busy rows ran at 64) for about twice the programs of powers of two alone, still a handful.
    """
    size = 8
    while size < occupied:
        size = size * 3 // 2 if size >= 16 and size & (size - 1) == 0 else 1 << size.bit_length()
    return min(size, max_slots)


@dataclasses.dataclass
class Slot:
    request: Request
    prompt_tokens: int
    stop_token_ids: frozenset[int]
    generated: list[int]
    detokenizer: IncrementalDetokenizer | None = None  # the completion's text; made by the first `_append`
    logprobs: list = dataclasses.field(default_factory=list)  # per kept token, when the request asks for them
    grammar: Any = None  # the response format's matcher (model.generation.grammar), None when unconstrained


@dataclasses.dataclass
class SlotTable:
    """Host-side state of every slot: numpy arrays [B] handed to the decode step, the request in each slot, and
    the pages of the KV cache each slot owns."""

    entries: list[Slot | None]
    pages: PageTable
    tokens: np.ndarray  # last token, not yet in the cache
    lengths: np.ndarray  # tokens in the cache
    counts: np.ndarray  # tokens generated
    active: np.ndarray
    budgets: np.ndarray  # max new tokens
    seeds: np.ndarray

    @classmethod
    def empty(cls, slots: int, pages: PageTable) -> "SlotTable":
        zeros = lambda dtype: np.zeros(slots, dtype)  # noqa: E731
        return cls([None] * slots, pages, zeros(np.int32), zeros(np.int32), zeros(np.int32), zeros(bool),
                   zeros(np.int32), zeros(np.uint32))

    def free_slots(self) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if entry is None]

    def reserve(self, slot: int, request: Request, max_length: int, keep: Collection[bytes] = ()) -> bool:
        """Claims `slot` and room in the cache for the request's worst case; False when the cache is full.
        `keep`: cached prompts about to be copied into slots (not evicted to make room)."""
        n = len(request.prompt_ids)
        most = min(n + request.max_new_tokens, max_length)
        if not self.pages.can_admit(most, keep):
            return False
        self.pages.admit(slot, n, most, keep)
        self.entries[slot] = Slot(request, n, frozenset(request.stop_token_ids), [])
        return True

    def occupy(self, slot: int, first_token: int, seed: int) -> Slot:
        """Starts decoding reserved `slot` after its prompt was prefilled and sampled `first_token`."""
        state = self.entries[slot]
        self.tokens[slot], self.lengths[slot], self.counts[slot] = first_token, state.prompt_tokens, 1
        self.budgets[slot], self.seeds[slot], self.active[slot] = state.request.max_new_tokens, seed, True
        return state

    def occupy_at_last_prompt_token(self, slot: int, seed: int) -> Slot:
        """Starts reserved `slot`, whose prompt's keys and values were copied into its pages, at its prompt's last
        token: the next decode step recomputes that token and samples the first generated one from it, as prefill
        would (the same key: a row's key is its seed and the tokens generated so far, 0)."""
        state = self.entries[slot]
        prompt = state.request.prompt_ids
        self.tokens[slot], self.lengths[slot], self.counts[slot] = int(prompt[-1]), len(prompt) - 1, 0
        self.budgets[slot], self.seeds[slot], self.active[slot] = state.request.max_new_tokens, seed, True
        return state

    def release(self, slot: int) -> None:
        self.entries[slot] = None
        self.active[slot] = False
        self.pages.release(slot)

    def occupied(self) -> int:
        return sum(entry is not None for entry in self.entries)

    def compact(self) -> None:
        """Moves occupied slots down into free ones, so that slots 0..n-1 are the n occupied ones.

        A decode call then computes only the first `rows_bucket(n)` rows. Moving a slot moves host state only
        (its arrays' entries and its row of the page table): its keys and values stay in the pages they are in.
        A row's tokens do not depend on the slot it runs in (its seed and its own pages decide them).
        """
        free = [i for i, entry in enumerate(self.entries) if entry is None]
        busy = [i for i, entry in enumerate(self.entries) if entry is not None]
        while free and busy and free[0] < busy[-1]:
            source, target = busy.pop(), free.pop(0)
            self.entries[target], self.entries[source] = self.entries[source], None
            for array in (self.tokens, self.lengths, self.counts, self.active, self.budgets, self.seeds):
                array[target] = array[source]
            self.active[source] = False
            self.pages.move(source, target)

    def sampling_rows(self) -> list[SamplingParams]:
        """Each slot's sampling parameters; free slots borrow an occupied one's so the variant is unchanged."""
        occupied = next(e.request.sampling for e in self.entries if e is not None)
        return [e.request.sampling if e is not None else occupied for e in self.entries]

    def stop_id_table(self) -> np.ndarray:
        """[B, N] stop ids, -1 padded; N grows in steps of STOP_ID_BUCKET to bound the programs."""
        width = max([len(e.stop_token_ids) for e in self.entries if e is not None] + [1])
        table = np.full((len(self.entries), -(-width // STOP_ID_BUCKET) * STOP_ID_BUCKET), -1, np.int32)
        for i, entry in enumerate(self.entries):
            if entry is not None:
                table[i, : len(entry.stop_token_ids)] = sorted(entry.stop_token_ids)
        return table


