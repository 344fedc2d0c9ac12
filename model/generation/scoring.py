"""Scoring: the log-likelihood of continuations given contexts, packed like prefill, with no decode.

A `ScoreRequest` asks for log p(continuation | context). Its tokens run as one sequence (context, then the
continuation without its last token, which predicts nothing that is scored); several such sequences are
packed side by side into rows of PACK_TOKENS tokens, each attending only to itself (`segment_ids`), exactly as
the engine's prefill packs prompts (`scheduler.plan_packs`). The LM head runs only where a continuation token
is predicted, so a scoring row costs what a prefill row costs plus one head row per scored token.

A sequence longer than the context window is scored in rolling windows (as lm-evaluation-harness'
`loglikelihood_rolling`): each window predicts a chunk of the continuation from the tokens just before it, at
least half a window of them once the document is longer than one window; the per-window sums add up. An empty
context scores a whole document, its first token unscored (nothing predicts it).

Example:
    >>> results = score(params, config, [ScoreRequest("a", ctx_ids, cont_ids)], max_length=1024)
    >>> results[0].logprob, results[0].is_greedy
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from model import transformer
from model.config import LlamaConfig
from model.generation.scheduler import MIN_PACK_BUCKET, bucket, plan_packs, segment_bound

# Segments a scoring row holds at most; sequences cost no LM-head row of their own here (only their scored
# tokens do), so this only bounds how finely a row is cut.
MAX_SEGMENTS = 64
SCORED_STEP = 8


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """log p(continuation_ids | context_ids). `per_token`: also return each continuation token's log-prob."""

    request_id: Hashable
    context_ids: Sequence[int]
    continuation_ids: Sequence[int]
    per_token: bool = False


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """`logprob`: the sum over the continuation's scored tokens (`tokens` of them); `is_greedy`: every one of
    them is the argmax of its distribution; `error` set (and the figures 0) when the request could not run."""

    request_id: Hashable
    logprob: float
    tokens: int
    is_greedy: bool
    context_tokens: int
    token_logprobs: tuple[float, ...] | None = None
    error: str | None = None


@dataclasses.dataclass
class ScoreStats:
    """Tokens run through the model (inputs, the packing's padding excluded) and the seconds it took."""

    input_tokens: int = 0
    scored_tokens: int = 0
    seconds: float = 0.0
    calls: int = 0


def target_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target), target is the argmax) per row: logits [..., V] float32, targets [...] int32.

    The one definition of a token's log-prob, shared by the scoring step and `LlamaCausalLM.score`.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


@functools.partial(jax.jit, static_argnames=("config", "segment_length", "kernel"))
def score_step(
    params: transformer.Params,
    token_ids: jax.Array,  # [1, T] sequences packed one after another, then padding
    positions: jax.Array,  # [1, T] each token's position in its own sequence
    segment_ids: jax.Array,  # [1, T] which sequence each token belongs to; -1 for padding
    scored: jax.Array,  # [C] the row positions whose next token is scored (padding: 0)
    targets: jax.Array,  # [C] the token each of them predicts (padding: 0)
    *,
    config: LlamaConfig,
    segment_length: int | None = None,  # a bound on every sequence's tokens (`scheduler.segment_bound`), or None
    kernel: bool = False,  # products may run as the CPU kernel (`transformer.project`)
) -> tuple[jax.Array, jax.Array]:
    """One packed scoring row: the log-prob [C] of each target and whether it was the greedy choice [C]."""
    hidden, _, _ = transformer.forward(
        params, config, token_ids, positions, segment_ids >= 0, segment_ids=segment_ids,
        segment_length=segment_length, kernel=kernel,
    )
    logits = transformer.logits(params, hidden[0, scored], kernel)  # the head only where a scored token is predicted
    return target_logprobs(logits, targets)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One window of one request: input tokens, and which of them predict a scored token (index, target)."""

    owner: int
    input_ids: tuple[int, ...]
    scored_at: tuple[int, ...]
    targets: tuple[int, ...]


def windows(total: int, first_scored: int, max_length: int) -> list[tuple[int, int, int]]:
    """Rolling windows over a sequence of `total` tokens whose tokens [first_scored, total) are scored.

    Each window (s, a, b) takes tokens [s, b - 1) as input (at most `max_length`) and scores tokens [a, b). A
    sequence that fits is one window; a longer one advances half a window at a time, so every scored token sees
    at least max_length / 2 tokens before it (or all there are).
    """
    assert 1 <= first_scored <= total and max_length >= 2
    if total - 1 <= max_length:
        return [(0, first_scored, total)]
    stride = max(1, max_length // 2)
    result, a = [], first_scored
    while a < total:
        b = min(total, max(a + stride, max_length + 1))
        b = min(b, a + max_length)  # token a must still see token a - 1
        result.append((max(0, b - 1 - max_length), a, b))
        a = b
    return result


def _pieces(index: int, request: ScoreRequest, max_length: int) -> list[_Piece]:
    context, continuation = list(request.context_ids), list(request.continuation_ids)
    sequence = context + continuation
    first = max(len(context), 1)  # an empty context: the document's first token is not scored
    pieces = []
    for s, a, b in windows(len(sequence), first, max_length):
        scored_at = tuple(range(a - 1 - s, b - 1 - s))
        pieces.append(_Piece(index, tuple(sequence[s : b - 1]), scored_at, tuple(sequence[a:b])))
    return pieces


def split_pair(
    tokenize: Callable[[str], list[int]], encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a text pair: context + continuation tokenized as one string and split
    where the context's own tokens end (as lm-evaluation-harness does), so that the boundary is cut as the model
    would read it; where a token straddles it, the continuation is encoded alone (`encode`: no start token)."""
    context_ids = list(tokenize(context)) if context else []
    whole = list(tokenize(context + continuation))
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return context_ids, whole[len(context_ids) :]
    return context_ids, list(encode(continuation))


def check(request: ScoreRequest, vocabulary_size: int) -> str | None:
    """Why `request` cannot be scored, or None."""
    if not request.continuation_ids:
        return "the continuation has no tokens"
    if not request.context_ids and len(request.continuation_ids) < 2:
        return "with no context, the continuation needs 2 tokens or more (nothing predicts the first)"
    bad = [t for t in (*request.context_ids, *request.continuation_ids) if not 0 <= int(t) < vocabulary_size]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary of {vocabulary_size}"
    return None


def score_stream(
    params: transformer.Params,
    config: LlamaConfig,
    requests: Iterable[ScoreRequest],
    max_length: int,
    *,
    chunk: int = 256,
    stats: ScoreStats | None = None,
) -> Iterator[ScoreResult]:
    """Yields one ScoreResult per request, `chunk` requests at a time (packed together), in request order."""
    stats = stats if stats is not None else ScoreStats()
    batch: list[ScoreRequest] = []
    for request in requests:
        batch.append(request)
        if len(batch) >= chunk:
            yield from _score_batch(params, config, batch, max_length, stats)
            batch = []
    if batch:
        yield from _score_batch(params, config, batch, max_length, stats)


def score(params, config, requests: Sequence[ScoreRequest], max_length: int, **kwargs) -> list[ScoreResult]:
    """All results, in the order of `requests`."""
    return list(score_stream(params, config, requests, max_length, **kwargs))


def _score_batch(
    params, config: LlamaConfig, requests: Sequence[ScoreRequest], max_length: int, stats: ScoreStats
) -> list[ScoreResult]:
    errors = [check(r, config.vocabulary_size) for r in requests]
    pieces = [p for i, r in enumerate(requests) if errors[i] is None for p in _pieces(i, r, max_length)]
    # The CPU kernels take whole operands: weights split across devices keep XLA's products.
    kernel = not any(isinstance(getattr(w, "sharding", None), NamedSharding) for w in jax.tree.leaves(params))
    logprobs: dict[int, list[np.ndarray]] = {i: [] for i in range(len(requests))}
    greedy: dict[int, list[np.ndarray]] = {i: [] for i in range(len(requests))}
    order = []  # pieces of one request may land in different rows; results are joined in window order
    for pack in plan_packs([len(p.input_ids) for p in pieces], MAX_SEGMENTS):
        row = [pieces[i] for i in pack]
        chosen, best = _run_row(params, config, row, stats, kernel)
        for j, (piece, lp, g) in enumerate(zip(row, chosen, best)):
            order.append((piece.owner, pack[j], lp, g))
    for owner, _, lp, g in sorted(order, key=lambda item: item[1]):
        logprobs[owner].append(lp)
        greedy[owner].append(g)
    results = []
    for i, request in enumerate(requests):
        if errors[i] is not None:
            results.append(ScoreResult(request.request_id, 0.0, 0, False, len(request.context_ids), None, errors[i]))
            continue
        lp = np.concatenate(logprobs[i]).astype(np.float64)
        results.append(ScoreResult(
            request.request_id, float(lp.sum()), len(lp), bool(np.concatenate(greedy[i]).all()),
            len(request.context_ids), tuple(float(x) for x in lp) if request.per_token else None,
        ))  # fmt: skip
    return results


def _run_row(params, config: LlamaConfig, row: Sequence[_Piece], stats: ScoreStats, kernel: bool = False):
    """Runs one packed row; returns each piece's scored log-probs and greedy flags, as numpy arrays."""
    t = bucket(sum(len(p.input_ids) for p in row), MIN_PACK_BUCKET)
    # Head rows in steps of 8, not powers of two: a row of one-token continuations (multiple choice) would
    # otherwise compute up to twice the LM-head rows it needs, which is most of what scoring adds to prefill.
    c = -(-sum(len(p.scored_at) for p in row) // SCORED_STEP) * SCORED_STEP
    ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
    segments = np.full((1, t), -1, np.int32)
    scored, targets = np.zeros(c, np.int32), np.zeros(c, np.int32)
    cursor = taken = 0
    spans = []
    for j, piece in enumerate(row):
        n, k = len(piece.input_ids), len(piece.scored_at)
        ids[0, cursor : cursor + n], positions[0, cursor : cursor + n] = piece.input_ids, np.arange(n)
        segments[0, cursor : cursor + n] = j
        scored[taken : taken + k] = np.asarray(piece.scored_at) + cursor
        targets[taken : taken + k] = piece.targets
        spans.append(slice(taken, taken + k))
        cursor, taken = cursor + n, taken + k
    start = time.perf_counter()
    bound = segment_bound([len(p.input_ids) for p in row], t)
    chosen, best = score_step(
        params, ids, positions, segments, scored, targets, config=config, segment_length=bound, kernel=kernel
    )
    chosen, best = np.asarray(chosen), np.asarray(best)
    stats.seconds += time.perf_counter() - start
    stats.calls += 1
    stats.input_tokens += cursor
    stats.scored_tokens += taken
    return [chosen[span] for span in spans], [best[span] for span in spans]
