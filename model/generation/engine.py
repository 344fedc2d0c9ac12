"""The continuous-batching generation engine: one decode core for `generate()` and the batch workers.

A fixed number of slots share a preallocated grouped KV cache. Waiting requests are prefilled in groups (only
their real tokens, padded to a length bucket) straight into free slots; then every jitted decode call advances
all slots `steps_per_call` tokens. A slot whose sequence stops (stop token, stop string, token budget, end of
cache) is refilled with the next waiting request before the next decode call.

Shapes are static and bucketed, so a long job compiles a handful of programs once:
  prefill: (rows in {4, 16}) x (prompt length bucket, powers of two) -- only the buckets a run meets;
  decode:  one per attention window bucket (powers of two up to the cache length) and sampler variant.

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

from model import parallel, transformer
from model.backbone import LlamaBackbone
from model.config import LlamaConfig
from model.generation import compile_counter
from model.generation.kv_cache import KVCache, write_prompts, write_tokens
from model.generation.requests import Completion, Request, SamplingParams
from model.samplers import sampling

# Prefill batch sizes: refills after a few slots finish use 4 rows, a fresh start 16 (capped at max_slots).
# Two sizes, not one per count, keep the number of programs small; a padded row costs little next to decode.
PREFILL_ROW_BUCKETS = (4, 16)
MIN_LENGTH_BUCKET = 32
STOP_ID_BUCKET = 4  # stop-id table width grows in steps of this, so a few stop ids never force a recompile


def _bucket(n: int, minimum: int, maximum: int) -> int:
    """The smallest power of two >= n (at least `minimum`), capped at `maximum`."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, maximum)


def _prefill_chunks(rows: int, max_slots: int) -> list[tuple[int, int]]:
    """(program rows, first row) of each prefill call for `rows` prompts of one length bucket.

    Full chunks of the largest size, then the rest in the smallest size: 7 prompts run as 4 + 4 rows, not
    as 16 rows of which 9 are padding (at a 512-token bucket that padding cost more than the real prompts).
    """
    small, large = (min(size, max_slots) for size in PREFILL_ROW_BUCKETS)
    chunks, start = [], 0
    while rows - start > large - small:  # a remainder this close to `large` pads no more as one chunk
        chunks.append((large, start))
        start += large
    while start < rows:
        chunks.append((small, start))
        start += small
    return chunks


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
    prompt_text: str | None = None  # detokenized prompt, computed on first use


@dataclasses.dataclass
class _SlotTable:
    """Host-side state of every slot: numpy arrays [B] handed to the decode step, and the request in each slot."""

    entries: list[_Slot | None]
    tokens: np.ndarray  # last token, not yet in the cache
    lengths: np.ndarray  # tokens in the cache
    counts: np.ndarray  # tokens generated
    active: np.ndarray
    budgets: np.ndarray  # max new tokens
    seeds: np.ndarray

    @classmethod
    def empty(cls, slots: int) -> "_SlotTable":
        zeros = lambda dtype: np.zeros(slots, dtype)  # noqa: E731
        return cls([None] * slots, zeros(np.int32), zeros(np.int32), zeros(np.int32), zeros(bool),
                   zeros(np.int32), zeros(np.uint32))

    def free_slots(self) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if entry is None]

    def occupy(self, slot: int, request: Request, first_token: int, seed: int) -> _Slot:
        n = len(request.prompt_ids)
        self.entries[slot] = _Slot(request, n, frozenset(request.stop_token_ids), [])
        self.tokens[slot], self.lengths[slot], self.counts[slot] = first_token, n, 1
        self.budgets[slot], self.seeds[slot], self.active[slot] = request.max_new_tokens, seed, True
        return self.entries[slot]

    def release(self, slot: int) -> None:
        self.entries[slot] = None
        self.active[slot] = False

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
    cache: KVCache,
    token_ids: jax.Array,  # [P, T] int32, right-padded
    lengths: jax.Array,  # [P] real prompt lengths
    slots: jax.Array,  # [P] target slot per row; B (out of range) for padding rows
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,  # [P] uint32
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
) -> tuple[KVCache, jax.Array]:
    p, t = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (p, t))
    token_mask = positions < lengths[:, None]
    hidden, new_k, new_v = transformer.forward(params, config, token_ids, positions, token_mask)
    last = hidden[jnp.arange(p), lengths - 1]  # logits only where the next token is predicted
    logits = transformer.logits(params, last)
    first_tokens = sampling.sample_next(logits, rows, _row_keys(seeds, jnp.zeros_like(seeds)), variant=variant)
    return write_prompts(cache, new_k, new_v, slots), first_tokens


@functools.partial(
    jax.jit, static_argnames=("config", "variant", "steps", "window"), donate_argnames=("cache",)
)
def _decode(
    params: transformer.Params,
    cache: KVCache,
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
) -> tuple[KVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Runs `steps` decode steps for every slot; returns the new tokens [B, steps] (-1 where a slot was idle)."""
    max_length = cache.max_length

    def step(carry, _):
        cache, tokens, lengths, counts, active = carry
        # Attend only over the first `window` cache entries: every active slot's length fits in it, and
        # reading the whole preallocated cache would cost as much memory traffic as the weights.
        hidden, new_k, new_v = transformer.forward(
            params,
            config,
            tokens[:, None],
            lengths[:, None],
            cache_k=cache.k,
            cache_v=cache.v,
            cache_lengths=lengths,
            cache_window=window,
        )
        logits = transformer.logits(params, hidden[:, 0])
        sampled = sampling.sample_next(logits, rows, _row_keys(seeds, counts), variant=variant)
        cache = write_tokens(cache, new_k, new_v, jnp.where(active, lengths, max_length))
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
        compute_dtype = jnp.dtype(backbone.compute_dtype)
        self.cache_dtype = jnp.dtype(cache_dtype or compute_dtype)
        self.stats = EngineStats()
        self._cache: KVCache | None = None

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
            self._cache = KVCache.allocate(
                self.config, self.max_slots, self.max_length, self.cache_dtype, parallel.cache_sharding(self.backbone)
            )
        table = _SlotTable.empty(self.max_slots)
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
                request = waiting.popleft()
                error = self._validate(request)
                if error:  # rejected alone; the rest of the batch goes on
                    yield self._error(request, error)
                else:
                    admitted.append((free.pop(0), request))
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
        # Group by length bucket so that a short prompt is not padded to a long one's length.
        by_bucket: dict[int, list[tuple[int, Request]]] = collections.defaultdict(list)
        for slot, request in admitted:
            by_bucket[_bucket(len(request.prompt_ids), MIN_LENGTH_BUCKET, self.max_length)].append((slot, request))
        for t, group in sorted(by_bucket.items()):
            for p, start in _prefill_chunks(len(group), self.max_slots):
                yield from self._prefill_chunk(params, group[start : start + p], p, t, table)

    def _prefill_chunk(self, params, chunk: list[tuple[int, Request]], p: int, t: int, table: "_SlotTable"):
        ids = np.zeros((p, t), np.int32)
        lengths = np.ones(p, np.int32)
        target = np.full(p, self.max_slots, np.int32)  # padding rows write to slot B: dropped
        seeds = np.zeros(p, np.uint32)
        for row, (slot, request) in enumerate(chunk):
            ids[row, : len(request.prompt_ids)] = request.prompt_ids
            lengths[row] = len(request.prompt_ids)
            target[row] = slot
            seeds[row] = request.seed & 0xFFFFFFFF
        row_sampling = [request.sampling for _, request in chunk]
        rows, variant = sampling.row_sampling_params(row_sampling + [row_sampling[0]] * (p - len(chunk)))
        start = time.perf_counter()
        self.stats.shapes.add(("prefill", p, t, variant))
        self._cache, first = _prefill(
            params, self._cache, ids, lengths, target, rows, seeds, config=self.config, variant=variant
        )
        first = np.asarray(first)
        self.stats.prefill_seconds += time.perf_counter() - start
        for row, (slot, request) in enumerate(chunk):
            self.stats.prompt_tokens += len(request.prompt_ids)
            state = table.occupy(slot, request, int(first[row]), seeds[row])
            done = self._append(state, [int(first[row])])
            if done is None and (table.counts[slot] >= table.budgets[slot] or table.lengths[slot] + 1 >= self.max_length):
                done = self._finish(state, "length")
            if done is not None:
                table.release(slot)
                yield done

    def _decode_once(self, params, table: "_SlotTable"):
        steps = self.steps_per_call
        window = _bucket(int(table.lengths[table.active].max()) + steps, 128, self.max_length)
        rows, variant = sampling.row_sampling_params(table.sampling_rows())
        start = time.perf_counter()
        self.stats.shapes.add(("decode", window, variant))
        self._cache, tokens, lengths, counts, active, emitted = _decode(
            params, self._cache, table.tokens, table.lengths, table.counts, table.active, table.budgets,
            table.stop_id_table(), rows, table.seeds, config=self.config, variant=variant, steps=steps, window=window,
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
        """Adds generated tokens to a slot; returns its Completion if a stop token or stop string ended it."""
        self.stats.generated_tokens += len(new)
        for j, token in enumerate(new):
            if token in state.stop_token_ids:
                state.generated.extend(new[:j])
                return self._finish(state, "stop", counted=len(state.generated) + 1, stop_token_id=token)
        state.generated.extend(new)
        if state.request.stop_strings and self.tokenizer is not None:
            return self._check_stop_strings(state)
        return None

    def _check_stop_strings(self, state: _Slot) -> Completion | None:
        stops = state.request.stop_strings
        detokenize = functools.partial(self._text, state)
        text = detokenize(state.generated)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut < 0:
            return None
        # completion_tokens counts up to the token that completed the stop string (it was generated);
        # token_ids and text end where the stop string begins.
        counted = next(k for k in range(1, len(state.generated) + 1) if any(s in detokenize(state.generated[:k]) for s in stops))
        kept = 0
        while kept < counted and len(detokenize(state.generated[: kept + 1])) <= cut:
            kept += 1
        state.generated = state.generated[:kept]
        return self._finish(state, "stop", counted=counted, text=text[:cut])

    def _text(self, state: _Slot, generated: Sequence[int]) -> str:
        """The text of generated tokens as they read after the prompt.

        Detokenizing them alone can differ (SentencePiece drops the leading space of a sequence), so the
        prompt and completion are detokenized together and the prompt's text is cut off.
        """
        if state.prompt_text is None:
            state.prompt_text = self.tokenizer.detokenize(list(state.request.prompt_ids))
        full = self.tokenizer.detokenize([*state.request.prompt_ids, *generated])
        if full.startswith(state.prompt_text):
            return full[len(state.prompt_text) :]
        return self.tokenizer.detokenize(list(generated))

    def _finish(
        self, state: _Slot, reason: str, counted: int | None = None, text: str | None = None,
        stop_token_id: int | None = None,
    ) -> Completion:
        generated = tuple(state.generated)
        if text is None and self.tokenizer is not None:
            text = self._text(state, generated)
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
