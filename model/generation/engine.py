"""The continuous-batching generation engine: one decode core for `generate()` and the batch workers.

A fixed number of slots share a preallocated, paged, grouped KV cache (`paged_cache.py`). Waiting requests are
admitted into free slots when the cache has room for their worst case, and prefilled packed side by side in
rows of PACK_TOKENS tokens (only real tokens, each prompt attending to itself), straight into their slots'
pages; then every jitted decode call advances all slots `steps_per_call` tokens, each slot's attention reading
only its own pages (`model/paged_attention.py`). A slot whose sequence stops (stop token, stop string, token
budget, end of cache) is refilled with the next waiting request before the next decode call.

Shapes are static and bucketed, so a long job compiles a handful of programs once:
  prefill: one per packed row length (powers of two, 32 .. PACK_TOKENS, longer only for longer prompts);
  decode:  one per window of pages read (quarter-octave steps) and sampler variant.

Example:
    >>> engine = GenerationEngine(lm.backbone, lm.preprocessor.tokenizer, max_slots=8, max_length=256)
    >>> for completion in engine.generate_stream([Request("a", ids, max_new_tokens=32)]):
    ...     print(completion.text, completion.finish_reason)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import paged_attention, parallel, transformer
from model.backbone import LlamaBackbone
from model.config import LlamaConfig
from model.generation import compile_counter
from model.generation import paged_cache
from model.generation.detokenizer import IncrementalDetokenizer
from model.generation.paged_cache import PAGE_SIZE, PageTable, PagedKVCache
from model.generation.requests import Completion, Request, SamplingParams
from model.samplers import sampling

# A prefill call packs whole prompts into one row of up to this many tokens (a longer prompt gets a row of its
# own length bucket): at the demo model's size a row this long runs the weight products near the machine's
# matmul rate, and packing wastes only the tail of the last row instead of padding every prompt to a bucket.
PACK_TOKENS = 512
MIN_PACK_BUCKET = 32
STOP_ID_BUCKET = 4  # stop-id table width grows in steps of this, so a few stop ids never force a recompile


def _bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= n (at least `minimum`)."""
    size = minimum
    while size < n:
        size *= 2
    return size


def _window_bucket(pages: int, maximum: int) -> int:
    """Pages a decode call reads: quarter-octave steps (16, 20, 24, 28, 32, 40, ...), capped at the pool.

    At most a fifth of a window is pages not in use, and a run meets a few sizes (one program each).
    """
    size = 16
    while True:
        for quarters in (4, 5, 6, 7):
            if size * quarters // 4 >= pages:
                return min(size * quarters // 4, maximum)
        size *= 2


def _segments_for(tokens: int, max_slots: int) -> int:
    """How many prompts a prefill call of `tokens` tokens holds at most: the rows it samples a first token for.

    Each costs an LM-head row whether a prompt fills it or not; one per 32 tokens fits chat prompts (a system
    prompt alone is ~30 tokens) and keeps the head a few percent of the call.
    """
    return min(max_slots, max(8, tokens // 32))


def _plan_packs(lengths: Sequence[int], max_slots: int) -> list[list[int]]:
    """Groups prompts (by index) into prefill calls: first-fit decreasing into rows of PACK_TOKENS tokens.

    A prompt longer than PACK_TOKENS opens a row of its own power-of-two length, which shorter prompts may
    share. A call's row is then padded to the power of two above what it holds, so the padding is at most the
    tail of each call, not the gap between every prompt and its length bucket.
    """
    packs: list[tuple[int, list[int]]] = []  # (capacity, members)
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for j, (capacity, members) in enumerate(packs):
            grown = used[j] + n
            if grown <= capacity and len(members) < _segments_for(_bucket(grown, MIN_PACK_BUCKET), max_slots):
                members.append(i)
                used[j] = grown
                break
        else:
            packs.append((max(PACK_TOKENS, _bucket(n, MIN_PACK_BUCKET)), [i]))
            used.append(n)
    return [members for _, members in packs]


@dataclasses.dataclass
class EngineStats:
    """What the engine did, for benchmarks and progress reports."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_calls: int = 0
    programs_compiled: int = 0
    compile_seconds: float = 0.0
    shapes: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Slot:
    request: Request
    prompt_tokens: int
    stop_token_ids: frozenset[int]
    generated: list[int]
    detokenizer: IncrementalDetokenizer | None = None  # the completion's text; made by the first `_append`


@dataclasses.dataclass
class _SlotTable:
    """Host-side state of every slot: numpy arrays [B] handed to the decode step, the request in each slot, and
    the pages of the KV cache each slot owns."""

    entries: list[_Slot | None]
    pages: PageTable
    tokens: np.ndarray  # last token, not yet in the cache
    lengths: np.ndarray  # tokens in the cache
    counts: np.ndarray  # tokens generated
    active: np.ndarray
    budgets: np.ndarray  # max new tokens
    seeds: np.ndarray

    @classmethod
    def empty(cls, slots: int, pages: PageTable) -> "_SlotTable":
        zeros = lambda dtype: np.zeros(slots, dtype)  # noqa: E731
        return cls([None] * slots, pages, zeros(np.int32), zeros(np.int32), zeros(np.int32), zeros(bool),
                   zeros(np.int32), zeros(np.uint32))

    def free_slots(self) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if entry is None]

    def reserve(self, slot: int, request: Request, max_length: int) -> bool:
        """Claims `slot` and room in the cache for the request's worst case; False when the cache is full."""
        n = len(request.prompt_ids)
        most = min(n + request.max_new_tokens, max_length)
        if not self.pages.can_admit(most):
            return False
        self.pages.admit(slot, n, most)
        self.entries[slot] = _Slot(request, n, frozenset(request.stop_token_ids), [])
        return True

    def occupy(self, slot: int, first_token: int, seed: int) -> _Slot:
        """Starts decoding reserved `slot` after its prompt was prefilled and sampled `first_token`."""
        state = self.entries[slot]
        self.tokens[slot], self.lengths[slot], self.counts[slot] = first_token, state.prompt_tokens, 1
        self.budgets[slot], self.seeds[slot], self.active[slot] = state.request.max_new_tokens, seed, True
        return state

    def release(self, slot: int) -> None:
        self.entries[slot] = None
        self.active[slot] = False
        self.pages.release(slot)

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


# ---- jitted steps: pure functions of (weights, cache, per-slot state) ---------------------------------------


def _row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """One PRNG key per row from (request seed, tokens generated so far): independent of the batch."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


@functools.partial(jax.jit, static_argnames=("config", "variant"), donate_argnames=("cache",))
def _prefill(
    params: transformer.Params,
    cache: PagedKVCache,
    token_ids: jax.Array,  # [1, T] int32: whole prompts packed one after another, then padding
    positions: jax.Array,  # [1, T] each token's position in its own prompt
    segment_ids: jax.Array,  # [1, T] which prompt each token belongs to; -1 for padding
    pages: jax.Array,  # [T] the page each token's keys/values go to; N (dropped) for padding
    offsets: jax.Array,  # [T] the offset within that page
    last: jax.Array,  # [R] index of each prompt's last token (R = the call's prompt capacity)
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,  # [R] uint32
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
) -> tuple[PagedKVCache, jax.Array]:
    hidden, new_k, new_v = transformer.forward(
        params, config, token_ids, positions, segment_ids >= 0, segment_ids=segment_ids
    )
    logits = transformer.logits(params, hidden[0, last])  # only where a prompt's next token is predicted
    first_tokens = sampling.sample_next(logits, rows, _row_keys(seeds, jnp.zeros_like(seeds)), variant=variant)
    return paged_cache.write(cache, new_k[:, 0], new_v[:, 0], pages, offsets), first_tokens


@functools.partial(
    jax.jit, static_argnames=("config", "variant", "steps", "window", "max_length"), donate_argnames=("cache",)
)
def _decode(
    params: transformer.Params,
    cache: PagedKVCache,
    page_table: jax.Array,  # [B, pages per slot] each slot's pages in order; N where none is allocated
    owner: jax.Array,  # [window] the slot owning each of the first pages; B for a free page
    start: jax.Array,  # [window] the position of each page's first entry
    tokens: jax.Array,  # [B] last token of each slot, not yet in the cache
    lengths: jax.Array,  # [B] tokens in the cache per slot
    counts: jax.Array,  # [B] tokens generated so far
    active: jax.Array,  # [B] bool
    budgets: jax.Array,  # [B] max new tokens
    stop_ids: jax.Array,  # [B, N] int32, -1 padded
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,  # [B] uint32
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
    steps: int,
    window: int,
    max_length: int,
) -> tuple[PagedKVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Runs `steps` decode steps for every slot; returns the new tokens [B, steps] (-1 where a slot was idle).

    Every page a slot writes during these steps was allocated before the call (see `PageTable.grow`).
    """
    page_size = cache.page_size
    slots = jnp.arange(tokens.shape[0])

    def step(carry, _):
        cache, tokens, lengths, counts, active = carry
        # Reads only the first `window` pages of the pool: every page in use lies below it.
        view = paged_attention.PageView(owner, start, lengths)
        hidden, new_k, new_v = transformer.forward_paged(params, config, tokens[:, None], cache.k, cache.v, view, window)
        logits = transformer.logits(params, hidden[:, 0])
        sampled = sampling.sample_next(logits, rows, _row_keys(seeds, counts), variant=variant)
        target = jnp.where(active, page_table[slots, lengths // page_size], cache.pages)  # idle slots: dropped
        cache = paged_cache.write(cache, new_k[:, :, 0], new_v[:, :, 0], target, lengths % page_size)
        lengths = lengths + active
        counts = counts + active
        stopped = jnp.any(sampled[:, None] == stop_ids, axis=-1)
        finished = stopped | (counts >= budgets) | (lengths + 1 >= max_length)  # prompt + generated fill max_length
        emitted = jnp.where(active, sampled, -1)
        tokens = jnp.where(active, sampled, tokens)
        active = active & ~finished
        return (cache, tokens, lengths, counts, active), emitted

    (cache, tokens, lengths, counts, active), emitted = jax.lax.scan(
        step, (cache, tokens, lengths, counts, active), None, length=steps
    )
    return cache, tokens, lengths, counts, active, emitted.T


# ---- the host side: admission, bookkeeping, stop strings ----------------------------------------------------


class GenerationEngine:
    """Generates many requests at once with continuous batching over a fixed set of slots.

    Args:
        backbone: the model; its current weights are read at the start of each `generate_stream` call.
        tokenizer: used to detokenize completions and to find stop strings; None gives token ids only.
        max_slots: sequences decoded together (B).
        max_length: cache length per slot (prompt + generated tokens), at most the model's context.
        steps_per_call: decode steps per jitted call; more amortises dispatch, fewer refills sooner.
        cache_tokens: positions the paged KV cache holds over all slots (default max_slots x max_length, room
            for every slot at full length); smaller saves memory, and a request then waits for room when the
            cache cannot hold its prompt and whole token budget beside the sequences in flight.
        continuous: refill a slot as soon as its sequence ends; False runs static batches (a new batch starts
            only when every slot is free), kept to measure what continuous batching gains.
    """

    def __init__(
        self,
        backbone: LlamaBackbone,
        tokenizer: Any = None,
        *,
        max_slots: int = 32,
        max_length: int | None = None,
        steps_per_call: int = 8,
        cache_dtype: Any = None,
        cache_tokens: int | None = None,
        continuous: bool = True,
    ) -> None:
        config = backbone.config
        max_length = max_length or min(config.max_sequence_length, 2048)
        if max_length > config.max_sequence_length:
            raise ValueError(
                f"max_length {max_length} exceeds the model's context of {config.max_sequence_length} tokens"
            )
        if max_slots < 1 or steps_per_call < 1:
            raise ValueError(f"max_slots and steps_per_call must be >= 1, got {max_slots}, {steps_per_call}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.max_slots = max_slots
        self.max_length = max_length
        self.steps_per_call = steps_per_call
        self.continuous = continuous
        self.cache_tokens = cache_tokens or max_slots * max_length
        if self.cache_tokens < max_length:
            raise ValueError(f"cache_tokens {self.cache_tokens} cannot hold one sequence of max_length {max_length}")
        self.cache_pages = paged_cache.pages_for(self.cache_tokens, PAGE_SIZE)
        compute_dtype = jnp.dtype(backbone.compute_dtype)
        self.cache_dtype = jnp.dtype(cache_dtype or compute_dtype)
        self.stats = EngineStats()
        self._cache: PagedKVCache | None = None

    # ---- public -----------------------------------------------------------------------------------------

    def generate_stream(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yields one Completion per request, in the order they finish.

        Requests are pulled lazily from `requests`, a few batches ahead, so an endless stream works.
        """
        params = self.backbone.params()
        if self.backbone.compute_dtype != str(params["token_embedding"].dtype) and "token_embedding_scale" not in params:
            params = jax.tree.map(lambda w: w.astype(self.backbone.compute_dtype), params)
        compiles_before, compile_seconds_before = compile_counter.snapshot()
        try:
            yield from self._run(params, iter(requests))
        finally:
            compiles, seconds = compile_counter.snapshot()
            self.stats.programs_compiled += compiles - compiles_before
            self.stats.compile_seconds += seconds - compile_seconds_before

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """All completions, in the order of `requests`."""
        by_id = {c.request_id: c for c in self.generate_stream(requests)}
        return [by_id[r.request_id] for r in requests]

    # ---- the loop ---------------------------------------------------------------------------------------

    def _run(self, params: transformer.Params, requests: Iterator[Request]) -> Iterator[Completion]:
        if self._cache is None:
            # A tensor-parallel backbone gets a cache split along KV heads like its key / value weights.
            self._cache = PagedKVCache.allocate(
                self.config, self.cache_pages, PAGE_SIZE, self.cache_dtype, parallel.cache_sharding(self.backbone)
            )
        pages = PageTable(self.cache_pages, PAGE_SIZE, self.max_slots, self.max_length)
        table = _SlotTable.empty(self.max_slots, pages)
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
            admitted: list[tuple[int, Request]] = []
            while free and waiting:
                error = self._validate(waiting[0])
                if error:  # rejected alone; the rest of the batch goes on
                    yield self._error(waiting.popleft(), error)
                elif table.reserve(free[0], waiting[0], self.max_length):
                    admitted.append((free.pop(0), waiting.popleft()))
                else:  # the cache is full: the next request waits (in order) for a sequence to finish
                    break
            if admitted:
                yield from self._prefill_admitted(params, admitted, table)
            if table.active.any():
                yield from self._decode_once(params, table)
            elif exhausted and not waiting:
                return

    def _validate(self, request: Request) -> str | None:
        n = len(request.prompt_ids)
        if n == 0:
            return "the prompt has no tokens"
        if n + 1 > self.max_length:
            return (
                f"the prompt has {n} tokens, which leaves no room for a new token in a context of "
                f"{self.max_length} tokens"
            )
        if request.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
        bad = [t for t in request.prompt_ids if not 0 <= int(t) < self.config.vocabulary_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary of {self.config.vocabulary_size}"
        return None

    def _error(self, request: Request, reason: str) -> Completion:
        text = None if self.tokenizer is None else ""
        return Completion(request.request_id, (), text, "error", len(request.prompt_ids), 0, reason)

    def _prefill_admitted(self, params, admitted: list[tuple[int, Request]], table: "_SlotTable"):
        lengths = [len(request.prompt_ids) for _, request in admitted]
        for pack in _plan_packs(lengths, self.max_slots):
            yield from self._prefill_pack(params, [admitted[i] for i in pack], table)

    def _prefill_pack(self, params, pack: list[tuple[int, Request]], table: "_SlotTable"):
        """One prefill call: the prompts of `pack` side by side in one row, each into its slot's pages."""
        t = _bucket(sum(len(request.prompt_ids) for _, request in pack), MIN_PACK_BUCKET)
        capacity = _segments_for(t, self.max_slots)
        ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        segments = np.full((1, t), -1, np.int32)
        pages, offsets = np.full(t, self.cache_pages, np.int32), np.zeros(t, np.int32)
        last, seeds = np.zeros(capacity, np.int32), np.zeros(capacity, np.uint32)
        cursor = 0
        for j, (slot, request) in enumerate(pack):
            n = len(request.prompt_ids)
            span = slice(cursor, cursor + n)
            ids[0, span], positions[0, span], segments[0, span] = request.prompt_ids, np.arange(n), j
            pages[span], offsets[span] = table.pages.token_locations(slot, n)
            last[j], seeds[j] = cursor + n - 1, request.seed & 0xFFFFFFFF
            cursor += n
        row_sampling = [request.sampling for _, request in pack]
        rows, variant = sampling.row_sampling_params(row_sampling + [row_sampling[0]] * (capacity - len(pack)))
        start = time.perf_counter()
        self.stats.shapes.add(("prefill", t, capacity, variant))
        self._cache, first = _prefill(
            params, self._cache, ids, positions, segments, pages, offsets, last, rows, seeds,
            config=self.config, variant=variant,
        )
        first = np.asarray(first)
        self.stats.prefill_seconds += time.perf_counter() - start
        for j, (slot, request) in enumerate(pack):
            self.stats.prompt_tokens += len(request.prompt_ids)
            state = table.occupy(slot, int(first[j]), seeds[j])
            done = self._append(state, [int(first[j])])
            if done is None and (table.counts[slot] >= table.budgets[slot] or table.lengths[slot] + 1 >= self.max_length):
                done = self._finish(state, "length")
            if done is not None:
                table.release(slot)
                yield done

    def _decode_once(self, params, table: "_SlotTable"):
        steps = self.steps_per_call
        pages = table.pages
        for slot in np.flatnonzero(table.active):  # pages for every position these steps may write
            pages.grow(int(slot), int(table.lengths[slot]) + steps)
        window = _window_bucket(pages.extent(), self.cache_pages)
        rows, variant = sampling.row_sampling_params(table.sampling_rows())
        start = time.perf_counter()
        self.stats.shapes.add(("decode", window, variant))
        self._cache, tokens, lengths, counts, active, emitted = _decode(
            params, self._cache, pages.table, pages.owner[:window], pages.start[:window], table.tokens,
            table.lengths, table.counts, table.active, table.budgets, table.stop_id_table(), rows, table.seeds,
            config=self.config, variant=variant, steps=steps, window=window, max_length=self.max_length,
        )
        emitted = np.asarray(emitted)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_calls += 1
        was_active = np.flatnonzero(table.active)
        table.tokens[:], table.lengths[:], table.counts[:], table.active[:] = tokens, lengths, counts, active
        for i in was_active:
            state = table.entries[i]
            done = self._append(state, [int(t) for t in emitted[i] if t >= 0])
            if done is None and not table.active[i]:
                done = self._finish(state, "length")
            if done is not None:
                table.release(i)
                yield done

    def _append(self, state: _Slot, new: list[int]) -> Completion | None:
        """Adds generated tokens to a slot; returns its Completion if a stop token or stop string ended it.

        Tokens are taken in order, each checked against the stop strings before a later one may end the
        sequence: a decode call can return a stop string and, a few tokens on, a stop token, and the text must
        end at the stop string, not at the token.
        """
        self.stats.generated_tokens += len(new)
        detokenizer = state.detokenizer
        if detokenizer is None and self.tokenizer is not None:
            request = state.request
            detokenizer = state.detokenizer = IncrementalDetokenizer(
                self.tokenizer, request.prompt_ids, request.stop_strings, request.skip_special_tokens
            )
        for token in new:
            if token in state.stop_token_ids:
                return self._finish(state, "stop", counted=len(state.generated) + 1, stop_token_id=token)
            state.generated.append(token)
            if detokenizer is not None and detokenizer.add((token,)):
                # completion_tokens counts up to the token that completed the stop string (it was generated);
                # token_ids and text end where the stop string begins.
                del state.generated[detokenizer.kept_tokens :]
                return self._finish(state, "stop", counted=detokenizer.consumed_tokens)
        return None

    def _finish(
        self, state: _Slot, reason: str, counted: int | None = None, stop_token_id: int | None = None
    ) -> Completion:
        generated = tuple(state.generated)
        text = state.detokenizer.text if state.detokenizer is not None else None
        return Completion(
            state.request.request_id,
            generated,
            text,
            reason,
            state.prompt_tokens,
            counted if counted is not None else len(generated),
            None,
            stop_token_id,
        )
