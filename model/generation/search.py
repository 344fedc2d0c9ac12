"""Beam search and contrastive search over the model, for `generate()` with those samplers (static batches).

Both keep several hypotheses (beams, or candidate next tokens) per prompt, so they do not fit the streaming
engine's one-token-per-slot decode; they run here instead, one jitted `lax.while_loop` per call shape, over a
`KVCache` of the whole `max_length` per hypothesis.

Shapes: prompts `token_ids` [B, T] right-padded with `lengths` [B] (each >= 1) and `budgets` [B] (most new
tokens per row); S = `max_length` (prompt + generated). Outputs hold the prompt, then the generated tokens;
`lengths` count both but not a final stop token, which sits at index `lengths` when `stopped`.

Example:
    >>> out = beam_search(params, config, ids, lengths, budgets, max_length=64, num_beams=4)
    >>> best = out.token_ids[:, 0]  # beams come sorted by log-probability
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import transformer
from model.config import LlamaConfig
from model.generation.detokenizer import IncrementalDetokenizer
from model.generation.kv_cache import KVCache, write_prompts, write_tokens
from model.generation.requests import Completion
from model.generation.sampling import top_k
from model.transformer import first_argmax

if TYPE_CHECKING:
    from model.backbone import LlamaBackbone
    from model.tokenizers import Tokenizer


class BeamSearchOutput(NamedTuple):
    """token_ids [B, N, S]; lengths, stopped, log_probs [B, N]; beams sorted by log_probs, best first."""

    token_ids: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    log_probs: jax.Array  # sum of the generated tokens' log-probabilities (stop token included)


class ContrastiveSearchOutput(NamedTuple):
    """token_ids [B, S]; lengths, stopped [B]."""

    token_ids: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def _prefill(
    params: transformer.Params, config: LlamaConfig, token_ids: jax.Array, lengths: jax.Array, max_length: int,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Runs the prompts; returns next-token logits [B, V], hidden states [B, T, M] and a cache of S positions."""
    b, t = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    hidden, new_k, new_v = transformer.forward(
        params, config, token_ids, positions, positions < lengths[:, None], dtype=dtype
    )
    logits = transformer.logits(params, hidden[jnp.arange(b), lengths - 1])
    cache = KVCache.allocate(config, b, max_length, new_k.dtype)
    return logits, hidden, write_prompts(cache, new_k, new_v, jnp.arange(b))


def _step(
    params: transformer.Params, config: LlamaConfig, cache: KVCache, tokens: jax.Array, positions: jax.Array,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row at `positions` [R] after the cached ones; returns logits [R, V], hidden [R, M], k, v
    [L, R, K, D]."""
    hidden, new_k, new_v = transformer.forward(
        params, config, tokens[:, None], positions[:, None], cache_k=cache.k, cache_v=cache.v,
        cache_lengths=positions, dtype=dtype,
    )
    return transformer.logits(params, hidden[:, 0]), hidden[:, 0], new_k[:, :, 0], new_v[:, :, 0]


def _rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache of hypotheses `rows` [R] (indices into its rows, repeats allowed)."""
    return KVCache(cache.k[:, rows], cache.v[:, rows])


def _write(cache: KVCache, new_k: jax.Array, new_v: jax.Array, positions: jax.Array) -> KVCache:
    """One token's keys/values [L, R, K, D] per row at `positions` [R]; a position >= S writes nothing."""
    return write_tokens(cache, new_k[:, :, None], new_v[:, :, None], positions)


def _is_stop(tokens: jax.Array, stop_token_ids: tuple[int, ...]) -> jax.Array:
    if not stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[:, None] == jnp.asarray(stop_token_ids, tokens.dtype)[None, :], axis=-1)


def _start(token_ids: jax.Array, lengths: jax.Array, budgets: jax.Array, max_length: int):
    """Output buffer [B, S] holding the prompts, and budgets cut to the room each row has."""
    b, t = token_ids.shape
    if t > max_length:
        raise ValueError(f"prompt width {t} exceeds max_length {max_length}")
    sequences = jnp.zeros((b, max_length), jnp.int32).at[:, :t].set(token_ids.astype(jnp.int32))
    return sequences, jnp.minimum(budgets, max_length - lengths).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_length", "num_beams", "stop_token_ids", "dtype"))
def beam_search(
    params: transformer.Params,
    config: LlamaConfig,
    token_ids: jax.Array,
    lengths: jax.Array,
    budgets: jax.Array,
    *,
    max_length: int,
    num_beams: int,
    temperature: float | jax.Array = 1.0,
    stop_token_ids: tuple[int, ...] = (),
    dtype: Any = None,
) -> BeamSearchOutput:
    """Keeps the `num_beams` hypotheses of highest total log-probability per prompt, growing one token a step.

    A hypothesis that emits a stop token (or runs out of budget) is finished: it keeps its score and competes
    with the live ones unchanged. Scores are plain sums, without length normalization, as keras-hub's.
    """
    b = token_ids.shape[0]
    n = num_beams
    logits, _, cache = _prefill(params, config, token_ids, lengths, max_length, dtype)
    vocab = logits.shape[-1]
    sequences, budgets = _start(token_ids, lengths, budgets, max_length)

    def beams(x: jax.Array, axis: int = 0) -> jax.Array:  # [.., B, ..] -> [.., B * N, ..], row b*N + i
        return jnp.repeat(x, n, axis=axis)

    prompt_lengths, budgets = beams(lengths.astype(jnp.int32)), beams(budgets)
    # Only the first copy of each prompt may spawn candidates at first, so the N beams start out distinct.
    first_scores = jnp.where(jnp.arange(n) == 0, 0.0, -jnp.inf)
    state = dict(
        step=jnp.int32(0),
        logits=beams(logits),
        scores=jnp.tile(first_scores, b),
        sequences=beams(sequences),
        generated=jnp.zeros(b * n, jnp.int32),
        done=budgets <= 0,
        stopped=jnp.zeros(b * n, bool),
        cache=_rows(cache, jnp.repeat(jnp.arange(b), n)),
    )

    def cond(state: dict) -> jax.Array:
        return (state["step"] < max_length) & ~jnp.all(state["done"])

    def body(state: dict) -> dict:
        log_probs = jax.nn.log_softmax(state["logits"] / temperature, axis=-1)
        done = state["done"]
        # A finished hypothesis offers exactly one candidate, itself (token 0, never written), at its score.
        carried = jnp.where(jnp.arange(vocab) == 0, 0.0, -jnp.inf)
        candidates = jnp.where(done[:, None], carried, log_probs) + state["scores"][:, None]
        scores, flat = top_k(candidates.reshape(b, n * vocab), n)  # [B, N], best first
        parents = (jnp.arange(b)[:, None] * n + flat // vocab).reshape(-1)
        tokens = (flat % vocab).reshape(-1).astype(jnp.int32)
        live = ~done[parents]
        generated = state["generated"][parents]
        positions = prompt_lengths + generated
        stop = live & _is_stop(tokens, stop_token_ids)
        sequences = state["sequences"][parents]
        sequences = sequences.at[jnp.arange(b * n), jnp.where(live, positions, max_length)].set(tokens, mode="drop")
        cache = _rows(state["cache"], parents)
        logits, _, new_k, new_v = _step(params, config, cache, tokens, positions, dtype)
        keep = jnp.where(live & ~stop, positions, max_length)
        generated = generated + (live & ~stop)
        return dict(
            step=state["step"] + 1,
            logits=logits,
            scores=scores.reshape(-1),
            sequences=sequences,
            generated=generated,
            done=done[parents] | stop | (generated >= budgets),
            stopped=state["stopped"][parents] | stop,
            cache=_write(cache, new_k, new_v, keep),
        )

    state = jax.lax.while_loop(cond, body, state)
    return BeamSearchOutput(
        token_ids=state["sequences"].reshape(b, n, max_length),
        lengths=(prompt_lengths + state["generated"]).reshape(b, n),
        stopped=state["stopped"].reshape(b, n),
        log_probs=state["scores"].reshape(b, n),
    )


@functools.partial(jax.jit, static_argnames=("config", "max_length", "k", "stop_token_ids", "dtype"))
def contrastive_search(
    params: transformer.Params,
    config: LlamaConfig,
    token_ids: jax.Array,
    lengths: jax.Array,
    budgets: jax.Array,
    *,
    max_length: int,
    k: int,
    alpha: float | jax.Array,
    temperature: float | jax.Array = 1.0,
    stop_token_ids: tuple[int, ...] = (),
    dtype: Any = None,
) -> ContrastiveSearchOutput:
    """Contrastive search (Su et al. 2022), as keras-hub's ContrastiveSampler: of the k most likely next tokens,
    take the one maximizing (1 - alpha) * probability - alpha * (its hidden state's highest cosine similarity
    to the hidden state of any earlier position), which discourages the model from repeating itself.

    Each candidate is run one step ahead to get its hidden state, on its own copy of the cache; the winner's
    logits, keys and values are kept, so no token is computed twice.
    """
    b = token_ids.shape[0]
    k = min(k, config.vocabulary_size)
    logits, hidden, cache = _prefill(params, config, token_ids, lengths, max_length, dtype)
    sequences, budgets = _start(token_ids, lengths, budgets, max_length)
    history = jnp.zeros((b, max_length, hidden.shape[-1]), jnp.float32)
    history = jax.lax.dynamic_update_slice(history, hidden.astype(jnp.float32), (0, 0, 0))
    prompt_lengths = lengths.astype(jnp.int32)
    state = dict(
        logits=logits,
        history=history,  # [B, S, M] final hidden state at every position < prompt_lengths + generated
        sequences=sequences,
        generated=jnp.zeros(b, jnp.int32),
        done=budgets <= 0,
        stopped=jnp.zeros(b, bool),
        cache=cache,
    )

    def cond(state: dict) -> jax.Array:
        return ~jnp.all(state["done"])

    def body(state: dict) -> dict:
        probs = jax.nn.softmax(state["logits"] / temperature, axis=-1)
        candidate_probs, candidates = top_k(probs, k)  # [B, k]
        positions = prompt_lengths + state["generated"]
        cache = state["cache"]
        ahead = _rows(cache, jnp.repeat(jnp.arange(b), k))
        next_logits, next_hidden, new_k, new_v = _step(
            params, config, ahead, candidates.reshape(-1).astype(jnp.int32), jnp.repeat(positions, k), dtype
        )
        next_hidden = next_hidden.reshape(b, k, -1).astype(jnp.float32)
        similarity = jnp.einsum("bkm,bsm->bks", _unit(next_hidden), _unit(state["history"]))
        earlier = jnp.arange(max_length)[None, None, :] < positions[:, None, None]
        most_similar = jnp.max(jnp.where(earlier, similarity, -1.0), axis=-1)  # [B, k]
        best = first_argmax((1.0 - alpha) * candidate_probs - alpha * most_similar)  # [B]

        def chosen(x: jax.Array, axis: int) -> jax.Array:  # x with B*k rows on `axis` -> the winner's B rows
            x = x.reshape(x.shape[:axis] + (b, k) + x.shape[axis + 1 :])
            index = best.reshape((1,) * axis + (b, 1) + (1,) * (x.ndim - axis - 2))
            return jnp.take_along_axis(x, index, axis=axis + 1).squeeze(axis + 1)

        tokens = chosen(candidates.reshape(-1), 0).astype(jnp.int32)
        live = ~state["done"]
        stop = live & _is_stop(tokens, stop_token_ids)
        write_at = jnp.where(live, positions, max_length)
        keep = jnp.where(live & ~stop, positions, max_length)
        generated = state["generated"] + (live & ~stop)
        winner_hidden = chosen(next_hidden.reshape(b * k, -1), 0)
        return dict(
            logits=chosen(next_logits, 0),
            history=state["history"].at[jnp.arange(b), keep].set(winner_hidden, mode="drop"),
            sequences=state["sequences"].at[jnp.arange(b), write_at].set(tokens, mode="drop"),
            generated=generated,
            done=state["done"] | stop | (generated >= budgets),
            stopped=state["stopped"] | stop,
            cache=_write(cache, chosen(new_k, 1), chosen(new_v, 1), keep),
        )

    state = jax.lax.while_loop(cond, body, state)
    return ContrastiveSearchOutput(state["sequences"], prompt_lengths + state["generated"], state["stopped"])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- host side: prompts in, Completions out (what BeamSampler / ContrastiveSampler.search run) -------------

# search(params, config, token_ids, lengths, budgets, max_length=, stop_token_ids=, dtype=) -> (token_ids [B, S],
# lengths [B], stopped [B]) for the hypothesis to return.
SearchFunction = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]

# The model as a search sees it, a callable (as keras-hub's samplers get a `next` function, never the model):
# model(search, token_ids [B, T], lengths [B], budgets [B], max_length, stop_token_ids) runs `search` with the
# model's weights and config and returns its (token_ids [B, S], lengths [B], stopped [B]). See `bind_backbone`.
SearchModel = Callable[
    [SearchFunction, np.ndarray, np.ndarray, np.ndarray, int, tuple[int, ...]], tuple[jax.Array, jax.Array, jax.Array]
]


def bind_backbone(backbone: "LlamaBackbone") -> SearchModel:
    """The `SearchModel` of a backbone: its weights in its compute dtype, read once, and its config."""
    params, dtype = _compute_params(backbone)
    config = backbone.config

    def model(search, token_ids, lengths, budgets, max_length, stop_token_ids):
        return search(params, config, token_ids, lengths, budgets, max_length=max_length,
                      stop_token_ids=tuple(stop_token_ids), dtype=dtype)

    return model


def search_completions(
    model: SearchModel,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    stop_token_ids: tuple[int, ...],
    max_length: int,
    search: SearchFunction,
    stop_strings: tuple[str, ...] = (),
    skip_special_tokens: bool = True,
    tokenizer: "Tokenizer | None" = None,
) -> list[Completion]:
    """Runs `search` over the prompts as one padded batch through `model`; one Completion per prompt, in order.

    With a `tokenizer`, each Completion carries its text; without, its text is None.

    Stop strings cut each searched sequence where the first of them begins (exact for a search whose
    tokens never depend on later ones, as contrastive search's; the beam sampler refuses them).

    A prompt that is empty or leaves no room for a new token gets an "error" Completion; the others go on.
    Rows and prompt width are padded to powers of two so that nearby batches share a compiled program.
    """
    completions: list[Completion | None] = [None] * len(prompts)
    runnable = []
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if not prompt:
            completions[i] = Completion(i, (), None, "error", 0, 0, error="empty prompt")
        elif budget < 1 or len(prompt) >= max_length:
            reason = f"the prompt ({len(prompt)} tokens) leaves no room for a new token in max_length={max_length}"
            completions[i] = Completion(i, (), None, "error", len(prompt), 0, error=reason)
        else:
            runnable.append(i)
    if runnable:
        rows = _power_of_two(len(runnable), 1)
        width = min(_power_of_two(max(len(prompts[i]) for i in runnable), 8), max_length)
        ids = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one token, no budget
        row_budgets = np.zeros(rows, np.int32)
        for row, i in enumerate(runnable):
            ids[row, : len(prompts[i])] = prompts[i]
            lengths[row], row_budgets[row] = len(prompts[i]), budgets[i]
        token_ids, out_lengths, stopped_rows = jax.device_get(
            model(search, ids, lengths, row_budgets, max_length, tuple(stop_token_ids))
        )
        for row, i in enumerate(runnable):
            prompt = list(prompts[i])
            generated = [int(t) for t in token_ids[row, len(prompt) : out_lengths[row]]]
            stopped = bool(stopped_rows[row])
            stop_id = int(token_ids[row, out_lengths[row]]) if stopped else None
            counted = len(generated) + stopped
            text = None
            if tokenizer is not None:
                detokenizer = IncrementalDetokenizer(tokenizer, prompt, stop_strings, skip_special_tokens)
                if detokenizer.add(generated):
                    counted, stopped, stop_id = detokenizer.consumed_tokens, True, None
                    generated = generated[: detokenizer.kept_tokens]
                text = detokenizer.text
            completions[i] = Completion(
                request_id=i,
                token_ids=tuple(generated),
                text=text,
                finish_reason="stop" if stopped else "length",
                prompt_tokens=len(prompt),
                completion_tokens=counted,
                stop_token_id=stop_id,
            )
    return completions


def _power_of_two(n: int, minimum: int) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def _compute_params(backbone: "LlamaBackbone") -> tuple[transformer.Params, Any]:
    """The backbone's weights as `forward` takes them, in its compute dtype (int8 kernels stay int8)."""
    params = backbone.params()
    dtype = jnp.dtype(backbone.compute_dtype)
    if params["token_embedding"].dtype != dtype and "token_embedding_scale" not in params:
        params = jax.tree.map(lambda w: w.astype(dtype), params)
    return params, dtype
