"""What goes into the generation engine and what comes out of it.

These are the engine's whole contract with its callers (`LlamaCausalLM.generate` and the batch workers):
a `Request` per sequence to generate, a `Completion` per request, in the order they finish.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Literal, Sequence

FinishReason = Literal["stop", "length", "error"]

# Samplers that the continuous-batching engine runs with per-request parameters. Beam and contrastive
# search need several hypotheses per prompt and run in `model.generation.search` instead.
STREAMING_SAMPLERS = ("greedy", "top_k", "top_p", "random", "min_p")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen for one request.

    `temperature` 0 means greedy whatever the sampler. `top_k`, `top_p` and `min_p` apply only to the
    sampler of that name; "random" samples from the whole (temperature-scaled) distribution.
    """

    sampler: str = "greedy"
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.9
    min_p: float = 0.05

    def __post_init__(self) -> None:
        if self.sampler not in STREAMING_SAMPLERS:
            raise ValueError(f"sampler must be one of {STREAMING_SAMPLERS}, got {self.sampler!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def is_greedy(self) -> bool:
        return self.sampler == "greedy" or self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to generate.

    `seed` makes sampling a function of this request alone (never of the batch it lands in): callers derive
    it from their job seed and the row id, so a rerun gives the same text.
    """

    request_id: Hashable
    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    # Special tokens (chat markers, start / end tokens) are left out of the text, and stop strings are matched
    # against the text as returned; False keeps them, as they are spelled in the vocabulary.
    skip_special_tokens: bool = True
    # None: no log-probabilities; k >= 0: each generated token's log-prob and its k most likely alternatives
    # (model.generation.logprobs: the model's own distribution, before temperature and filtering).
    logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """The result of one request.

    `token_ids` are the generated tokens only, without the stop token or the tokens of a stop string;
    `text` is their detokenization (None when the engine has no tokenizer), cut where a stop string begins,
    without special tokens unless the request keeps them. `finish_reason` is "stop" (a stop
    token or string), "length" (`max_new_tokens` or the context ran out) or "error" (then `error` says why
    and nothing was generated).
    """

    request_id: Hashable
    token_ids: tuple[int, ...]
    text: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    stop_token_id: int | None = None  # the stop token that ended it, if one did
    # With Request.logprobs: one entry per token of `token_ids`: its log-prob, and the top-k (id, log-prob).
    token_logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
