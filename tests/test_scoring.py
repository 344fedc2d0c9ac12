"""Scoring (model/generation/scoring.py): log-likelihoods packed like prefill, against `lm.score` and transformers."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from model.generation import scoring
from model.generation.scoring import ScoreRequest

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def _reference(lm, context: list[int], continuation: list[int]) -> tuple[float, list[float], bool]:
    """log p(continuation | context) from `lm.score`'s per-token losses over the whole sequence, unpacked."""
    ids = np.asarray([context + continuation], np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((1, 1), np.int32)], axis=1)
    losses = lm.score(ids, scoring_mode="loss", target_ids=targets)[0]
    logits = lm.score(ids)[0]
    span = slice(len(context) - 1, len(context) + len(continuation) - 1)
    greedy = bool((logits[span].argmax(-1) == np.asarray(continuation)).all())
    return float(-losses[span].sum()), [float(-x) for x in losses[span]], greedy


def _pairs(seed: int, count: int, vocabulary: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(3, vocabulary, rng.integers(1, 40)).tolist(), rng.integers(3, vocabulary, rng.integers(1, 9)).tolist())
        for _ in range(count)
    ]


def test_scores_equal_lm_score_whatever_the_packing(tiny_lm):
    pairs = _pairs(0, 24, tiny_lm.backbone.config.vocabulary_size)
    expected = [_reference(tiny_lm, c, x) for c, x in pairs]
    params = tiny_lm.backbone.params()
    config = tiny_lm.backbone.config
    requests = [ScoreRequest(i, c, x, per_token=True) for i, (c, x) in enumerate(pairs)]
    # Several packings of the same requests: all in one chunk, one at a time, reversed in chunks of 5.
    for chunk, order in ((256, requests), (1, requests), (5, requests[::-1])):
        results = {r.request_id: r for r in scoring.score(params, config, order, 64, chunk=chunk)}
        for i, (total, per_token, greedy) in enumerate(expected):
            result = results[i]
            assert result.error is None
            assert result.tokens == len(pairs[i][1])
            np.testing.assert_allclose(result.logprob, total, atol=1e-5)
            np.testing.assert_allclose(result.token_logprobs, per_token, atol=1e-5)
            assert result.is_greedy == greedy


def test_greedy_flag_follows_the_argmax(tiny_lm):
    context = [5, 17, 33, 8]
    ids = list(context)
    for _ in range(4):  # the greedy continuation, token by token
        ids.append(int(tiny_lm.score(np.asarray([ids], np.int32))[0, -1].argmax()))
    greedy = ids[len(context) :]
    other = greedy[:2] + [(greedy[2] + 1) % tiny_lm.backbone.config.vocabulary_size] + greedy[3:]
    results = tiny_lm.score_continuations([context, context], [greedy, other])
    assert results[0].is_greedy and not results[1].is_greedy
    assert results[0].logprob > results[1].logprob


def test_windows_cover_every_scored_token_once_with_context():
    for total, first, max_length in [(10, 3, 16), (100, 1, 16), (101, 40, 17), (33, 1, 32), (34, 1, 32), (500, 7, 64)]:
        spans = scoring.windows(total, first, max_length)
        covered = [p for _, a, b in spans for p in range(a, b)]
        assert covered == list(range(first, total))
        for s, a, b in spans:
            assert b - 1 - s <= max_length  # the window's input fits
            assert s <= a - 1  # the first scored token's predecessor is in the input
            if s > 0:
                assert a - s >= max_length // 2  # a rolled window keeps half a window of context


def test_rolling_equals_the_sum_of_its_windows(tiny_lm):
    rng = np.random.default_rng(3)
    document = rng.integers(3, tiny_lm.backbone.config.vocabulary_size, 90).tolist()
    max_length = 24
    [result] = scoring.score(
        tiny_lm.backbone.params(), tiny_lm.backbone.config, [ScoreRequest("doc", [], document)], max_length
    )
    expected = 0.0
    for s, a, b in scoring.windows(len(document), 1, max_length):
        expected += _reference(tiny_lm, document[s:a], document[a:b])[0]
    assert result.tokens == len(document) - 1
    np.testing.assert_allclose(result.logprob, expected, atol=1e-4)
    # Fitting in one window, the same document is one unrolled sequence.
    [whole] = scoring.score(tiny_lm.backbone.params(), tiny_lm.backbone.config, [ScoreRequest(0, [], document)], 128)
    np.testing.assert_allclose(whole.logprob, _reference(tiny_lm, document[:1], document[1:])[0], atol=1e-4)


def test_bad_requests_become_errors_not_exceptions(tiny_lm):
    vocabulary = tiny_lm.backbone.config.vocabulary_size
    results = tiny_lm.score_continuations([[1, 2], [], [1], [1, 2]], [[], [4], [vocabulary + 5], [7]])
    assert "no tokens" in results[0].error
    assert "needs 2 tokens" in results[1].error
    assert str(vocabulary + 5) in results[2].error
    assert results[3].error is None and results[3].tokens == 1


def test_text_pairs_split_where_the_context_ends(tiny_lm):
    [result] = tiny_lm.score_continuations(["The quick brown"], [" fox jumps"], per_token=True)
    context, continuation = tiny_lm._pair_ids("The quick brown", " fox jumps")
    whole = tiny_lm.preprocessor._ids("The quick brown fox jumps", add_end=False)
    assert context + continuation == whole
    assert result.tokens == len(continuation) and len(result.token_logprobs) == len(continuation)


@pytest.mark.parametrize("name", ["hf_llama2_tiny", "hf_llama31_tiny"])
def test_log_likelihoods_match_transformers(name):
    """Every split of each golden prompt into (context, continuation): transformers' log-likelihood, from its
    float32 logits at every position (tests/golden/make_hf_fixtures.py), within 1e-3."""
    from model.causal_lm import LlamaCausalLM

    lm = LlamaCausalLM.from_preset(str(FIXTURES / name), dtype="float32")
    golden = json.loads((GOLDEN / f"logits_{name}.json").read_text())
    worst = 0.0
    for prompt in golden["prompts"]:
        ids = prompt["token_ids"]
        logits = np.asarray(prompt["logits"], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        token_lp = log_probs[np.arange(len(ids) - 1), ids[1:]]  # log p(ids[t + 1] | ids[: t + 1])
        splits = range(1, len(ids))
        results = lm.score_continuations([ids[:k] for k in splits], [ids[k:] for k in splits])
        for k, result in zip(splits, results):
            worst = max(worst, abs(result.logprob - token_lp[k - 1 :].sum()))
    assert worst <= 1e-3, worst


@pytest.mark.slow
def test_demo_log_likelihoods_match_transformers(demo_lm):
    """The demo model (float32) against transformers on the same GGUF (tests/golden/make_score_golden.py)."""
    golden = json.loads((GOLDEN / "scores_demo.json").read_text())["pairs"]
    results = demo_lm.score_continuations(
        [p["context_ids"] for p in golden], [p["continuation_ids"] for p in golden], per_token=True, max_length=1024
    )
    worst = max(abs(r.logprob - p["logprob"]) for r, p in zip(results, golden))
    assert worst <= 1e-3, worst
    assert [r.is_greedy for r in results] == [p["is_greedy"] for p in golden]
    # The document again with a short window: rolling changes the context of later tokens, so only the first
    # window's tokens keep transformers' figures exactly; the sum stays close.
    document = golden[-1]
    [rolled] = demo_lm.score_continuations([[]], [document["continuation_ids"]], per_token=True, max_length=128)
    np.testing.assert_allclose(rolled.token_logprobs[:127], document["token_logprobs"][:127], atol=1e-3)
    assert rolled.tokens == len(document["token_logprobs"])
