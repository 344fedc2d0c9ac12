"""The per-row sampling hot path on fake logits: each sampler's support, distribution and reproducibility."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.generation.requests import STREAMING_SAMPLERS, SamplingParams
from model.generation import sampling
from model.generation.sampling import GREEDY, RANDOM, row_sampling_params, sample_next

_sample = jax.jit(sample_next, static_argnames="variant")


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def _draw(logits: np.ndarray, rows: list[SamplingParams], keys: jax.Array) -> np.ndarray:
    params, variant = row_sampling_params(rows)
    return np.asarray(_sample(jnp.asarray(logits), params, keys, variant=variant))


def _keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_is_exactly_argmax_including_ties():
    logits = _logits(16, 300)
    logits[3, [7, 100, 250]] = logits[3].max() + 1.0  # a tie: the first index wins, as with np.argmax
    tokens = _draw(logits, [SamplingParams("greedy")] * 16, _keys(16))
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    assert tokens[3] == 7


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = _logits(6, 300)
    rows = [
        SamplingParams("greedy"),
        SamplingParams("top_k", temperature=0.0),
        SamplingParams("top_p"),
        SamplingParams("random", temperature=0.0),
        SamplingParams("min_p"),
        SamplingParams("top_k", top_k=1),
    ]
    tokens = _draw(logits, rows, _keys(6))
    for row in (0, 1, 3, 5):
        assert tokens[row] == np.argmax(logits[row]), row


@pytest.mark.parametrize("sampler", ["top_k", "top_p", "random", "min_p"])
def test_temperature_towards_zero_equals_greedy(sampler):
    logits = _logits(32, 500, seed=1)
    tokens = _draw(logits, [SamplingParams(sampler, temperature=1e-4)] * 32, _keys(32, seed=3))
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))


def test_top_k_never_leaves_the_top_k_and_reaches_all_of_them():
    vocab, draws = 400, 512
    ks = [1, 2, 3, 5, 8, 13, 40]
    base = _logits(len(ks), vocab, seed=2, scale=0.5)  # flat enough that every top-k token gets drawn
    for row, k in enumerate(ks):
        logits = np.repeat(base[row : row + 1], draws, axis=0)
        tokens = _draw(logits, [SamplingParams("top_k", top_k=k)] * draws, _keys(draws, seed=row))
        top = set(np.argsort(-base[row])[:k].tolist())
        assert set(tokens.tolist()) <= top, k
        assert set(tokens.tolist()) == top, k  # not secretly greedy


def _nucleus(logits_row: np.ndarray, p: float, temperature: float) -> set[int]:
    probs = _softmax(logits_row / temperature)
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    return set(order[:size].tolist())


@pytest.mark.parametrize(
    "p, temperature, scale",
    [
        (0.5, 1.0, 3.0),  # a small nucleus: found among the top candidates
        (0.95, 1.0, 0.3),  # nearly flat over 2048 tokens: the nucleus exceeds the candidates, bisection
    ],
)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p, temperature, scale):
    vocab, draws = 2048, 1024
    row = _logits(1, vocab, seed=4, scale=scale)[0]
    nucleus = _nucleus(row, p, temperature)
    if scale < 1:
        assert len(nucleus) > sampling.TOP_P_CANDIDATES  # this case must exercise the fallback
    probs = _softmax(row / temperature)
    mass = probs[list(nucleus)].sum()
    assert mass >= p and mass - probs[list(nucleus)].min() < p  # the smallest such set
    tokens = _draw(np.repeat(row[None], draws, 0), [SamplingParams("top_p", top_p=p, temperature=temperature)] * draws,
                   _keys(draws, seed=5))
    assert set(tokens.tolist()) <= nucleus
    if len(nucleus) <= 20:
        assert set(tokens.tolist()) == nucleus


def test_top_p_cutoff_matches_between_candidates_and_bisection():
    scaled = jnp.asarray(_logits(8, 1024, seed=6, scale=1.0))
    scaled = scaled - scaled.max(-1, keepdims=True)
    p = jnp.asarray(np.linspace(0.05, 0.9, 8), jnp.float32)
    mass = jnp.exp(scaled).sum(-1)
    bisected = sampling._bisect_cutoff(scaled, p * mass)
    top = jax.lax.top_k(scaled, 1024)[0]
    from_candidates = sampling._nucleus_cutoff(scaled, top, p, jnp.ones(8, bool))
    np.testing.assert_array_equal(np.asarray(bisected), np.asarray(from_candidates))
    for row in range(8):
        nucleus = _nucleus(np.asarray(scaled[row]), float(p[row]), 1.0)
        assert set(np.flatnonzero(np.asarray(scaled[row]) >= float(bisected[row])).tolist()) == nucleus


def test_min_p_keeps_tokens_with_probability_at_least_min_p_times_the_best():
    vocab, draws, min_p, temperature = 300, 1024, 0.2, 0.7
    row = _logits(1, vocab, seed=7, scale=1.5)[0]
    probs = _softmax(row / temperature)
    allowed = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    assert 1 < len(allowed) < vocab
    tokens = _draw(np.repeat(row[None], draws, 0),
                   [SamplingParams("min_p", min_p=min_p, temperature=temperature)] * draws, _keys(draws, seed=8))
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) > 1


@pytest.mark.parametrize("sampler", ["random", "top_k"])
def test_sampling_frequencies_follow_the_tempered_distribution(sampler):
    draws, temperature = 8000, 0.8
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.3, 1.5], np.float32)
    rows = [SamplingParams(sampler, temperature=temperature, top_k=4)] * draws
    tokens = _draw(np.repeat(row[None], draws, 0), rows, _keys(draws, seed=9))
    probs = _softmax(row / temperature)
    if sampler == "top_k":
        keep = np.argsort(-row)[:4]
        probs = np.where(np.isin(np.arange(8), keep), probs, 0.0)
        probs /= probs.sum()
    counts = np.bincount(tokens, minlength=8)
    expected = probs * draws
    # Each count within 5 standard deviations of its binomial expectation.
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - probs)) + 1e-9), (counts, expected)


def test_seeded_sampling_is_reproducible_and_independent_of_the_rest_of_the_batch():
    vocab = 600
    logits = _logits(5, vocab, seed=10, scale=1.0)
    rows = [
        SamplingParams("top_k", top_k=5),
        SamplingParams("top_p", top_p=0.8),
        SamplingParams("random", temperature=1.3),
        SamplingParams("min_p", min_p=0.1),
        SamplingParams("greedy"),
    ]
    keys = _keys(5, seed=11)
    together = _draw(logits, rows, keys)
    np.testing.assert_array_equal(together, _draw(logits, rows, keys))
    others = [SamplingParams("top_k", top_k=300), SamplingParams("top_p", top_p=0.99), SamplingParams("greedy")]
    other_logits = _logits(3, vocab, seed=12)
    for row in range(5):
        alone = _draw(logits[row : row + 1], rows[row : row + 1], keys[row : row + 1])
        assert alone[0] == together[row], row
        # Other rows change the compiled variant (k = 512 instead of 8, a top-p fallback): same token.
        mixed = _draw(np.concatenate([other_logits, logits[row : row + 1]]), others + [rows[row]],
                      jnp.concatenate([_keys(3, seed=13), keys[row : row + 1]]))
        assert mixed[-1] == together[row], row
    # The key does matter: the same row under 64 keys gives many tokens.
    many = _draw(np.repeat(logits[2:3], 64, 0), [rows[2]] * 64, _keys(64, seed=15))
    assert len(set(many.tolist())) > 10


def test_raw_uint32_keys_give_the_same_draws_as_typed_keys():
    logits = _logits(4, 200, seed=16, scale=1.0)
    rows = [SamplingParams("top_k", top_k=20), SamplingParams("random"), SamplingParams("top_p"),
            SamplingParams("min_p")]
    keys = _keys(4, seed=17)
    np.testing.assert_array_equal(_draw(logits, rows, keys), _draw(logits, rows, jax.random.key_data(keys)))


def test_inverse_cdf_never_returns_an_excluded_token_even_at_u_near_one():
    excluded = -jnp.inf
    scaled = jnp.asarray([[0.0, -1.0] + [excluded] * 302, [excluded] * 200 + [0.0] + [excluded] * 103])
    u = jnp.asarray([1.0 - 2.0**-24, 1.0 - 2.0**-24])
    tokens = np.asarray(sampling._sample_inverse_cdf(scaled, u))
    assert tokens.tolist() == [1, 200]
    tokens = np.asarray(sampling._sample_inverse_cdf(scaled, jnp.zeros(2)))
    assert tokens.tolist() == [0, 200]


def test_row_sampling_params_folds_equivalent_samplers():
    params, variant = row_sampling_params(
        [SamplingParams("top_p", top_p=1.0), SamplingParams("min_p", min_p=0.0), SamplingParams("top_k", top_k=1),
         SamplingParams("top_k", top_k=100)],
        vocabulary_size=50,
    )
    assert params.mode.tolist() == [RANDOM, RANDOM, GREEDY, RANDOM]
    assert variant == sampling.SamplingVariant(all_greedy=False, max_top_k=None, has_top_p=False, full_vocab=True)
    with pytest.raises(ValueError, match="at least one row"):
        row_sampling_params([])


def test_variants_are_few_and_top_k_is_a_power_of_two():
    choices = [
        SamplingParams("greedy"),
        SamplingParams("top_k", temperature=0.0),
        *(SamplingParams("top_k", top_k=k) for k in (2, 5, 9, 17, 40, 50, 64, 100)),
        SamplingParams("top_p", top_p=0.7),
        SamplingParams("random"),
        SamplingParams("min_p"),
    ]
    rng = np.random.default_rng(18)
    variants = set()
    for _ in range(400):
        rows = [choices[i] for i in rng.integers(0, len(choices), size=rng.integers(1, 6))]
        _, variant = row_sampling_params(rows)
        variants.add(variant)
        if variant.max_top_k is not None:
            largest = max(r.top_k for r in rows if r.sampler == "top_k" and not r.is_greedy)
            assert variant.max_top_k >= largest and variant.max_top_k & (variant.max_top_k - 1) == 0
    # k rounds to {8, 16, 32, 64, 128} or none; top-p, full-vocabulary flags; plus all-greedy.
    assert len(variants) <= 6 * 3 + 1
    assert sampling.SamplingVariant(all_greedy=True) in variants
    _, variant = row_sampling_params([SamplingParams("top_k", temperature=0.0)] * 3)
    assert variant.all_greedy


def test_all_greedy_and_top_k_batches_compile_without_a_full_sort():
    # The 49k-vocabulary cost model relies on XLA keeping its TopK kernel rather than sorting every row.
    logits = jnp.zeros((4, 4096), jnp.float32)
    for rows in ([SamplingParams("greedy")] * 4, [SamplingParams("top_k", top_k=40)] * 4,
                 [SamplingParams("top_p"), SamplingParams("top_k")] * 2):
        params, variant = row_sampling_params(rows)
        hlo = _sample.lower(logits, params, _keys(4), variant=variant).compile().as_text()
        assert " sort(" not in hlo, variant


def test_modes_cover_every_streaming_sampler():
    assert set(sampling._MODES) == set(STREAMING_SAMPLERS)
    assert len(set(sampling._MODES.values())) == len(STREAMING_SAMPLERS)
