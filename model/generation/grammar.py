"""Structured output: a request's `response_format` compiled into a grammar, and its token masks per decode step.

The grammar library is llguidance (README, "Structured output", has the measurements behind the choice): a JSON
schema compiles in ~1-5 ms for a 49k vocabulary and the masks of 64 rows take ~1.5 ms per step on two cores.

Formats (OpenAI's `response_format` shape, canonical JSON text):
  {"type": "json_object"}                                   any JSON object
  {"type": "json_schema", "json_schema": {"schema": {...}}}  JSON that validates against the schema
  {"type": "regex", "regex": "..."}                          text matching the regular expression, whole
  {"type": "grammar", "grammar": "..."}                      a Lark grammar (llguidance's dialect, `start:` rule)
                                                             or a GBNF (llama.cpp EBNF, `root ::=` rule)
JSON is compact (no whitespace between tokens) unless the schema says otherwise in llguidance's "x-guidance"
key: free whitespace lets a small model emit blank lines until its token budget runs out.

Each distinct format compiles once (`Grammars` keeps the compiled matchers by canonical text); each slot gets a
copy in its start state. Every step the host writes the masks of the constrained slots into an int32 bitmask
[B, ceil(V / 32)] (bit t % 32 of word t // 32: token t is allowed) and the jitted step applies it
(`apply_token_mask`); the sampled token then advances the slot's matcher.

Example:
    >>> grammars = Grammars(tokenizer, vocabulary_size=49152)
    >>> grammars.problem('{"type":"regex","regex":"[0-9]+"}') is None
    True
"""

from __future__ import annotations

import collections
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import llguidance
import llguidance.numpy
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

# Compiled formats kept at once: a job whose rows each bring their own schema must not grow without bound.
CACHE_SIZE = 256
# What JSON formats default to (a schema's own "x-guidance" settings win).
JSON_DEFAULTS = {"whitespace_flexible": False}


def mask_words(vocabulary_size: int) -> int:
    """Int32 words per row of a token bitmask over `vocabulary_size` tokens."""
    return -(-vocabulary_size // 32)


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """The logits [B, V] with every token whose bit is clear in `mask` [B, ceil(V / 32)] int32 set to -inf."""
    b, v = logits.shape
    assert mask.shape == (b, mask_words(v)), (mask.shape, logits.shape)
    words = jax.lax.bitcast_convert_type(mask, jnp.uint32)
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]: bit j of word w is token 32w + j
    return jnp.where(bits.reshape(b, -1)[:, :v] != 0, logits, -jnp.inf)


class FormatError(ValueError):
    """A response format that is not one of the shapes above."""


def grammar_text(response_format: str) -> str:
    """The llguidance grammar of a canonical `response_format`; FormatError saying what is wrong with its shape."""
    try:
        spec = json.loads(response_format)
    except json.JSONDecodeError as error:
        raise FormatError(f"is not JSON: {error}") from error
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
    if kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema")
        if not isinstance(schema, (dict, bool)):
            raise FormatError("of type 'json_schema' needs a JSON schema under json_schema.schema")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    if kind == "regex":
        if not isinstance(spec.get("regex"), str):
            raise FormatError("of type 'regex' needs the regular expression as a string under 'regex'")
        return llguidance.LLMatcher.grammar_from_regex(spec["regex"])
    if kind == "grammar":
        if not isinstance(spec.get("grammar"), str):
            raise FormatError("of type 'grammar' needs a Lark or GBNF grammar as a string under 'grammar'")
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec["grammar"]))
    raise FormatError(f"has type {kind!r}; structured output takes json_object, json_schema, regex or grammar")


class Grammars:
    """Compiles response formats for one tokenizer, keeps them by canonical text, and fills token masks.

    The tokenizer's view for the library is built on first use (~0.5-1 s for a 49k vocabulary), so an engine
    that never sees a response format never pays for it.
    """

    def __init__(self, tokenizer: Any, vocabulary_size: int, end_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.vocabulary_size = vocabulary_size
        self.end_token_ids = tuple(end_token_ids) or tuple(getattr(tokenizer, "stop_token_ids", ()) or ())
        self._library_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher | str] = collections.OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    def problem(self, response_format: str) -> str | None:
        """Why `response_format` cannot constrain generation (it does not compile), or None."""
        compiled = self._compile(response_format)
        return compiled if isinstance(compiled, str) else None

    def matcher(self, response_format: str) -> llguidance.LLMatcher:
        """A matcher in the start state of `response_format` (which must compile: see `problem`)."""
        compiled = self._compile(response_format)
        assert not isinstance(compiled, str), compiled
        return compiled.deep_copy()

    def fill(self, mask: np.ndarray, rows: Sequence[tuple[llguidance.LLMatcher, int]]) -> None:
        """Writes the allowed tokens of each (matcher, row) into row `row` of `mask` [B, W] int32."""
        assert mask.dtype == np.int32 and mask.flags["C_CONTIGUOUS"], (mask.dtype, mask.flags)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, list(rows), mask)

    def token_mask(self, states: Sequence[Any], rows: int) -> np.ndarray | None:
        """The allowed-token bitmask [rows, ceil(V / 32)] of a call whose row i is the slot `states[i]` (None: a row
        without a sequence), or None when no row has a grammar. Rows without one allow every token.

        The library allows its end tokens once the grammar may end; a request with stop tokens of its own gets
        those allowed instead, so that it ends the way an unconstrained one does.
        """
        constrained = [(s.grammar, i) for i, s in enumerate(states) if s is not None and s.grammar is not None]
        if not constrained:
            return None
        mask = np.full((rows, mask_words(self.vocabulary_size)), -1, np.int32)
        self.fill(mask, constrained)
        words = mask.view(np.uint32)  # the same memory, with bit 31 as easy to set as the others
        library_ends = [t for t in self.end_token_ids if t < self.vocabulary_size]
        for matcher, i in constrained:
            stop_ids = [t for t in states[i].stop_token_ids if t < self.vocabulary_size]
            if not stop_ids:
                continue
            for t in library_ends:
                words[i, t // 32] &= ~np.uint32(1 << (t % 32))
            if matcher.is_accepting():
                for t in stop_ids:
                    words[i, t // 32] |= np.uint32(1 << (t % 32))
        return mask

    def _compile(self, response_format: str) -> llguidance.LLMatcher | str:
        key = _canonical(response_format)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        try:
            grammar = grammar_text(key)
            matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            compiled: llguidance.LLMatcher | str = matcher
            if matcher.is_error():
                compiled = f"does not compile: {matcher.get_error().strip()}"
        except FormatError as error:
            compiled = str(error)
        except ValueError as error:  # llguidance raises ValueError for a schema it cannot read
            compiled = f"does not compile: {error}"
        self._compiled[key] = compiled
        if len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._library_tokenizer is None:
            if self.tokenizer is None:
                raise FormatError("needs the model's tokenizer, and this engine has none")
            self._library_tokenizer = library_tokenizer(self.tokenizer, self.vocabulary_size, self.end_token_ids)
        return self._library_tokenizer


def library_tokenizer(tokenizer: Any, vocabulary_size: int, end_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of one of batchgen's tokenizers: from its tokenizer.json when it is byte-level BPE, else
    from each token's bytes (SentencePiece: "▁" is a space, <0xNN> a byte)."""
    end = list(end_token_ids) or None
    if hasattr(tokenizer, "to_tokenizer_json"):
        return llguidance.LLTokenizer(tokenizer.to_tokenizer_json(), n_vocab=vocabulary_size, eos_token=end)
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_Pieces(tokenizer, end)), n_vocab=vocabulary_size, eos_token=end
    )


class _Pieces:
    """The vocabulary of a SentencePiece tokenizer as llguidance's generic tokenizer takes it."""

    def __init__(self, tokenizer: Any, end: list[int] | None) -> None:
        self._tokenizer = tokenizer
        special = set(getattr(tokenizer, "special_tokens", {}).values())
        self.special_token_ids = sorted(special)
        self.eos_token_id = (end or [tokenizer.end_token_id])[0]
        self.bos_token_id = tokenizer.start_token_id
        self.tokens = [_piece_bytes(tokenizer.id_to_token(i), i in special) for i in range(tokenizer.vocabulary_size())]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer._encode(text)


def _piece_bytes(piece: str, special: bool) -> bytes:
    if special:
        return piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _canonical(response_format: str) -> str:
    try:
        return json.dumps(json.loads(response_format), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return response_format  # grammar_text says what is wrong with it
