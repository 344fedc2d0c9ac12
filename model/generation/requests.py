"""What goes into the generation engine and what comes out of it.

These are the engine's whole contract with its callers (`LlamaCausalLM.generate` and the batch workers):
a `Request` per sequence to generate, a `Completion` per request, in the order they finish.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Hashable, Literal, Mapping, Sequence

FinishReason = Literal["stop", "length", "error"]

# Samplers that the continuous-batching engine runs with per-request parameters. Beam and contrastive
# search need several hypotheses per prompt and run in `model.generation.search` instead.
STREAMING_SAMPLERS = ("greedy", "top_k", "top_p", "random", "min_p")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen for one request.

    `temperature` 0 means greedy whatever the sampler. `top_k`, `top_p` and `min_p` apply only to the
    sampler of that name; "random" samples from the whole (temperature-scaled) distribution.

    Penalties and biases change the raw logits before temperature and the sampler see them, in this order
    (`model.generation.penalties_reference.apply_penalties` is the reference):
    - `repetition_penalty` (> 0; 1 = off, as in transformers and vLLM): a token seen in the prompt or the
      generated tokens has its logit divided by it where positive, multiplied by it where negative;
    - `frequency_penalty` (in [-2, 2], as OpenAI's): subtracted once per time the token was generated;
    - `presence_penalty` (in [-2, 2]): subtracted once if the token was generated at all;
    - `logit_bias` ((token id, bias) pairs, bias in [-100, 100]): added last, so an explicit bias of -100
      bans a token whatever the penalties did. Given as a mapping or pairs; kept sorted by token id so that
      equal settings compare (and hash) equal.
    """

    sampler: str = "greedy"
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.9
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

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
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value}")
        object.__setattr__(self, "logit_bias", normalize_logit_bias(self.logit_bias))

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty or bias changes the logits (the engine must then apply them)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )

    @property
    def is_greedy(self) -> bool:
        return self.sampler == "greedy" or self.temperature == 0


def normalize_logit_bias(
    bias: Mapping[int, float] | Sequence[tuple[int, float]],
) -> tuple[tuple[int, float], ...]:
    """`bias` as (token id, bias) pairs sorted by id; raises ValueError naming a bad id or value.

    Example:
        >>> normalize_logit_bias({7: -100, 3: 2.5})
        ((3, 2.5), (7, -100.0))
    """
    pairs = list(bias.items()) if isinstance(bias, Mapping) else list(bias)
    result: dict[int, float] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"logit_bias must map token ids to numbers, got the entry {pair!r}")
        token, value = pair
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
        if token in result:
            raise ValueError(f"logit_bias names token {token} twice")
        result[token] = float(value)
    return tuple(sorted(result.items()))


def resolve_stop_token_ids(value: Any, auto: Sequence[int] | None) -> tuple[int, ...]:
    """The stop token ids a request carries, from what a caller asked for: "auto" -> `auto` (the checkpoint's end
    tokens; None when unknown), None -> none, ids -> those ids. `generate()` and batch jobs both resolve here."""
    if value is None:
        return ()
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"stop_token_ids must be None, 'auto' or a tuple of ids, got {value!r}")
        if auto is None:
            raise ValueError("stop_token_ids='auto' needs a preprocessor; pass a tuple of ids or None")
        return tuple(int(i) for i in auto)
    return tuple(int(i) for i in value)


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
    # An OpenAI-style response_format ({"type": "json_object"} or {"type": "json_schema", ...}) as canonical
    # JSON text, or None. Honouring it needs structured-output decoding (a per-row token mask); an engine
    # that cannot must fail such requests with an error, never generate unconstrained text instead.
    response_format: str | None = None


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
