"""Per-row sampling: override columns of the input, checked up front, merged with a sampling configuration.

A column named like one of `OVERRIDE_COLUMNS`, where the input has it, replaces that sampling value for its
row; a null keeps the configuration's value. Each value is checked when the shard's rows are read: a bad one
makes its row an error row whose error names the row id, the column and the value, never a crashed shard
or a silently clamped value. The merged settings of one (row, configuration) are a `RowSampling`, from which
the worker builds the engine's `SamplingParams` (or runs beam / contrastive search).

Example:
    >>> overrides, error = check_row_overrides({"top_k": 0}, row_id="r7")
    >>> error
    "row 'r7': column 'top_k' holds 0: must be an integer >= 1"
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Callable

from batchgen.sampling_checks import MAX_LOGPROBS, SAMPLERS, SEARCH_SAMPLERS, canonical_response_format
from batchgen.spec import SamplingConfig

# Column name -> what it must hold (for messages and the Parquet schema check).
OVERRIDE_COLUMNS: dict[str, str] = {
    "sampler": "string",
    "temperature": "number",
    "top_k": "integer",
    "top_p": "number",
    "min_p": "number",
    "max_new_tokens": "integer",
    "stop_strings": "strings",
    "seed": "integer",
    "repetition_penalty": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "logit_bias": "table",
    "response_format": "table",
    "logprobs": "integer",
}


def check_row_overrides(values: Mapping[str, Any], row_id: Any) -> tuple[dict[str, Any], str | None]:
    """The row's non-null overrides, normalized (e.g. a stop string -> a tuple), or the error of the first bad one."""
    result: dict[str, Any] = {}
    for name, value in values.items():
        if value is None or name not in _CHECKS:
            continue
        try:
            result[name] = _CHECKS[name](value)
        except (ValueError, TypeError) as error:
            return {}, f"row {row_id!r}: column {name!r} holds {value!r:.200}: {error}"
    return result, None


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """The sampling settings of one (row, configuration): the configuration's, with the row's overrides."""

    sampler: str
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: tuple[tuple[int, float], ...]
    response_format: str | None  # canonical JSON, or None (also for {"type": "text"})
    num_beams: int
    alpha: float
    # None: no log-probabilities; k >= 0: each token's and its k most likely alternatives (Request.logprobs).
    logprobs: int | None = None

    @property
    def is_search(self) -> bool:
        return self.sampler in SEARCH_SAMPLERS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )

    def problem(self) -> str | None:
        """Why this combination cannot run (e.g. beam search with stop strings), or None."""
        if self.sampler == "beam" and self.stop_strings:
            return f"the beam sampler cannot honour stop_strings {list(self.stop_strings)!r} (use contrastive or a streaming sampler)"
        if self.is_search and self.has_penalties:
            return f"the {self.sampler} sampler does not apply repetition/presence/frequency penalties or logit_bias"
        if self.is_search and self.response_format is not None:
            return f"the {self.sampler} sampler cannot honour response_format"
        if self.is_search and self.logprobs is not None:
            return f"the {self.sampler} sampler does not compute logprobs"
        if self.is_search and self.temperature == 0:
            return f"the {self.sampler} sampler needs temperature > 0, got 0"
        return None


def resolve(config: SamplingConfig, overrides: Mapping[str, Any]) -> RowSampling:
    """`config` with the row's checked `overrides` (from `check_row_overrides`) applied."""
    bias = overrides.get("logit_bias")
    if bias is None:
        bias = _logit_bias({int(k): v for k, v in config.logit_bias.items()})
    return RowSampling(
        sampler=overrides.get("sampler", config.sampler),
        temperature=overrides.get("temperature", config.temperature),
        top_k=overrides.get("top_k", config.top_k),
        top_p=overrides.get("top_p", config.top_p),
        min_p=overrides.get("min_p", config.min_p),
        max_new_tokens=overrides.get("max_new_tokens", config.max_new_tokens),
        stop_strings=overrides.get("stop_strings", tuple(config.stop_strings)),
        seed=overrides.get("seed", config.seed),
        repetition_penalty=overrides.get("repetition_penalty", config.repetition_penalty),
        presence_penalty=overrides.get("presence_penalty", config.presence_penalty),
        frequency_penalty=overrides.get("frequency_penalty", config.frequency_penalty),
        logit_bias=bias,
        # A row's {"type": "text"} (None) turns the configuration's format off for that row.
        response_format=overrides.get(
            "response_format",
            None if config.response_format is None else canonical_response_format(config.response_format),
        ),
        num_beams=config.num_beams,
        alpha=config.alpha,
        # An override of 0 (None once checked) turns off what the configuration asked for.
        logprobs=overrides["logprobs"] if "logprobs" in overrides else (config.logprobs or None),
    )


# ---- one check per column: the normalized value, or ValueError saying what it must be -------------------


def _integer(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON readers and Arrow casts may hand 8 as 8.0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value

    return check


def _number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"must be a number in {bounds}")
        return float(value)

    return check


def _sampler(value: Any) -> str:
    if value not in SAMPLERS:
        raise ValueError(f"must be one of {SAMPLERS}")
    return value


def _stop_strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError("must be a non-empty string or a list of them")
    return tuple(items)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    from model.generation.requests import normalize_logit_bias  # pure Python; no Keras or JAX behind it

    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):  # a Parquet map column reads as (key, value) pairs
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p.get("key"), p.get("value")) for p in value]
    else:
        raise ValueError("must map token ids to biases")
    converted = []
    for key, bias in pairs:
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)  # JSON object keys are strings
        converted.append((key, bias))
    return normalize_logit_bias(converted)


def _logprobs(value: Any) -> int | None:
    """k in [0, MAX_LOGPROBS] as the spec key (0: off -> None); true is on with no alternatives (an OpenAI request's
    `logprobs: true` without `top_logprobs`), false off."""
    if isinstance(value, bool):
        return 0 if value else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"must be an integer in [0, {MAX_LOGPROBS}] (0: off), or true / false")
    return value or None


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "sampler": _sampler,
    "temperature": _number(0, math.inf),
    "top_k": _integer(1),
    "top_p": _number(0, 1, low_open=True),
    "min_p": _number(0, 1, high_open=True),
    "max_new_tokens": _integer(1),
    "stop_strings": _stop_strings,
    "seed": _integer(0),
    "repetition_penalty": _number(0, math.inf, low_open=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "response_format": canonical_response_format,
    "logprobs": _logprobs,
    "n": _integer(1),  # only from OpenAI Batch requests (batchgen.openai_batch), never a plain input column
}
