"""Spec checks of the sampling keys for penalties, logit bias, beam / contrastive search and response_format.

The ranges are model.generation.requests.SamplingParams' (kept here so that checking a spec imports no Keras);
`fail(key, value, why)` raises the spec's SpecError naming the file, the key and the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from model.generation.requests import STREAMING_SAMPLERS

# Deterministic searches over several hypotheses per prompt; workers run them through model.generation.search.
SEARCH_SAMPLERS = ("beam", "contrastive")
# The samplers a job may name: those the streaming engine runs with per-request parameters (importing them
# loads neither Keras nor JAX), and the searches.
SAMPLERS = STREAMING_SAMPLERS + SEARCH_SAMPLERS
# OpenAI's types, plus a regular expression or a Lark / GBNF grammar (model.generation.grammar has the shapes).
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
# The most alternatives `logprobs = k` may ask for: the engine's (model.generation.logprobs.MAX_LOGPROBS, which
# imports JAX) and OpenAI's top_logprobs limit.
MAX_LOGPROBS = 20
# The output columns `logprobs` adds to a generation job (batchgen.rows.output_schema).
LOGPROB_COLUMNS = ("token_logprobs", "top_logprobs")


def check_search_and_penalties(config: Any, where: str, fail: Callable[[str, Any, str], Any]) -> None:
    """The keys of penalties, logit bias and beam / contrastive search (model.generation.requests' ranges)."""
    if not (math.isfinite(config.repetition_penalty) and config.repetition_penalty > 0):
        fail(f"{where}.repetition_penalty", config.repetition_penalty, "must be > 0 (1 = off)")
    for key in ("presence_penalty", "frequency_penalty"):
        value = getattr(config, key)
        if not (math.isfinite(value) and -2 <= value <= 2):
            fail(f"{where}.{key}", value, "must be in [-2, 2] (0 = off)")
    for token, bias in config.logit_bias.items():
        if not token.isdigit():
            fail(f"{where}.logit_bias", token, "keys must be token ids (digits, e.g. \"128009\" = -100)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            fail(f"{where}.logit_bias.{token}", bias, "must be a number in [-100, 100]")
    if config.num_beams < 1:
        fail(f"{where}.num_beams", config.num_beams, "must be >= 1")
    if not 0 <= config.alpha <= 1:
        fail(f"{where}.alpha", config.alpha, "must be in [0, 1]")
    if config.sampler in SEARCH_SAMPLERS:
        penalties = (config.repetition_penalty, config.presence_penalty, config.frequency_penalty) != (1.0, 0.0, 0.0)
        if penalties or config.logit_bias:
            fail(f"{where}.sampler", config.sampler, "does not apply penalties or logit_bias (use a streaming sampler)")
        if config.sampler == "beam" and config.stop_strings:
            fail(f"{where}.stop_strings", list(config.stop_strings), "cannot be honoured by the beam sampler")
        if config.temperature == 0:
            fail(f"{where}.temperature", config.temperature, f"must be > 0 for the {config.sampler} sampler")
        if config.response_format is not None:
            fail(f"{where}.sampler", config.sampler, "cannot honour response_format (use a streaming sampler)")
        if config.n > 1:
            fail(f"{where}.n", config.n, f"must be 1: the {config.sampler} sampler is deterministic, so every "
                 "sample would be the same")


def canonical_response_format(value: Any) -> str | None:
    """A response format (a table or its JSON text) as canonical JSON text, None for plain text; ValueError saying
    what is wrong with its shape (whether its schema or grammar compiles is the engine's to say)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"is not JSON: {error}") from error
    if not isinstance(value, Mapping) or value.get("type") not in RESPONSE_FORMAT_TYPES:
        raise ValueError(f"must be a table whose 'type' is one of {RESPONSE_FORMAT_TYPES}")
    if value["type"] == "json_schema" and not isinstance(value.get("json_schema"), Mapping):
        raise ValueError("of type 'json_schema' must hold a 'json_schema' table")
    for kind in ("regex", "grammar"):
        if value["type"] == kind and not (isinstance(value.get(kind), str) and value[kind]):
            raise ValueError(f"of type {kind!r} must hold the {kind} as a non-empty string under {kind!r}")
    if value["type"] == "text":
        return None  # plain text is what the engine generates anyway
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_logprobs(config: Any, where: str, spec: Any, fail: Callable[[str, Any, str], Any]) -> None:
    """`logprobs = k`: in [0, MAX_LOGPROBS], for streaming samplers of generation jobs only."""
    if not 0 <= config.logprobs <= MAX_LOGPROBS:
        fail(f"{where}.logprobs", config.logprobs, f"must be in [0, {MAX_LOGPROBS}] (0: off; k: the top k alternatives)")
    if not config.logprobs:
        return
    if config.sampler in SEARCH_SAMPLERS:
        fail(f"{where}.logprobs", config.logprobs, f"is not computed by the {config.sampler} sampler (use a streaming "
             "sampler, or 0)")
    if spec.task.kind != "generate":
        fail(f"{where}.logprobs", config.logprobs, f"applies to generation only; a {spec.task.kind} job writes "
             "log-probabilities anyway (task.per_token_logprobs for per-token ones)")
    clash = [c for c in spec.output.carry_columns if c in LOGPROB_COLUMNS]
    if clash:
        fail("output.carry_columns", list(spec.output.carry_columns), f"must not repeat the output column {clash[0]!r}")
