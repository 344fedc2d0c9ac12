"""Beam and contrastive search on tiny models, checked against step-by-step references without a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.backbone import weight_shapes
from model.config import LlamaConfig
from model.generation.search import beam_search, contrastive_search

TINY = LlamaConfig(vocabulary_size=48, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=8,
                   intermediate_dim=16, max_sequence_length=64)
PROMPTS = [[5, 9, 11, 2, 7], [3], [40, 1, 30], [12, 12, 12, 12, 12, 12, 12]]


def _random_params(config: LlamaConfig, seed: int = 0, scale: float = 0.8) -> transformer.Params:
    rng = np.random.default_rng(seed)
    params: dict = {"layers": {}}
    for path, shape in weight_shapes(config).items():
        value = np.ones(shape) if path.endswith("norm") else rng.standard_normal(shape) * scale
        tree, name = (params["layers"], path.split("/", 1)[1]) if path.startswith("layers/") else (params, path)
        tree[name] = jnp.asarray(value, jnp.float32)
    return params


def _batch(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return ids, np.asarray([len(p) for p in prompts], np.int32)


_WIDTH = 16  # references run every sequence padded to this width: one compiled program for all of them


@jax.jit
def _hidden_states(params, ids: jax.Array) -> jax.Array:
    """Final hidden states [N, W, M] of right-padded sequences by one full forward pass, no cache (causal
    attention: the padding after a sequence cannot change its positions)."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    return transformer.forward(params, TINY, ids, positions)[0]


def _padded(sequences: list[list[int]]) -> jax.Array:
    ids = np.zeros((len(sequences), _WIDTH), np.int32)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)] = sequence
    return jnp.asarray(ids)


def _next_logits(params, sequence: list[int]) -> np.ndarray:
    hidden = _hidden_states(params, _padded([sequence]))[0, len(sequence) - 1]
    return np.asarray(transformer.logits(params, hidden))


def _greedy_reference(params, prompt: list[int], new_tokens: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(new_tokens):
        sequence.append(int(np.argmax(_next_logits(params, sequence))))
    return sequence


def _contrastive_reference(params, prompt: list[int], new_tokens: int, k: int, alpha: float) -> list[int]:
    """Su et al.'s rule, recomputing every hidden state from scratch."""
    sequence = list(prompt)
    for _ in range(new_tokens):
        probs = np.asarray(jax.nn.softmax(_next_logits(params, sequence)))
        candidates = np.argsort(-probs, kind="stable")[:k]
        n = len(sequence) + 1
        hidden = np.asarray(_hidden_states(params, _padded([sequence + [int(c)] for c in candidates])))[:, :n]
        unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
        similarity = np.einsum("cpm,cm->cp", unit[:, :-1], unit[:, -1]).max(-1)
        scores = (1 - alpha) * probs[candidates] - alpha * similarity
        sequence.append(int(candidates[int(np.argmax(scores))]))
    return sequence


def test_beam_with_one_beam_is_greedy():
    params = _random_params(TINY)
    ids, lengths = _batch(PROMPTS)
    budgets = np.asarray([6, 9, 1, 4], np.int32)
    out = beam_search(params, TINY, ids, lengths, budgets, max_length=16, num_beams=1)
    for row, prompt in enumerate(PROMPTS):
        expected = _greedy_reference(params, prompt, int(budgets[row]))
        assert int(out.lengths[row, 0]) == len(expected)
        assert np.asarray(out.token_ids[row, 0, : len(expected)]).tolist() == expected, row
    assert not np.asarray(out.stopped).any()


def test_contrastive_with_alpha_zero_is_greedy():
    params = _random_params(TINY, seed=1)
    ids, lengths = _batch(PROMPTS)
    out = contrastive_search(params, TINY, ids, lengths, np.full(4, 7, np.int32), max_length=14, k=4, alpha=0.0)
    for row, prompt in enumerate(PROMPTS):
        expected = _greedy_reference(params, prompt, min(7, 14 - len(prompt)))
        assert int(out.lengths[row]) == len(expected)
        assert np.asarray(out.token_ids[row, : len(expected)]).tolist() == expected, row


def test_contrastive_follows_the_reference_rule():
    params = _random_params(TINY, seed=2, scale=0.5)
    prompts = PROMPTS[:3]
    ids, lengths = _batch(prompts)
    out = contrastive_search(params, TINY, ids, lengths, np.full(3, 5, np.int32), max_length=12, k=3, alpha=0.6)
    greedy_differs = False
    for row, prompt in enumerate(prompts):
        expected = _contrastive_reference(params, prompt, 5, k=3, alpha=0.6)
        assert np.asarray(out.token_ids[row, : len(expected)]).tolist() == expected, row
        greedy_differs |= expected != _greedy_reference(params, prompt, 5)
    assert greedy_differs  # alpha 0.6 actually changed something, so the test can see the similarity term


# A bigram model built by hand: one-hot embeddings, attention and MLP outputs zeroed, so the logits after a
# token are a row of `table` whatever came before. V = M = 8.
def _bigram_params(table: np.ndarray) -> tuple[transformer.Params, LlamaConfig]:
    v = table.shape[0]
    config = LlamaConfig(vocabulary_size=v, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=v,
                         intermediate_dim=4, max_sequence_length=32, layer_norm_epsilon=1e-12)
    params = {name: jnp.zeros(shape) for name, shape in weight_shapes(config).items() if "/" not in name}
    params["layers"] = {name.split("/")[1]: jnp.zeros(shape) for name, shape in weight_shapes(config).items()
                        if "/" in name}
    params["token_embedding"] = jnp.eye(v)
    params["final_norm"] = jnp.full((v,), v**-0.5)  # RMS-normed one-hot is sqrt(V) * one-hot
    params["lm_head"] = jnp.asarray(table, jnp.float32)
    return params, config


def _bigram_table() -> np.ndarray:
    p = np.full((8, 8), 1e-6)
    p[0, 1], p[0, 2] = 0.55, 0.45  # greedy takes 1 ...
    p[1, 3:8] = 0.2  # ... where every continuation is unlikely,
    p[2, 4] = 0.95  # while 2 leads to a near-certain 4.
    p[3:, 5] = 0.9
    return np.log(p / p.sum(-1, keepdims=True))


def _log_likelihood(table: np.ndarray, sequence: list[int], prompt_length: int) -> float:
    return float(sum(table[a, b] for a, b in zip(sequence[prompt_length - 1 : -1], sequence[prompt_length:])))


def test_beam_finds_a_more_likely_sequence_than_greedy():
    table = _bigram_table()
    params, config = _bigram_params(table)
    ids, lengths, budgets = np.asarray([[6, 0]], np.int32), np.asarray([2], np.int32), np.asarray([2], np.int32)
    greedy = beam_search(params, config, ids, lengths, budgets, max_length=8, num_beams=1)
    beam = beam_search(params, config, ids, lengths, budgets, max_length=8, num_beams=3)
    greedy_tokens = np.asarray(greedy.token_ids[0, 0, :4]).tolist()
    beam_tokens = np.asarray(beam.token_ids[0, 0, :4]).tolist()
    assert greedy_tokens[:3] == [6, 0, 1]
    assert beam_tokens == [6, 0, 2, 4]
    assert _log_likelihood(table, beam_tokens, 2) > _log_likelihood(table, greedy_tokens, 2) + 1.0
    # Reported scores are the sequences' log-likelihoods, and the beams come best first.
    for i in range(3):
        tokens = np.asarray(beam.token_ids[0, i, :4]).tolist()
        assert float(beam.log_probs[0, i]) == pytest.approx(_log_likelihood(table, tokens, 2), abs=1e-4)
    assert np.all(np.diff(np.asarray(beam.log_probs[0])) <= 0)
    assert len({tuple(np.asarray(beam.token_ids[0, i, :4]).tolist()) for i in range(3)}) == 3


def test_stop_tokens_end_hypotheses_and_are_not_counted_in_lengths():
    table = _bigram_table()
    params, config = _bigram_params(table)
    ids, lengths, budgets = np.asarray([[0], [3]], np.int32), np.asarray([1, 1], np.int32), np.asarray([6, 6], np.int32)
    beam = beam_search(params, config, ids, lengths, budgets, max_length=10, num_beams=2, stop_token_ids=(4, 5))
    # 0 -> 2 -> 4 (stop) scores log(.45 * .95) > any path through 1; 3 -> 5 (stop) at once.
    assert np.asarray(beam.stopped[:, 0]).tolist() == [True, True]
    assert np.asarray(beam.lengths[:, 0]).tolist() == [2, 1]
    assert np.asarray(beam.token_ids[0, 0, :3]).tolist() == [0, 2, 4]
    assert int(beam.token_ids[1, 0, 1]) == 5
    contrastive = contrastive_search(params, config, ids, lengths, budgets, max_length=10, k=2, alpha=0.0,
                                     stop_token_ids=(5,))
    # Greedy: 0 -> 1 -> 3 (first of five equal) -> 5 (stop): the stop token sits right after the kept tokens.
    assert np.asarray(contrastive.stopped).tolist() == [True, True]
    assert np.asarray(contrastive.lengths).tolist() == [3, 1]
    assert np.asarray(contrastive.token_ids[0, :4]).tolist() == [0, 1, 3, 5]


def test_budgets_and_max_length_bound_every_row():
    params = _random_params(TINY, seed=3)
    ids, lengths = _batch(PROMPTS)
    budgets = np.asarray([0, 20, 2, 20], np.int32)
    for out in (
        beam_search(params, TINY, ids, lengths, budgets, max_length=10, num_beams=2),
        contrastive_search(params, TINY, ids, lengths, budgets, max_length=10, k=2, alpha=0.5),
    ):
        out_lengths = np.asarray(out.lengths).reshape(4, -1)[:, 0]
        assert out_lengths.tolist() == [5, 10, 5, 10]  # no budget; to max_length; 2 new; to max_length
        token_ids = np.asarray(out.token_ids).reshape(4, -1, 10)[:, 0]
        for row, prompt in enumerate(PROMPTS):
            assert token_ids[row, : len(prompt)].tolist() == prompt
