"""The continuous-batching generation engine: one decode core for `generate()` and the batch workers.

A fixed number of slots share a preallocated, paged, grouped KV cache (`paged_cache.py`). Waiting requests are
admitted into free slots when the cache has room for their worst case, and prefilled packed side by side in
rows of PACK_TOKENS tokens (only real tokens, each prompt attending to itself), straight into their slots'
pages; then every jitted decode call advances all slots `steps_per_call` tokens, each slot's attention reading
only its own pages (`model/paged_attention.py`). A slot whose sequence stops (stop token, stop string, token
budget, end of cache) is refilled with the next waiting request before the next decode call. Which requests
take the free slots, and how each prompt gets into the cache (prefilled, or copied pages when prompts are
shared), is `admission.py`; a slot's new tokens become its Completion in `completions.py`.

Shapes are static and bucketed, so a long job compiles a handful of programs once:
  prefill: one per packed row length (powers of two, 32 .. PACK_TOKENS, longer only for longer prompts) and
           number of cached pages its prompts continue (none, or a power of two from MIN_CONTEXT_PAGES);
  decode:  one per rows bucket and sampler variant (and, where XLA's attention runs, number of cache chunks
           read).

Example:
    >>> engine = GenerationEngine(lm.backbone, lm.preprocessor.tokenizer, max_slots=8, max_length=256)
    >>> for completion in engine.generate_stream([Request("a", ids, max_new_tokens=32)]):
    ...     print(completion.text, completion.finish_reason)
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import paged_attention, parallel
from model.backbone import LlamaBackbone
from model.generation import (
    admission, compile_counter, completions, grammar, paged_cache, penalties, sampling, scoring, steps,
)
from model.generation.admission import ContextPrompt
from model.generation.paged_cache import PAGE_SIZE, PageTable, PagedKVCache
from model.generation.prefix_cache import PrefixCache, page_keys, page_tokens
from model.generation.requests import Completion, Request
from model.generation.scheduler import (
    MIN_CONTEXT_PAGES, MIN_PACK_BUCKET, Slot, SlotTable, auto_slots, bucket, plan_packs, rows_bucket, segment_bound,
    segments_for,
)
from model.kernels import cpu_matmul


@dataclasses.dataclass
class EngineStats:
    """What the engine did, for benchmarks and progress reports."""

    prompt_tokens: int = 0  # prefilled (computed by prefill calls)
    prompt_tokens_shared: int = 0  # copied from a cached copy of the same prompt instead (prefix_cache.py)
    prompt_tokens_received: int = 0  # of every request run: prefilled + shared + one per shared prompt (recomputed)
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_calls: int = 0
    programs_compiled: int = 0
    compile_seconds: float = 0.0
    shapes: set = dataclasses.field(default_factory=set)
    # Every device call in order, when a list is given (`batchgen.bench.timeline`); None keeps a long job's
    # stats constant in size.
    calls: list[DeviceCall] | None = None

    def add_call(self, kind: str, start: float, rows: int, tokens: int) -> None:
        """Counts a call of `kind` ("prefill", "copy" or "decode") that began at
        `start` (perf_counter) and ended now: its seconds go to prefill or decode, and to `calls` if kept."""
        seconds = time.perf_counter() - start
        if kind == "decode":
            self.decode_seconds += seconds
            self.decode_calls += 1
        else:
            self.prefill_seconds += seconds
        if self.calls is not None:
            self.calls.append(DeviceCall(kind, start, seconds, rows, tokens))


@dataclasses.dataclass(frozen=True)
class DeviceCall:
    """One jitted call of the engine: its kind, when it began (perf_counter), how long it took (its results
    back on the host), the rows it computed and the tokens it processed (prompt tokens, pages copied, or
    rows x steps for decode)."""

    kind: str
    start: float
    seconds: float
    rows: int
    tokens: int


def kernel_products(backbone: LlamaBackbone) -> bool:
    """Whether decode's products run as the CPU kernel, so that its weights are kept in the kernel's panels: a
    float32 model (int8 weights included) on one CPU device; a model split across devices keeps XLA's products."""
    return (
        jax.default_backend() == "cpu" and backbone.compute_dtype == "float32"
        and parallel.cache_sharding(backbone) is None and cpu_matmul.available()
    )


class GenerationEngine:
    """Generates many requests at once with continuous batching over a fixed set of slots.

    Args:
        backbone: the model; its current weights are read at the start of each `generate_stream` call.
        tokenizer: used to detokenize completions and to find stop strings; None gives token ids only.
        max_slots: sequences decoded together at most (B), or "auto": from `cache_tokens` (see `auto_slots`).
        max_length: cache length per slot (prompt + generated tokens), at most the model's context.
        steps_per_call: decode steps per jitted call; more amortises dispatch, fewer refills sooner.
        cache_tokens: positions the paged KV cache holds over all slots (default: room for every slot at full
            length, max_slots x max_length rounded up to whole pages per slot); smaller saves memory, and a
            request then waits for room when the cache cannot hold its prompt and whole token budget beside the
            sequences in flight.
        continuous: refill a slot as soon as its sequence ends; False runs static batches (a new batch starts
            only when every slot is free), kept to measure what continuous batching gains.
        prefix_caching: a prompt already in the cache (the n samples of one prompt, the same prompt under
            several sampling settings) is copied, not prefilled again (`prefix_cache.py`); False prefills every
            request, kept to measure what sharing gains.
    """

    # What the engine honours beyond plain sampling (the batch workers turn rows asking for more into error rows).
    supports_penalties = True  # repetition / presence / frequency penalties and logit_bias (penalties.py)
    supports_response_format = True  # structured output: a grammar's token mask per row (grammar.py)

    def __init__(
        self,
        backbone: LlamaBackbone,
        tokenizer: Any = None,
        *,
        max_slots: int | str = 32,
        max_length: int | None = None,
        steps_per_call: int = 8,
        cache_dtype: Any = None,
        cache_tokens: int | None = None,
        continuous: bool = True,
        prefix_caching: bool = True,
    ) -> None:
        config = backbone.config
        max_length = max_length or min(config.max_sequence_length, 2048)
        if max_length > config.max_sequence_length:
            raise ValueError(
                f"max_length {max_length} exceeds the model's context of {config.max_sequence_length} tokens"
            )
        if max_slots == "auto":
            if not cache_tokens:
                raise ValueError("max_slots='auto' picks the slots from the cache: give cache_tokens too")
            max_slots = auto_slots(cache_tokens)
        if not isinstance(max_slots, int) or max_slots < 1 or steps_per_call < 1:
            raise ValueError(f"max_slots (an int or 'auto') and steps_per_call must be >= 1, got {max_slots!r}, {steps_per_call}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.max_slots = max_slots
        self.max_length = max_length
        self.steps_per_call = steps_per_call
        self.continuous = continuous
        self.prefix_caching = prefix_caching
        # The default holds every slot at full length in whole pages: max_slots x max_length tokens would not
        # when max_length is not a multiple of the page (a slot's last page is partly empty), and the slots past
        # what fits would wait for others to finish.
        self.cache_tokens = cache_tokens or max_slots * paged_cache.pages_for(max_length, PAGE_SIZE) * PAGE_SIZE
        if self.cache_tokens < max_length:
            raise ValueError(f"cache_tokens {self.cache_tokens} cannot hold one sequence of max_length {max_length}")
        self.cache_pages = paged_cache.pages_for(self.cache_tokens, PAGE_SIZE)
        compute_dtype = jnp.dtype(backbone.compute_dtype)
        self.cache_dtype = jnp.dtype(cache_dtype or compute_dtype)
        self.stats = EngineStats()
        self._cache: PagedKVCache | None = None
        self._kernel_attention = False  # whether decode attention runs as the CPU kernel (set with the cache)
        self._weights_source: list[jax.Array] | None = None
        self._weights_cache: steps.Weights | None = None
        self.score_stats = scoring.ScoreStats()
        self.grammars = grammar.Grammars(tokenizer, config.vocabulary_size)

    # ---- public -----------------------------------------------------------------------------------------

    def generate_stream(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yields one Completion per request, in the order they finish.

        Requests are pulled lazily from `requests`, a few batches ahead, so an endless stream works.
        """
        weights = self._weights()
        compiles_before, compile_seconds_before = compile_counter.snapshot()
        try:
            yield from self._run(weights, iter(requests))
        finally:
            compiles, seconds = compile_counter.snapshot()
            self.stats.programs_compiled += compiles - compiles_before
            self.stats.compile_seconds += seconds - compile_seconds_before

    def prepare(self) -> None:
        """Builds what the first call would otherwise build: the weights in the steps' layout (for the demo
        model ~2-4 s: the decode weights go into the CPU kernel's panels) and the KV cache (~0.2-1.7 s to
        allocate). Optional: the benchmark calls it while loading, so that its warm-up pass times compiling alone."""
        self._weights()
        self._allocate_cache()

    def _weights(self) -> "steps.Weights":
        """The backbone's current weights as the steps take them, rebuilt only when the backbone's arrays change."""
        params = self.backbone.params()
        source = jax.tree.leaves(params)  # kept, so that an array freed by a new assignment cannot pass for it
        if self._weights_source is None or any(a is not b for a, b in zip(source, self._weights_source, strict=True)):
            self._weights_cache = None  # let the old copies go before making new ones
            if self.backbone.compute_dtype != str(params["token_embedding"].dtype) and "token_embedding_scale" not in params:
                params = jax.tree.map(lambda w: w.astype(self.backbone.compute_dtype), params)
            kernel = kernel_products(self.backbone)
            stacked = steps.prefill_weights(params, self.config, kernel=kernel)
            self._weights_cache = steps.Weights(stacked, steps.decode_weights(stacked, self.config, kernel=kernel))
            self._weights_source = source
        return self._weights_cache

    def score_stream(self, requests: Iterable[scoring.ScoreRequest]) -> Iterator[scoring.ScoreResult]:
        """Yields one ScoreResult per request, in request order: log-likelihoods packed like prefill, no decode,
        on the same weights (and dtype) as generation; sequences longer than `max_length` roll (`scoring.py`)."""
        weights = self._weights()
        compiles_before, compile_seconds_before = compile_counter.snapshot()
        try:
            yield from scoring.score_stream(
                weights.stacked, self.config, requests, self.max_length, stats=self.score_stats
            )
        finally:
            compiles, seconds = compile_counter.snapshot()
            self.stats.programs_compiled += compiles - compiles_before
            self.stats.compile_seconds += seconds - compile_seconds_before

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """All completions, in the order of `requests`."""
        by_id = {c.request_id: c for c in self.generate_stream(requests)}
        return [by_id[r.request_id] for r in requests]

    # ---- the loop ---------------------------------------------------------------------------------------

    def _allocate_cache(self) -> None:
        """Allocates the KV cache on first use; every call after keeps it."""
        if self._cache is None:
            # A tensor-parallel backbone gets a cache split along KV heads like its key / value weights.
            self._cache = jax.block_until_ready(PagedKVCache.allocate(
                self.config, self.cache_pages, PAGE_SIZE, self.cache_dtype, parallel.cache_sharding(self.backbone)
            ))
            config = self.config
            q = jax.ShapeDtypeStruct((1, 1, config.num_query_heads, config.head_dim), self.cache_dtype)
            self._kernel_attention = jax.default_backend() == "cpu" and paged_attention.takes_kernel(
                q, self._cache.k[0], self._cache.v[0], kernel=self._cache.sharding is None
            )

    def _run(self, weights: steps.Weights, requests: Iterator[Request]) -> Iterator[Completion]:
        self._allocate_cache()
        # Prompts are shared within one call (a worker's shard, a generate() batch): a later call's first pass
        # must not find the cache warm.
        prefix = PrefixCache() if self.prefix_caching else None
        pages = PageTable(self.cache_pages, PAGE_SIZE, self.max_slots, self.max_length, prefix)
        table = SlotTable.empty(self.max_slots, pages)
        waiting: collections.deque[Request] = collections.deque()
        pending = iter(requests)
        exhausted = False
        while True:
            # Keep a few batches of requests in hand, never the whole (possibly endless) stream.
            while not exhausted and len(waiting) < 4 * self.max_slots:
                request = next(pending, None)
                exhausted = request is None
                if request is not None:
                    waiting.append(request)
            free = table.free_slots() if self.continuous or not table.active.any() else []
            plan = admission.admit(waiting, free, table, prefix, PAGE_SIZE, self.max_length, self._problem)
            for request, reason in plan.rejected:
                yield self._error(request, reason)
            if plan.with_context:  # their cached first pages into their slots (before a slot may finish)
                self._copy_cached([], plan.with_context, table)
            if plan.admitted or plan.with_context:
                yield from self._prefill_admitted(weights.stacked, plan.admitted, plan.with_context, table)
            if plan.after_leaders:  # their first tokens are cached now: prefill the rest against them
                whole, with_context = admission.after_leaders(plan.after_leaders, prefix, PAGE_SIZE)
                if with_context:
                    self._copy_cached([], with_context, table)
                yield from self._prefill_admitted(weights.stacked, whole, with_context, table)
            if plan.shared:  # after the prefill: some copy a prompt this round's prefill wrote
                self._copy_cached(plan.shared, [], table)
                for slot, request, _ in plan.shared:
                    self._start_shared(slot, request, table)
            if plan.shared_later:  # their prompts are whole in the cache now
                self._copy_cached(plan.shared_later, [], table)
                for slot, request, _ in plan.shared_later:
                    self._start_shared(slot, request, table)
            if table.active.any():
                yield from self._decode_once(weights.per_layer, table)
            elif exhausted and not waiting:
                return

    def _problem(self, request: Request) -> str | None:
        return admission.problem(request, self.max_length, self.config.vocabulary_size, self.grammars)

    def _error(self, request: Request, reason: str) -> Completion:
        return completions.error(request, reason, self.tokenizer)

    def _prefill_admitted(
        self, params, admitted: list[tuple[int, Request]], with_context: list[ContextPrompt], table: "SlotTable"
    ):
        """Prefills the admitted prompts, whole or past their cached first pages, packed into few calls."""
        prompts = [ContextPrompt(slot, request, ()) for slot, request in admitted] + with_context
        rest = [len(p.request.prompt_ids) - p.cached_tokens for p in prompts]
        for pack in plan_packs(rest, self.max_slots, [p.cached for p in prompts]):
            yield from self._prefill_pack(params, [prompts[i] for i in pack], table)

    def _prefill_pack(self, params, pack: list[ContextPrompt], table: "SlotTable"):
        """One prefill call: the prompts of `pack` side by side in one row, each into its slot's pages; a prompt
        with cached first pages (copied into its slot already) from there on, attending to those pages."""
        firsts = [p.cached_tokens for p in pack]  # each prompt's first position computed here
        t = bucket(sum(len(p.request.prompt_ids) - f for p, f in zip(pack, firsts)), MIN_PACK_BUCKET)
        capacity = segments_for(t, self.max_slots)
        ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        segments = np.full((1, t), -1, np.int32)
        pages, offsets = np.full(t, self.cache_pages, np.int32), np.zeros(t, np.int32)
        last, seeds = np.zeros(capacity, np.int32), np.zeros(capacity, np.uint32)
        cursor = 0
        for j, (prompt, first) in enumerate(zip(pack, firsts)):
            prompt_ids = prompt.request.prompt_ids
            n = len(prompt_ids) - first
            span = slice(cursor, cursor + n)
            ids[0, span], positions[0, span], segments[0, span] = prompt_ids[first:], np.arange(first, first + n), j
            slot_pages, slot_offsets = table.pages.token_locations(prompt.slot, len(prompt_ids))
            pages[span], offsets[span] = slot_pages[first:], slot_offsets[first:]
            last[j], seeds[j] = cursor + n - 1, prompt.request.seed & 0xFFFFFFFF
            cursor += n
        context = self._context(pack, capacity)
        row_sampling = [p.request.sampling for p in pack]
        rows, variant = sampling.row_sampling_params(row_sampling + [row_sampling[0]] * (capacity - len(pack)))
        segment_length = segment_bound([len(p.request.prompt_ids) - f for p, f in zip(pack, firsts)], t)
        start = time.perf_counter()
        context_width = 0 if context is None else len(context.pages)
        self.stats.shapes.add(("prefill", t, capacity, variant, segment_length, context_width))
        k = completions.logprobs_width(p.request for p in pack)
        padded = [p.request for p in pack] + [pack[0].request] * (capacity - len(pack))
        row_penalties = penalties.build(
            [r.sampling for r in padded], [r.prompt_ids for r in padded], [()] * capacity, self.config.vocabulary_size
        )
        for prompt in pack:  # each constrained request's matcher starts here, so its first token is masked too
            if prompt.request.response_format is not None:
                table.entries[prompt.slot].grammar = self.grammars.matcher(prompt.request.response_format)
        token_mask = self.grammars.token_mask([table.entries[p.slot] for p in pack], capacity)
        self._cache, first, first_logprobs = steps.prefill(
            params, self._cache, ids, positions, segments, pages, offsets, last, rows, seeds, row_penalties,
            token_mask, context, config=self.config, variant=variant, logprobs_k=k, segment_length=segment_length,
        )
        first = np.asarray(first)
        first_logprobs = None if first_logprobs is None else [np.asarray(a)[:, None] for a in first_logprobs]
        self.stats.add_call("prefill", start, len(pack), t)
        for j, (prompt, cached) in enumerate(zip(pack, firsts)):
            n = len(prompt.request.prompt_ids)
            self.stats.prompt_tokens += n - cached
            self.stats.prompt_tokens_shared += cached
            self.stats.prompt_tokens_received += n
            entries = completions.token_entries(first_logprobs, j, 1, prompt.request)
            done = self._first_token(prompt.slot, prompt.request, int(first[j]), seeds[j], entries, table)
            if done is not None:
                yield done

    @staticmethod
    def _context(pack: list[ContextPrompt], capacity: int) -> "steps.Context | None":
        """The cached pages the prompts of a prefill call continue, each page once (the prompts behind one system
        prompt share its pages), to a power of two of pages from MIN_CONTEXT_PAGES so that few programs are
        compiled, and how many first positions of each page each prompt sees (its last cached page may be shared
        only in part); None when no prompt has any."""
        distinct = list(dict.fromkeys(page for prompt in pack for page in prompt.cached))
        if not distinct:
            return None
        width = bucket(len(distinct), MIN_CONTEXT_PAGES)
        index = {page: i for i, page in enumerate(distinct)}
        sees = np.zeros((capacity, width), np.int32)
        for j, prompt in enumerate(pack):
            for i, page in enumerate(prompt.cached):  # the last one may be shared only in part
                sees[j, index[page]] = min(PAGE_SIZE, prompt.cached_tokens - i * PAGE_SIZE)
        return steps.Context(np.array(distinct + [distinct[0]] * (width - len(distinct)), np.int32), sees)

    def _first_token(self, slot: int, request: Request, token: int, seed, logprobs, table: "SlotTable"):
        """Starts `slot`, its prompt prefilled and its first token sampled; the Completion if that ended it."""
        if table.pages.prefix is not None:  # before the slot may finish (then its prompt's pages stay cached)
            keys = page_keys(request.prompt_ids, PAGE_SIZE)
            tokens = page_tokens(request.prompt_ids, PAGE_SIZE)
            table.pages.prefix.remember(keys, table.pages.table[slot, : len(keys)], slot, tokens)
        state = table.occupy(slot, token, seed)
        done = self._take(state, [token], logprobs)
        if done is None and (table.counts[slot] >= table.budgets[slot] or table.lengths[slot] + 1 >= self.max_length):
            done = completions.finish(state, "length")
        if done is not None:
            table.release(slot)
        return done

    def _copy_cached(self, shared, with_context: list[ContextPrompt], table: "SlotTable") -> None:
        """Copies cached prompt pages into the slots that reuse them, in one call (see `prefix_cache.py`)."""
        pages = table.pages
        source, target = [], []
        for slot, _, keys in shared:  # the whole prompt, the last page included
            found = pages.prefix.lookup(keys)
            assert len(found) == len(keys), "a shared prompt's pages were evicted before their copy"
            source.extend(found)
            target.extend(pages.table[slot, : len(found)])
        for prompt in with_context:  # its first pages
            source.extend(prompt.cached)
            target.extend(pages.table[prompt.slot, : prompt.context_pages])
        m = bucket(len(source), 8)  # few programs: one per power of two of pages copied
        padded = lambda pages_, fill: np.array(list(pages_) + [fill] * (m - len(pages_)), np.int32)  # noqa: E731
        start = time.perf_counter()
        copied = steps.copy_pages(self._cache, padded(source, 0), padded(target, self.cache_pages))
        self._cache = jax.block_until_ready(copied)  # timed to the end, as the other calls are
        self.stats.add_call("copy", start, len(shared) + len(with_context), m)

    def _start_shared(self, slot: int, request: Request, table: "SlotTable") -> None:
        """Starts a slot whose whole prompt was copied at its prompt's last token: the next decode call
        recomputes that token and samples the first generated one (see `prefix_cache.py`)."""
        n = len(request.prompt_ids)
        self.stats.prompt_tokens_shared += n - 1
        self.stats.prompt_tokens_received += n
        table.occupy_at_last_prompt_token(slot, request.seed & 0xFFFFFFFF)

    def _decode_once(self, params, table: "SlotTable"):
        table.compact()
        b = rows_bucket(table.occupied(), self.max_slots)  # slots b.. are free: the call computes rows 0..b-1
        pages = table.pages
        for slot in np.flatnonzero(table.active):  # pages for every position these steps may write
            pages.grow(int(slot), int(table.lengths[slot]) + self.steps_per_call)
        chunks = self._chunks_to_read(pages.extent())
        width = pages.width(b)  # page-table columns: the most pages a slot of the call holds
        window = sum(paged_cache.chunk_sizes(self.cache_pages)[:chunks])  # the pages of those chunks
        rows, variant = sampling.row_sampling_params(table.sampling_rows()[:b])
        # A slot with a grammar needs a mask per token, which the host computes from the token before: such calls
        # run one step (a program of their own); calls without one keep steps_per_call and their programs.
        token_mask = self.grammars.token_mask([e if table.active[i] else None for i, e in enumerate(table.entries[:b])], b)
        steps_per_call = self.steps_per_call if token_mask is None else 1
        start = time.perf_counter()
        self.stats.shapes.add(("decode", b, chunks, width, variant) + (() if token_mask is None else ("grammar",)))
        k = completions.logprobs_width(entry.request for entry in table.entries[:b] if entry is not None)
        entries = [entry if entry is not None else next(e for e in table.entries if e is not None) for entry in table.entries[:b]]
        slot_penalties = penalties.build(
            [e.request.sampling for e in entries], [e.request.prompt_ids for e in entries],
            [e.generated for e in entries], self.config.vocabulary_size,
        )
        self._cache, tokens, lengths, counts, active, emitted, token_logprobs = steps.decode(
            params, self._cache, pages.table[:b, :width], pages.owner[:window], pages.start[:window], table.tokens[:b],
            table.lengths[:b], table.counts[:b], table.active[:b], table.budgets[:b], table.stop_id_table()[:b], rows,
            table.seeds[:b], slot_penalties, token_mask, config=self.config, variant=variant, steps=steps_per_call, chunks=chunks,
            max_length=self.max_length, logprobs_k=k,
        )
        emitted = np.asarray(emitted)
        token_logprobs = None if token_logprobs is None else [np.asarray(a) for a in token_logprobs]
        self.stats.add_call("decode", start, b, b * steps_per_call)
        was_active = np.flatnonzero(table.active)
        table.tokens[:b], table.lengths[:b], table.counts[:b], table.active[:b] = tokens, lengths, counts, active
        for i in was_active:
            state = table.entries[i]
            new = [int(t) for t in emitted[i] if t >= 0]
            done = self._take(state, new, completions.token_entries(token_logprobs, i, len(new), state.request))
            if done is None and not table.active[i]:
                done = completions.finish(state, "length")
            if done is not None:
                table.release(i)
                yield done

    def _chunks_to_read(self, extent: int) -> int:
        """The cache chunks a decode call passes to attention when every page in use is below `extent`: those
        below it where XLA's attention runs (it reads every page of the chunks it is given), all of them where the
        CPU kernel runs (it reads each slot's own pages, wherever they lie): there a rows bucket is one program
        however far the pages in use spread (the variable workload compiled three 64-row decode programs, ~1.5 s
        each, as its slots' pages spread over the pool)."""
        if self._kernel_attention:
            return len(paged_cache.chunk_sizes(self.cache_pages))
        return paged_cache.chunks_to_read(extent, self.cache_pages)

    def _take(self, state: Slot, new: list[int], logprobs: list | None = None) -> Completion | None:
        """Adds a slot's new tokens (`completions.take`) and counts them; its Completion if one ended it."""
        done = completions.take(state, new, self.tokenizer, self.grammars.end_token_ids, logprobs)
        if done is None or done.finish_reason != "error":  # a token the grammar rejected is not counted
            self.stats.completion_tokens += len(new)
        return done
