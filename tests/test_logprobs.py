"""Generated tokens' log-probs (model/generation/logprobs.py) on fake logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model.generation import logprobs


def test_chosen_and_top_k_are_the_raw_distributions_log_probs():
    logits = jnp.asarray([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 3.0, 0.5]], jnp.float32)
    chosen, top_ids, top_lp = logprobs.token_logprobs(logits, jnp.asarray([2, 3]), 3)
    expected = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, [expected[0, 2], expected[1, 3]], atol=1e-6)
    assert top_ids.tolist() == [[0, 2, 1], [2, 3, 0]]  # most likely first; ties: lower id first
    np.testing.assert_allclose(top_lp, np.take_along_axis(expected, np.asarray(top_ids), -1), atol=1e-6)
    assert np.exp(np.asarray(top_lp)).sum(-1).max() <= 1.0 + 1e-6


def test_k_is_bucketed_so_nearby_values_share_a_program():
    assert [logprobs.bucket_k(k) for k in (0, 1, 4, 5, 20, 50)] == [0, 4, 4, 8, 20, 20]
