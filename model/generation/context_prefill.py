"""The host side of prefilling prompts whose first pages are cached: one `steps.prefill_with_context` call.

A prompt that starts with pages already in the cache (a shared system prompt, the same few-shot examples; see
`prefix_cache.py`) has those pages copied into its slot's first pages, and only its rest is prefilled: one row
per prompt, attending to its slot's context pages and to itself. Shapes are bucketed so that a long job
compiles few programs: rows to a power of two from 4, the rest of the prompt to a power of two from 32, the
context to a power of two of pages from 4.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from model.generation.paged_cache import PageTable
from model.generation.requests import Request
from model.generation.scheduler import bucket

MAX_ROWS = 16  # prompts per call: the dense context of a call is rows x context pages of every layer


@dataclasses.dataclass(frozen=True)
class ContextPrompt:
    slot: int
    request: Request
    context_pages: int  # the prompt's first pages, copied from the cache into the slot's


@dataclasses.dataclass
class ContextCall:
    """The arrays of one call (host numpy), for `steps.prefill_with_context`."""

    token_ids: np.ndarray  # [B, T]
    positions: np.ndarray  # [B, T]
    token_mask: np.ndarray  # [B, T]
    context_pages: np.ndarray  # [B, C]
    context_lengths: np.ndarray  # [B]
    pages: np.ndarray  # [B * T]
    offsets: np.ndarray  # [B * T]
    last: np.ndarray  # [B]
    seeds: np.ndarray  # [B]
    padded: list[Request]  # [B] each row's request (padding rows repeat the first)


def build_call(prompts: Sequence[ContextPrompt], table: PageTable) -> ContextCall:
    """The arrays for prefilling `prompts` (at most MAX_ROWS) past their cached pages into their slots' pages."""
    p = table.page_size
    rest = [len(c.request.prompt_ids) - c.context_pages * p for c in prompts]
    assert all(n >= 1 for n in rest) and len(prompts) <= MAX_ROWS
    b = bucket(len(prompts), 4)
    t = bucket(max(rest), 32)
    c = min(bucket(max(x.context_pages for x in prompts), 4), table.pages_per_slot)
    call = ContextCall(
        token_ids=np.zeros((b, t), np.int32), positions=np.zeros((b, t), np.int32), token_mask=np.zeros((b, t), bool),
        context_pages=np.zeros((b, c), np.int32), context_lengths=np.zeros(b, np.int32),
        pages=np.full((b, t), table.pages, np.int32), offsets=np.zeros((b, t), np.int32), last=np.zeros(b, np.int32),
        seeds=np.zeros(b, np.uint32), padded=[x.request for x in prompts] + [prompts[0].request] * (b - len(prompts)),
    )
    for row, (prompt, n) in enumerate(zip(prompts, rest)):
        first = prompt.context_pages * p
        ids = prompt.request.prompt_ids
        call.token_ids[row, :n] = ids[first:]
        call.positions[row, :n] = np.arange(first, first + n)
        call.token_mask[row, :n] = True
        held = table.table[prompt.slot, : prompt.context_pages]
        call.context_pages[row] = held[0]  # past the context: any page in range (masked by the context length)
        call.context_pages[row, : prompt.context_pages] = held
        call.context_lengths[row] = first
        pages, offsets = table.token_locations(prompt.slot, len(ids))
        call.pages[row, :n], call.offsets[row, :n] = pages[first:], offsets[first:]
        call.last[row] = n - 1
        call.seeds[row] = prompt.request.seed & 0xFFFFFFFF
    call.pages, call.offsets = call.pages.reshape(-1), call.offsets.reshape(-1)
    return call
