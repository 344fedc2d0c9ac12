"""Repetition, presence and frequency penalties and logit bias inside the jitted steps.

The semantics are `SamplingParams`' (see `model.generation.penalties_reference`, the numpy reference these are
tested against): repetition_penalty on every token of the prompt or the completion so far, frequency and
presence penalties on generated tokens, logit_bias last; temperature and the sampler come after.

A step gets a `Penalties` only when some row of the call asks for one (None otherwise: no [B, V] arrays, no
extra work, a program of its own). The host builds it per call from each slot's prompt and generated tokens; the
decode step counts the tokens it samples into it as it goes.

Example:
    >>> p = build([SamplingParams(presence_penalty=1.0)], [[5, 6]], [[7]], vocabulary_size=10)
    >>> float(apply(jnp.zeros((1, 10)), p)[0, 7])
    -1.0
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.generation.requests import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Penalties:
    repetition: jax.Array  # [B] float32, 1 = off
    presence: jax.Array  # [B] float32
    frequency: jax.Array  # [B] float32
    bias: jax.Array  # [B, V] float32: logit_bias, dense
    prompt_seen: jax.Array  # [B, V] bool: tokens of the prompt
    counts: jax.Array  # [B, V] int32: times each token was generated so far


def build(
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    vocabulary_size: int,
) -> Penalties | None:
    """The penalties of a call's rows (host numpy), or None when no row has any."""
    if not any(p.has_penalties for p in params):
        return None
    b, v = len(params), vocabulary_size
    bias = np.zeros((b, v), np.float32)
    seen = np.zeros((b, v), bool)
    counts = np.zeros((b, v), np.int32)
    for i, (p, prompt, tokens) in enumerate(zip(params, prompts, generated)):
        if not p.has_penalties:
            continue
        for token, value in p.logit_bias:
            bias[i, token] = value
        seen[i, np.asarray(prompt, np.int64)] = True
        np.add.at(counts[i], np.asarray(tokens, np.int64), 1)
    floats = lambda name: np.asarray([getattr(p, name) for p in params], np.float32)  # noqa: E731
    return Penalties(floats("repetition_penalty"), floats("presence_penalty"), floats("frequency_penalty"), bias, seen,
                     counts)


def apply(logits: jax.Array, p: Penalties) -> jax.Array:
    """The logits [B, V] after penalties and bias."""
    generated = p.counts > 0
    r = p.repetition[:, None]
    logits = jnp.where(p.prompt_seen | generated, jnp.where(logits > 0, logits / r, logits * r), logits)
    logits = logits - p.frequency[:, None] * p.counts - p.presence[:, None] * generated
    return logits + p.bias


def count(p: Penalties, tokens: jax.Array, active: jax.Array) -> Penalties:
    """`p` after each active row generated `tokens` [B]."""
    rows = jnp.arange(tokens.shape[0])
    return dataclasses.replace(p, counts=p.counts.at[rows, tokens].add(active.astype(jnp.int32)))
