"""The engine's jitted steps: pure functions of (weights, KV cache, per-slot arrays, per-row sampling arrays).

`prefill` runs packed prompts and samples each one's first token; `decode` advances every slot several tokens.
Both return the cache updated in place (its buffers donated: decode's whole, prefill's layer by layer in its
writes); neither holds state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from model import paged_attention, rope, transformer
from model.config import LlamaConfig
from model.generation import grammar, logprobs, paged_cache, sampling
from model.generation import penalties as penalty_kernel
from model.generation.paged_cache import PagedKVCache
from model.generation.penalties import Penalties
from model.kernels import cpu_matmul, panels


@dataclasses.dataclass(frozen=True)
class Weights:
    """The weights as the jitted steps take them: stacked [L, ...] layers for prefill (one `lax.scan`, compiled
    once for any depth) and per-layer copies for decode (unrolled: no per-step copies of layer slices).

    The per-layer copies double the weights' memory; a decode step reads each weight once, without them XLA would
    copy each layer's slice of the stacked arrays on every step, ~1/3 of the step's time on CPU. Where the CPU
    product kernel runs them, the per-layer products are stored in its panels (`model.kernels.panels`).
    """

    stacked: transformer.Params
    per_layer: transformer.Params


def prefill_weights(params: transformer.Params, config: LlamaConfig, kernel: bool) -> transformer.Params:
    """`Weights.stacked` from the backbone's stacked weights: as they are, except that where the CPU kernel
    multiplies int8 weights in quads (`cpu_matmul.quads`: AVX512-VNNI), every layer's int8 products go into quads
    too, stacked [L, ...], so that prefill's and scoring's products take `vpdpbusd` as decode's do (the widened
    int8 product runs at float32's speed). They are a copy beside the backbone's own (the demo model: ~106 MB);
    `decode_weights` slices its per-layer quads from them."""
    if not (kernel and cpu_matmul.quads()):
        return params
    layers = dict(params["layers"])
    for name in panels.LAYER_PRODUCTS:
        w = layers[name]  # [L, ...]
        per_layer = w.size // len(w)
        inputs = panels.product_inputs(name, per_layer, config.hidden_dim)
        if panels.fits_quads(w.dtype, inputs, per_layer // inputs, name + "_scale" in layers):
            layers[name] = panels.Panels(jax.vmap(lambda layer: panels.to_quads(layer, inputs).data)(w))
    return jax.block_until_ready({**params, "layers": layers})


def decode_weights(params: transformer.Params, config: LlamaConfig, kernel: bool) -> transformer.Params:
    """`Weights.per_layer` from the stacked weights (`prefill_weights`): one copy per layer, its products in the
    CPU kernel's panels when `kernel` (the kernel then reads float32 weights in place, `model.kernels.panels`)."""
    if not kernel:
        return transformer.unstack_layers(params)
    # A layer at a time: its slices are let go once its panels exist, so that the weights are never held three
    # times over (stacked, sliced and in panels) while the engine starts.
    quads = cpu_matmul.quads()  # int8 weights in quads where the kernel multiplies those (AVX512-VNNI)

    def packed(layer: transformer.Params) -> transformer.Params:
        return jax.block_until_ready(panels.layer_for_kernel(layer, config.hidden_dim, quads))

    return panels.head_for_kernel(transformer.unstack_layers(params, each=packed), config.hidden_dim, quads)


def row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """One PRNG key per row from (request seed, tokens generated so far): independent of the batch."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


def _logprobs(logits: jax.Array, chosen: jax.Array, k: int | None):
    """What a step returns about its tokens' log-probabilities: None, or (chosen [R], top ids [R, k], top [R, k])."""
    return None if k is None else logprobs.token_logprobs(logits, chosen, k)


class Context(NamedTuple):
    """The cached pages that a prefill call's prompts continue (prompt sharing, `prefix_cache.py`): the pool's
    pages `pages` [U], each once however many prompts share it (padded with any page), and `sees` [R, U] int32,
    how many first positions of each page each prompt of the call attends to: a page size for a page shared
    whole, fewer for the page where it parts from the cached prompt, 0 for pages it does not continue."""

    pages: jax.Array
    sees: jax.Array


def prefill(
    params: transformer.Params,
    cache: PagedKVCache,
    token_ids: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    pages: jax.Array,  # [T] the page each token's keys/values go to; N (dropped) for padding
    offsets: jax.Array,  # [T] the offset within that page
    last: jax.Array,
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,
    penalties: Penalties | None = None,
    token_mask: jax.Array | None = None,
    context: Context | None = None,
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
    logprobs_k: int | None = None,
    segment_length: int | None = None,
) -> tuple[PagedKVCache, jax.Array, Any]:
    """Prefills packed prompts into their pages; returns the cache, each prompt's first token [R] and, with
    `logprobs_k` (None: none), the log-probabilities of those tokens (see `model.generation.logprobs`).
    With `context`, some prompts start after cached pages (their tokens' positions start there): each of those
    attends to its pages too, read from the pool.

    The forward pass and sampling are one program (`prefill_tokens`); the pool's reads (the context's pages) and
    writes are small programs per layer (`_read_context`, `paged_cache.write`), each compiled once for every row
    length. Inside the forward's program they made its compile grow with layers x chunks: writes ~10 s per
    prefill shape for the demo model, reads ~1.2 s (a prefill program with a context took 1.9 s, without 0.6 s)."""
    pool_pages = None if context is None else [_read_context(k, v, context.pages) for k, v in zip(cache.k, cache.v)]
    first_tokens, first_logprobs, new_k, new_v = prefill_tokens(
        params, token_ids, positions, segment_ids, last, rows, seeds, penalties, token_mask,
        None if context is None else tuple(zip(*pool_pages)), context,
        config=config, variant=variant, logprobs_k=logprobs_k, segment_length=segment_length,
        kernel=cache.sharding is None,  # a model split across devices keeps XLA's products
    )
    return paged_cache.write(cache, new_k, new_v, pages, offsets), first_tokens, first_logprobs


@functools.partial(jax.jit, static_argnames=("config", "variant", "logprobs_k", "segment_length", "kernel"))
def prefill_tokens(
    params: transformer.Params,
    token_ids: jax.Array,  # [1, T] int32: whole prompts packed one after another, then padding
    positions: jax.Array,  # [1, T] each token's position in its own prompt
    segment_ids: jax.Array,  # [1, T] which prompt each token belongs to; -1 for padding
    last: jax.Array,  # [R] index of each prompt's last token (R = the call's prompt capacity)
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,  # [R] uint32
    penalties: Penalties | None = None,  # rows [R]; None when no prompt of the call has any
    token_mask: jax.Array | None = None,  # [R, ceil(V / 32)] int32 allowed-token bits; None: no row has a grammar
    context_pages: tuple[Any, Any] | None = None,  # (keys, values) per layer of `context`'s pages, `_read_context`
    context: Context | None = None,
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
    logprobs_k: int | None = None,
    segment_length: int | None = None,  # a bound on every prompt's tokens (`scheduler.segment_bound`), or None
    kernel: bool = False,  # products may run as the CPU kernel (`transformer.project`)
) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """`prefill`'s forward pass: each prompt's first token [R], its log-probabilities, and every token's keys and
    values [L, T, K, D], which `prefill` writes into the pool."""
    context_k = context_v = context_visible = None
    if context is not None:
        dtype = transformer._compute_dtype(params, None)  # a bfloat16 cache of a float32 model: read in float32
        context_k, context_v = (jnp.stack(layers).astype(dtype) for layers in context_pages)  # [L, 1, K, U * P, D]
        segments = segment_ids[0]
        sees = jnp.where((segments >= 0)[:, None], context.sees[jnp.maximum(segments, 0)], 0)  # [T, U]: padding 0
        page = context_k.shape[3] // sees.shape[1]
        visible = jnp.arange(page)[None, None, :] < sees[:, :, None]  # [T, U, P]
        context_visible = visible.reshape(sees.shape[0], -1)[None]  # [1, T, U * P]
    hidden, new_k, new_v = transformer.forward(
        params, config, token_ids, positions, segment_ids >= 0, context_k, context_v, segment_ids=segment_ids,
        segment_length=segment_length, kernel=kernel, context_visible=context_visible,
    )
    logits = transformer.logits(params, hidden[0, last], kernel)  # only where a prompt's next token is predicted
    shaped = logits if penalties is None else penalty_kernel.apply(logits, penalties)
    if token_mask is not None:
        shaped = grammar.apply_token_mask(shaped, token_mask)
    first_tokens = sampling.sample_next(shaped, rows, row_keys(seeds, jnp.zeros_like(seeds)), variant=variant)
    return first_tokens, _logprobs(logits, first_tokens, logprobs_k), new_k[:, 0], new_v[:, 0]


@jax.jit
def _read_context(chunks_k, chunks_v, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's keys and values of the pool's pages `pages` [U], each [1, K, U * P, D]."""
    return _dense_pages(chunks_k, pages, True), _dense_pages(chunks_v, pages, False)


def _dense_pages(chunks, pages: jax.Array, keys: bool) -> jax.Array:
    """One layer's pool pages `pages` [U] as one dense sequence [1, K, U * P, D], in the order given."""
    taken = paged_cache.gather_pages(chunks, pages)  # keys [U, K, D, P]; values [U, K, P, D]
    taken = taken.transpose(1, 0, 3, 2) if keys else taken.transpose(1, 0, 2, 3)  # [K, U, P, D]
    return taken.reshape(1, taken.shape[0], -1, taken.shape[3])


@functools.partial(
    jax.jit,
    static_argnames=("config", "variant", "steps", "chunks", "max_length", "logprobs_k"),
    donate_argnames=("cache",),
)
def decode(
    params: transformer.Params,  # with per-layer `layers` (transformer.unstack_layers)
    cache: PagedKVCache,
    page_table: jax.Array,  # [B, W] each slot's pages in order, N where none is allocated; W >= pages any slot holds
    owner: jax.Array,  # [pages of the chunks read] the slot owning each page; B for a free page
    start: jax.Array,  # [pages of the chunks read] the position of each page's first entry
    tokens: jax.Array,  # [B] last token of each slot, not yet in the cache
    lengths: jax.Array,  # [B] tokens in the cache per slot
    counts: jax.Array,  # [B] tokens generated so far
    active: jax.Array,  # [B] bool
    budgets: jax.Array,  # [B] max new tokens
    stop_ids: jax.Array,  # [B, N] int32, -1 padded
    rows: sampling.RowSamplingParams,
    seeds: jax.Array,  # [B] uint32
    penalties: Penalties | None = None,  # None when no slot of the call has any
    token_mask: jax.Array | None = None,  # [B, ceil(V / 32)] int32 allowed-token bits (steps must be 1); None: none
    *,
    config: LlamaConfig,
    variant: sampling.SamplingVariant,
    steps: int,
    chunks: int,
    max_length: int,
    logprobs_k: int | None = None,
) -> tuple[PagedKVCache, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Any]:
    """Runs `steps` decode steps for every slot; returns the new tokens [B, steps] (-1 where a slot was idle) and,
    with `logprobs_k`, their log-probabilities, each array with a [B, steps] lead (see `model.generation.logprobs`).

    Every page a slot writes during these steps was allocated before the call (see `PageTable.grow`).
    """
    page_size = cache.page_size
    slots = jnp.arange(tokens.shape[0])
    # A grammar's mask holds for one token: the host computes the next one from the token sampled.
    assert token_mask is None or steps == 1, steps

    # Every step's rotary sin/cos at once, outside the steps' loop: a slot active at step s is at position
    # lengths + s (an idle slot's rotation is never used). Inside, XLA recomputed them in every layer's products.
    positions = lengths[None, :, None] + jnp.arange(steps)[:, None, None]  # [steps, B, 1]
    rotations = rope.rotation(positions, rope.inverse_frequencies(config))

    def step(carry, rotation):
        cache, tokens, lengths, counts, active, penalties = carry
        target = jnp.where(active, page_table[slots, lengths // page_size], cache.pages)  # idle slots: dropped
        # Reads only the first `chunks` chunks of each pool: every page in use lies below them.
        view = paged_attention.PageView(owner, start, lengths, page_table, write_pages=target)

        def write(chunks_k, chunks_v, k, v):  # XLA's write of the new entries (the CPU kernel writes its own)
            return paged_cache.write_layer(
                chunks_k, chunks_v, k, v, view.write_pages, lengths % page_size, cache.sharding
            )
        # The CPU kernels read whole operands: a model split across devices (its pool too) keeps XLA's ops.
        kernel = cache.sharding is None
        hidden, pages_k, pages_v = transformer.decode_paged(
            params, config, tokens[:, None], cache.k, cache.v, view, rotation, write, chunks, kernel=kernel
        )
        cache = PagedKVCache(pages_k, pages_v, cache.sharding)
        if variant.all_greedy and penalties is None and token_mask is None and logprobs_k is None:
            # Nothing but the argmax needs the logits: the head may hand back the tokens alone.
            logits, sampled = None, transformer.greedy_tokens(params, hidden[:, 0], kernel=kernel)
        else:
            logits = transformer.logits(params, hidden[:, 0], kernel=kernel)
            shaped = logits if penalties is None else penalty_kernel.apply(logits, penalties)
            if token_mask is not None:  # after penalties and bias: no bias brings back a token the grammar forbids
                shaped = grammar.apply_token_mask(shaped, token_mask)
            sampled = sampling.sample_next(shaped, rows, row_keys(seeds, counts), variant=variant)
        if penalties is not None:
            penalties = penalty_kernel.count(penalties, sampled, active)
        lengths = lengths + active
        counts = counts + active
        stopped = jnp.any(sampled[:, None] == stop_ids, axis=-1)
        finished = stopped | (counts >= budgets) | (lengths + 1 >= max_length)  # prompt + generated fill max_length
        emitted = jnp.where(active, sampled, -1)
        tokens = jnp.where(active, sampled, tokens)
        active = active & ~finished
        return (cache, tokens, lengths, counts, active, penalties), (emitted, _logprobs(logits, sampled, logprobs_k))

    (cache, tokens, lengths, counts, active, _), (emitted, token_logprobs) = jax.lax.scan(
        step, (cache, tokens, lengths, counts, active, penalties), rotations, length=steps
    )
    token_logprobs = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), token_logprobs)  # [steps, B, ...] -> [B, steps, ...]
    return cache, tokens, lengths, counts, active, emitted.T, token_logprobs




def copy_pages(cache: PagedKVCache, source: jax.Array, target: jax.Array) -> PagedKVCache:
    """Copies pages source [M] -> target [M] of every layer's pool (prompt sharing: `prefix_cache.py`), one small
    program per layer call (one program for all layers took ~10 s to compile)."""
    return paged_cache.copy_pages(cache, source, target)
