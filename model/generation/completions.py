"""A slot's generated tokens -> its Completion: stop tokens and stop strings checked token by token, in order,
a constrained slot's grammar advanced, the text grown by the slot's incremental detokenizer, log-probabilities
kept per token. The engine (`engine.py`) calls `take` with each call's new tokens and `finish` when a slot runs
out of budget; it counts the tokens.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable

import numpy as np

from model.generation import logprobs
from model.generation.detokenizer import IncrementalDetokenizer
from model.generation.requests import Completion, Request
from model.generation.scheduler import Slot


def take(
    state: Slot, new: list[int], tokenizer: Any, end_token_ids: Collection[int], token_logprobs: list | None = None
) -> Completion | None:
    """`append` for any slot: a constrained slot's (single) token also advances its grammar, and the sequence ends
    as soon as the grammar is complete, or at the grammar library's end token (`end_token_ids`), which its mask
    allows only where the grammar may end."""
    if state.grammar is None or not new:
        return append(state, new, tokenizer, token_logprobs)
    (token,) = new  # a constrained slot advances one token per call
    if token not in state.stop_token_ids:
        if token in end_token_ids:
            return finish(state, "stop", counted=len(state.generated) + 1, stop_token_id=token)
        if not state.grammar.consume_token(token):  # the mask allowed it, so this is a library or engine bug
            return error(state.request, f"response_format: the grammar rejected token {token}: "
                                        f"{state.grammar.get_error()}", tokenizer)
    done = append(state, new, tokenizer, token_logprobs)
    if done is None and state.grammar.is_stopped():
        done = finish(state, "stop")
    return done


def append(state: Slot, new: list[int], tokenizer: Any, token_logprobs: list | None = None) -> Completion | None:
    """Adds generated tokens to a slot; returns its Completion if a stop token or stop string ended it.

    Tokens are taken in order, each checked against the stop strings before a later one may end the
    sequence: a decode call can return a stop string and, a few tokens on, a stop token, and the text must
    end at the stop string, not at the token.
    """
    detokenizer = state.detokenizer
    if detokenizer is None and tokenizer is not None:
        request = state.request
        detokenizer = state.detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_ids, request.stop_strings, request.skip_special_tokens
        )
    for j, token in enumerate(new):
        if token in state.stop_token_ids:
            return finish(state, "stop", counted=len(state.generated) + 1, stop_token_id=token)
        state.generated.append(token)
        if token_logprobs is not None:
            state.logprobs.append(token_logprobs[j])
        if detokenizer is not None and detokenizer.add((token,)):
            # completion_tokens counts up to the token that completed the stop string (it was generated);
            # token_ids and text end where the stop string begins.
            del state.generated[detokenizer.kept_tokens :]
            return finish(state, "stop", counted=detokenizer.consumed_tokens)
    return None


def finish(state: Slot, reason: str, counted: int | None = None, stop_token_id: int | None = None) -> Completion:
    """The slot's Completion, ended for `reason`; `counted` completion tokens (default: those kept)."""
    generated = tuple(state.generated)
    text = state.detokenizer.text if state.detokenizer is not None else None
    wanted = state.request.logprobs is not None
    kept = state.logprobs[: len(generated)]  # a stop string cut the tokens after its start
    return Completion(
        state.request.request_id,
        generated,
        text,
        reason,
        state.prompt_tokens,
        counted if counted is not None else len(generated),
        None,
        stop_token_id,
        tuple(lp for lp, _ in kept) if wanted else None,
        tuple(top for _, top in kept) if wanted else None,
    )


def error(request: Request, reason: str, tokenizer: Any) -> Completion:
    """The Completion of a request that fails alone (`reason`); the rest of the batch goes on."""
    text = None if tokenizer is None else ""
    return Completion(request.request_id, (), text, "error", len(request.prompt_ids), 0, reason)


def logprobs_width(requests: Iterable[Request]) -> int | None:
    """The static top-k width a step computes for these requests: None when none asks for log-probabilities."""
    asked = [r.logprobs for r in requests if r.logprobs is not None]
    return logprobs.bucket_k(max(asked)) if asked else None


def token_entries(arrays: list[np.ndarray] | None, row: int, count: int, request: Request) -> list | None:
    """Per-token (log-prob, ((id, log-prob) x the request's k)) of a row's first `count` tokens, or None."""
    if arrays is None or request.logprobs is None:
        return None
    chosen, ids, top = (a[row] for a in arrays)
    k = request.logprobs
    return [
        (float(chosen[t]), tuple((int(i), float(lp)) for i, lp in zip(ids[t, :k], top[t, :k])))
        for t in range(count)
    ]
