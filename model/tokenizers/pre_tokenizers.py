"""How a byte-level BPE vocabulary splits text into words before merging, by llama.cpp's `tokenizer.ggml.pre` name.

A GGUF file names its pre-tokenizer instead of storing it. The splits below are llama.cpp's (`llama-vocab.cpp`,
`regex_exprs` per `LLAMA_VOCAB_PRE_TYPE_*`) written as Hugging Face `tokenizers` pre-tokenizers, the form the
checkpoints' own `tokenizer.json` files use:
- "gpt2" and "default": GPT-2's regex, which `ByteLevel(use_regex=True)` applies.
- "smollm" (SmolLM, StarCoder and others): every digit on its own (`\\p{N}`), then GPT-2's regex; SmolLM2's
  tokenizer.json writes the same thing as `Digits(individual_digits=True)` before `ByteLevel`.
- "llama-bpe" (Llama 3 and kin): Llama 3's regex (numbers in groups of up to three), as in transformers'
  GGUF converter and Llama 3's tokenizer.json; llama.cpp also matches whole words against the vocabulary before
  merging (`ignore_merges`), as Llama 3's tokenizer.json does.
"""

from __future__ import annotations

import dataclasses

from tokenizers import Regex, pre_tokenizers

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class PreTokenization:
    """A pre-tokenizer and whether whole words found in the vocabulary skip the merges."""

    pre_tokenizer: pre_tokenizers.PreTokenizer
    ignore_merges: bool
    # llama.cpp's default for `tokenizer.ggml.add_bos_token` when a file does not say (True for Llama 3).
    adds_start_token: bool


def _gpt2() -> PreTokenization:
    return PreTokenization(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False)


def _digits_then_gpt2() -> PreTokenization:
    split = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
    return PreTokenization(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        False,
        False,
    )


def _llama3() -> PreTokenization:
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    return PreTokenization(
        pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        True,
        True,
    )


_BUILDERS = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "gpt-2": _gpt2,
    "mpt": _gpt2,
    "olmo": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "command-r": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": _llama3,
    "llama3": _llama3,
    "llama-v3": _llama3,
    "smaug-bpe": _llama3,
    "falcon3": _llama3,
    "pixtral": _llama3,
}

SUPPORTED = tuple(sorted(_BUILDERS))


def pre_tokenization(name: str) -> PreTokenization:
    """The pre-tokenization llama.cpp applies for `tokenizer.ggml.pre = name`; ValueError for unknown names."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unsupported byte-level BPE pre-tokenizer {name!r}; supported: {', '.join(SUPPORTED)}")
    return builder()
