"""Repetition, presence and frequency penalties and logit bias, in plain numpy: the reference the jitted
sampling kernel is tested against (not used on the hot path).

The semantics are `SamplingParams`' (model.generation.requests), as transformers and vLLM apply them:
1. repetition_penalty r: every token in the prompt or among the generated tokens has its logit l replaced by
   l / r when l > 0, else l * r (so r > 1 always makes a seen token less likely);
2. frequency_penalty f and presence_penalty p (OpenAI's): l - f * count - p * (count > 0), where count is how
   often the token was generated (prompt tokens do not count, as in OpenAI's and vLLM's definitions);
3. logit_bias: added last, so an explicit bias wins over the penalties.
Temperature and the sampler come after all of this.

Shapes: `logits` [B, V] (or [V] for one row), `generated_counts` [B, V] integers, `prompt_token_set` a bool
mask [B, V] or one collection of token ids per row; `params` one SamplingParams per row (or one for all).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from model.generation.requests import SamplingParams


def apply_penalties(
    logits: np.ndarray,
    generated_counts: np.ndarray,
    prompt_token_set: np.ndarray | Sequence[Collection[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> np.ndarray:
    """The logits after penalties and bias, as a new float32 array of the same shape.

    Example:
        >>> out = apply_penalties(np.array([2.0, -1.0, 0.5]), np.array([1, 0, 0]), [{1}],
        ...                       SamplingParams(repetition_penalty=2.0))
        >>> out.tolist()
        [1.0, -2.0, 0.5]
    """
    logits = np.asarray(logits, np.float32)
    single = logits.ndim == 1
    logits = np.atleast_2d(logits).copy()
    counts = np.atleast_2d(np.asarray(generated_counts))
    b, v = logits.shape
    if counts.shape != (b, v):
        raise ValueError(f"generated_counts must have the logits' shape {(b, v)}, got {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("generated_counts must be >= 0")
    prompt_mask = _prompt_mask(prompt_token_set, b, v, single)
    rows = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(rows) != b:
        raise ValueError(f"params must be one SamplingParams or one per row ({b}), got {len(rows)}")

    for i, row in enumerate(rows):
        seen = prompt_mask[i] | (counts[i] > 0)
        if row.repetition_penalty != 1.0:
            penalized = np.where(logits[i] > 0, logits[i] / row.repetition_penalty, logits[i] * row.repetition_penalty)
            logits[i] = np.where(seen, penalized, logits[i])
        logits[i] -= row.frequency_penalty * counts[i] + row.presence_penalty * (counts[i] > 0)
        for token, bias in row.logit_bias:
            if token >= v:
                raise ValueError(f"logit_bias names token {token}, beyond the vocabulary of {v}")
            logits[i, token] += bias
    return logits[0] if single else logits


def _prompt_mask(prompt_token_set: np.ndarray | Sequence[Collection[int]], b: int, v: int, single: bool) -> np.ndarray:
    """The prompt tokens as a bool mask [B, V]."""
    if isinstance(prompt_token_set, np.ndarray) and prompt_token_set.dtype == bool:
        mask = np.atleast_2d(prompt_token_set)
        if mask.shape != (b, v):
            raise ValueError(f"a prompt_token_set mask must have shape {(b, v)}, got {mask.shape}")
        return mask
    sets = [prompt_token_set] if single and not _is_nested(prompt_token_set) else list(prompt_token_set)
    if len(sets) != b:
        raise ValueError(f"prompt_token_set must hold one collection of ids per row ({b}), got {len(sets)}")
    mask = np.zeros((b, v), bool)
    for i, ids in enumerate(sets):
        ids = np.fromiter((int(t) for t in ids), np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            raise ValueError(f"prompt_token_set row {i} holds ids outside [0, {v}): {sorted(set(ids.tolist()))[:5]}")
        mask[i, ids] = True
    return mask


def _is_nested(value: object) -> bool:
    items = list(value) if not isinstance(value, (str, bytes)) else []
    return bool(items) and all(isinstance(item, Collection) for item in items)
