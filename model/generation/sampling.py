"""Choosing the next token of every row of a batch, each row with its own sampler, in one jitted function.

`sample_next` is the engine's hot path: it runs every decode step over [B, V] logits (64 rows x 49152 tokens
on a 2-core CPU in the demo), so each piece is chosen by cost, measured there:
  - greedy: max, then the first index that reaches it (~2 ms; `jnp.argmax` lowers to a slower variadic reduce);
  - top-k: `lax.top_k` with a static k (~5 ms for k <= 64) and Gumbel-max over those k candidates only;
  - random, min-p, top-p: inverse-CDF sampling over the whole vocabulary with one uniform per row, searched
    block by block (~2 ms; a full-vocabulary Gumbel draw costs ~25 ms, a sort of 49k logits per row ~600 ms);
  - top-p's cutoff: from the 256 most likely tokens when the nucleus lies within them, else an exact bisection
    on the cutoff's float bits (31 masked sums; only run, under `lax.cond`, when some row needs it).
The host picks a `SamplingVariant` from the rows (an all-greedy batch compiles to the max alone, a top-k batch
skips the vocabulary-wide work); per-row modes are then selected with `jnp.where`, never Python branches.

Each row's token is a function of its own logits, parameters and key only: never of the other rows or of
the variant the batch happens to compile to. Candidate noise is keyed by token id (not by position in a
candidate list whose length depends on the batch), and reductions run over one row at a fixed length.

Example:
    >>> rows, variant = row_sampling_params([SamplingParams("top_k", top_k=3), SamplingParams("greedy")])
    >>> keys = jax.random.split(jax.random.key(0), 2)
    >>> sample_next(jnp.zeros((2, 10)), rows, keys, variant=variant).shape
    (2,)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.generation.requests import SamplingParams
from model.transformer import first_argmax

GREEDY, TOP_K, TOP_P, RANDOM, MIN_P = 0, 1, 2, 3, 4
_MODES = {"greedy": GREEDY, "top_k": TOP_K, "top_p": TOP_P, "random": RANDOM, "min_p": MIN_P}

# top-p looks for its nucleus among this many most likely tokens before falling back to the exact bisection.
# Fixed (not tied to the batch's top-k) so that a row's cutoff is computed the same way in every batch.
TOP_P_CANDIDATES = 256
# The smallest static k of `lax.top_k`: k = 1..8 cost the same, and fewer distinct k mean fewer programs.
MIN_TOP_K = 8
# Inverse-CDF search: block sums first, then a cumulative sum inside the chosen block only.
_CDF_BLOCK = 128


class RowSamplingParams(NamedTuple):
    """Per-row sampler parameters, a pytree of [B] arrays (host numpy from `row_sampling_params`)."""

    mode: np.ndarray | jax.Array  # int32: GREEDY, TOP_K, TOP_P, RANDOM or MIN_P
    temperature: np.ndarray | jax.Array  # float32, > 0 (1 for greedy rows, whose temperature is unused)
    top_k: np.ndarray | jax.Array  # int32, used by TOP_K rows
    top_p: np.ndarray | jax.Array  # float32, used by TOP_P rows
    min_p: np.ndarray | jax.Array  # float32, used by MIN_P rows


@dataclasses.dataclass(frozen=True)
class SamplingVariant:
    """The static shape of the work a batch needs; hashable, so it is a `jax.jit` static argument.

    `max_top_k`: the static k of `lax.top_k` (a power of two >= every TOP_K row's k, at least `MIN_TOP_K`),
    None without TOP_K rows. `has_top_p`: some row needs a nucleus cutoff. `full_vocab`: some row samples
    over the whole vocabulary (RANDOM, MIN_P or TOP_P).
    """

    all_greedy: bool
    max_top_k: int | None = None
    has_top_p: bool = False
    full_vocab: bool = False


def _normalized(params: SamplingParams, vocabulary_size: int | None) -> tuple[int, float, int, float, float]:
    """(mode, temperature, k, p, min_p) of one row, with samplers that are exactly another folded into it."""
    if params.is_greedy:
        return GREEDY, 1.0, 1, 1.0, 0.0
    mode = _MODES[params.sampler]
    # Each of these keeps every token, which is plain sampling from the whole distribution.
    if (
        (mode == TOP_P and params.top_p >= 1.0)
        or (mode == MIN_P and params.min_p <= 0.0)
        or (mode == TOP_K and vocabulary_size is not None and params.top_k >= vocabulary_size)
    ):
        mode = RANDOM
    if mode == TOP_K and params.top_k == 1:
        return GREEDY, 1.0, 1, 1.0, 0.0
    return mode, params.temperature, params.top_k, params.top_p, params.min_p


def row_sampling_params(
    rows: Sequence[SamplingParams], vocabulary_size: int | None = None
) -> tuple[RowSamplingParams, SamplingVariant]:
    """Per-row parameters (host numpy arrays) and the variant they compile to.

    `vocabulary_size`, when given, lets a top-k row with k >= V run as plain random sampling.
    """
    if not rows:
        raise ValueError("row_sampling_params needs at least one row, got none")
    modes, temperatures, ks, ps, min_ps = zip(*(_normalized(r, vocabulary_size) for r in rows))
    params = RowSamplingParams(
        mode=np.asarray(modes, np.int32),
        temperature=np.asarray(temperatures, np.float32),
        top_k=np.asarray(ks, np.int32),
        top_p=np.asarray(ps, np.float32),
        min_p=np.asarray(min_ps, np.float32),
    )
    return params, sampling_variant(params)


def sampling_variant(params: RowSamplingParams) -> SamplingVariant:
    """The variant of host-side per-row parameters (bounded: k is rounded up to a power of two)."""
    mode = np.asarray(params.mode)
    if np.all(mode == GREEDY):
        return SamplingVariant(all_greedy=True)
    max_top_k = None
    if np.any(mode == TOP_K):
        largest = int(np.max(np.asarray(params.top_k)[mode == TOP_K]))
        max_top_k = max(MIN_TOP_K, 1 << math.ceil(math.log2(largest)))
    has_top_p = bool(np.any(mode == TOP_P))
    full_vocab = bool(np.any((mode == TOP_P) | (mode == RANDOM) | (mode == MIN_P)))
    return SamplingVariant(all_greedy=False, max_top_k=max_top_k, has_top_p=has_top_p, full_vocab=full_vocab)


def sample_next(
    logits: jnp.ndarray,
    params: RowSamplingParams,
    keys: jax.Array,
    *,
    variant: SamplingVariant,
) -> jnp.ndarray:
    """The next token of each row: logits [B, V] float32, params of [B] arrays, keys [B] (or [B, 2] uint32).

    Returns [B] int32. Greedy rows give exactly `argmax` (first maximum); the others sample from their
    temperature-scaled distribution restricted to their top-k / nucleus / min-p set.
    """
    b, v = logits.shape
    assert logits.dtype == jnp.float32, logits.dtype
    assert params.mode.shape == (b,), (params.mode.shape, logits.shape)
    greedy = first_argmax(logits)
    if variant.all_greedy:
        return greedy
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    assert keys.shape == (b,), (keys.shape, logits.shape)
    mode = jnp.asarray(params.mode)
    inv_temperature = 1.0 / jnp.asarray(params.temperature, jnp.float32)[:, None]
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    tokens = greedy

    if variant.max_top_k is not None or variant.has_top_p:
        k_static = max(variant.max_top_k or 0, TOP_P_CANDIDATES if variant.has_top_p else 0)
        top_logits, top_ids = top_k(logits, min(k_static, v))
    if variant.max_top_k is not None:
        k = min(variant.max_top_k, v)
        by_top_k = _sample_candidates(top_logits[:, :k], top_ids[:, :k], params.top_k, inv_temperature, keys)
        tokens = jnp.where(mode == TOP_K, by_top_k, tokens)
    if variant.full_vocab:
        # Shifted so the row's best token is 0: no overflow at small temperatures, exp() of the best is 1.
        scaled = (logits - row_max) * inv_temperature  # [B, V], <= 0
        cutoff = jnp.where(mode == MIN_P, jnp.log(jnp.asarray(params.min_p, jnp.float32)), -jnp.inf)
        if variant.has_top_p:
            top_scaled = (top_logits[:, :TOP_P_CANDIDATES] - row_max) * inv_temperature
            nucleus = _nucleus_cutoff(scaled, top_scaled, jnp.asarray(params.top_p, jnp.float32), mode == TOP_P)
            cutoff = jnp.where(mode == TOP_P, nucleus, cutoff)
        uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
        by_cdf = _sample_inverse_cdf(jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf), uniform)
        tokens = jnp.where((mode == RANDOM) | (mode == MIN_P) | (mode == TOP_P), by_cdf, tokens)
    return tokens.astype(jnp.int32)


def top_k(x: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`lax.top_k` (sorted, ties to the lower index) that stays XLA's fast TopK kernel on CPU.

    jax emits top-k as a sort plus a slice, which XLA folds back into its TopK kernel only while that slice
    is the sort's one user; slicing the result again would merge into a second slice of the full sort and
    leave a sort of all V logits per row (~600 ms instead of ~5 ms at [64, 49152]). The barrier stops that.
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(x, k))


def _sample_candidates(
    top_logits: jnp.ndarray,
    top_ids: jnp.ndarray,
    k: jnp.ndarray,
    inv_temperature: jnp.ndarray,
    keys: jax.Array,
) -> jnp.ndarray:
    """Gumbel-max over each row's first k candidates [B, K] (sorted best first); returns token ids [B].

    The noise of a candidate is keyed by its token id, so the draw does not depend on the static K.
    """
    scaled = (top_logits - top_logits[:, :1]) * inv_temperature
    noise = jax.vmap(lambda key, ids: jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(ids))(
        keys, top_ids
    )
    in_top_k = jnp.arange(top_logits.shape[1])[None, :] < jnp.asarray(k)[:, None]
    choice = first_argmax(jnp.where(in_top_k, scaled + noise, -jnp.inf))
    return jnp.take_along_axis(top_ids, choice[:, None], axis=1)[:, 0]


def _nucleus_cutoff(
    scaled: jnp.ndarray, top_scaled: jnp.ndarray, p: jnp.ndarray, is_top_p: jnp.ndarray
) -> jnp.ndarray:
    """The scaled logit of the last token in each row's nucleus: the fewest best tokens with mass >= p.

    scaled [B, V] (row max 0); top_scaled [B, C] its C best values, sorted. Rows whose nucleus lies within
    the C candidates get it from a cumulative sum over them; the others (rare with C = 256, typical p) from
    a bisection over the whole row, which only runs when some top-p row needs it.
    """
    mass = jnp.sum(jnp.exp(scaled), axis=-1)  # [B], unnormalized (the best token counts 1)
    cumulative = jnp.cumsum(jnp.exp(top_scaled), axis=-1)
    below = jnp.sum(cumulative < (p * mass)[:, None], axis=-1)  # best tokens whose mass stays below p
    fits = below < top_scaled.shape[1]
    from_candidates = jnp.take_along_axis(top_scaled, jnp.minimum(below, top_scaled.shape[1] - 1)[:, None], 1)[:, 0]
    return jax.lax.cond(
        jnp.any(is_top_p & ~fits),
        lambda: jnp.where(fits, from_candidates, _bisect_cutoff(scaled, p * mass)),
        lambda: from_candidates,
    )


def _bisect_cutoff(scaled: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """The largest c with sum(exp(scaled[scaled >= c])) >= target, per row, exactly.

    Searches the distance d = -c >= 0 through the bits of non-negative float32, which order like the floats;
    31 halvings of [0, inf] land exactly on one token's value.
    """
    distance = -scaled
    probs = jnp.exp(scaled)

    def mass_within(d_bits: jnp.ndarray) -> jnp.ndarray:
        d = jax.lax.bitcast_convert_type(d_bits, jnp.float32)
        return jnp.sum(jnp.where(distance <= d[:, None], probs, 0.0), axis=-1)

    def halve(_, bounds):
        low, high = bounds  # mass_within(low) < target <= mass_within(high); low = -1 stands for "nothing"
        middle = low + (high - low) // 2
        enough = mass_within(middle) >= target
        return jnp.where(enough, low, middle), jnp.where(enough, middle, high)

    b = scaled.shape[0]
    infinity_bits = jax.lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32)
    bounds = (jnp.full((b,), -1, jnp.int32), jnp.full((b,), infinity_bits, jnp.int32))
    _, high = jax.lax.fori_loop(0, 31, halve, bounds)
    return -jax.lax.bitcast_convert_type(high, jnp.float32)


def _sample_inverse_cdf(scaled: jnp.ndarray, uniform: jnp.ndarray) -> jnp.ndarray:
    """A token per row drawn with probability exp(scaled) / sum (-inf excluded), by one uniform [B] each.

    Finds the block whose cumulative mass passes u * total, then the token inside it; never returns a token
    of zero probability, even when rounding puts u * total past the last cumulative sum.
    """
    b, v = scaled.shape
    blocks = -(-v // _CDF_BLOCK)
    probs = jnp.exp(scaled)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * _CDF_BLOCK - v))).reshape(b, blocks, _CDF_BLOCK)
    block_mass = jnp.sum(probs, axis=-1)  # [B, blocks]
    cumulative = jnp.cumsum(block_mass, axis=-1)
    target = uniform * cumulative[:, -1]
    block = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), _last_positive(block_mass))
    before = jnp.where(block > 0, jnp.take_along_axis(cumulative, jnp.maximum(block - 1, 0)[:, None], 1)[:, 0], 0.0)
    inside = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [B, block size]
    within = jnp.cumsum(inside, axis=-1) + before[:, None]
    offset = jnp.minimum(jnp.sum(within <= target[:, None], axis=-1), _last_positive(inside))
    return (block * _CDF_BLOCK + offset).astype(jnp.int32)


def _last_positive(x: jnp.ndarray) -> jnp.ndarray:
    """Index of the last entry > 0 along the last axis (0 when none)."""
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1], dtype=jnp.int32), 0), axis=-1)
