"""Log-probabilities of generated tokens, computed inside the jitted steps from the logits they already hold.

`token_logprobs` is what a step calls after sampling, when a request asks for `logprobs = k`: the chosen
token's log-probability and the k most likely tokens with theirs, all under the model's own distribution
(the raw logits' log-softmax, before temperature or top-k / top-p filtering), as vLLM and the OpenAI API
report them. `k` is static (one program per value; the engine rounds it up to LOGPROBS_BUCKET), so a batch mixing
requests with and without logprobs runs one program and the host drops what a request did not ask for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The top-k width a step computes, rounded up to a multiple of this: a few values of k share one program.
LOGPROBS_BUCKET = 4
MAX_LOGPROBS = 20


def bucket_k(k: int) -> int:
    """The static top-k width for requests asking for up to `k` alternatives (0: none, no extra work)."""
    if k <= 0:
        return 0
    return min(-(-k // LOGPROBS_BUCKET) * LOGPROBS_BUCKET, MAX_LOGPROBS)


def token_logprobs(logits: jax.Array, chosen: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(chosen) [B], top-k ids [B, k] int32, top-k log-probs [B, k]) from logits [B, V] and chosen [B].

    The top k come in decreasing order of probability (ties: lower id first, as `lax.top_k`).
    """
    assert logits.ndim == 2 and chosen.shape == logits.shape[:1], (logits.shape, chosen.shape)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen_lp = jnp.take_along_axis(log_probs, chosen[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(log_probs, k)
    return chosen_lp, top_ids.astype(jnp.int32), top_lp
