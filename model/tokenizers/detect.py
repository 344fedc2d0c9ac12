"""Which tokenizer a checkpoint's files describe: a Hugging Face directory or GGUF metadata -> the right class.

Above both tokenizer classes (they read `huggingface_files` and `gguf_metadata`, this module picks between them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from model.tokenizers import storage
from model.tokenizers.base import Tokenizer
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from model.tokenizers.sentencepiece_tokenizer import LlamaTokenizer


def tokenizer_from_huggingface(directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint directory (path or URL).

    A SentencePiece `tokenizer.model` wins over `tokenizer.json` when both are there (Llama 2 repositories ship
    both): SentencePiece itself is the reference the converted tokenizer.json only approximates.
    """
    if storage.exists(storage.join(directory, "tokenizer.model")):
        return LlamaTokenizer.from_huggingface(directory)
    if storage.exists(storage.join(directory, "tokenizer.json")):
        return BytePairTokenizer.from_huggingface(directory)
    raise FileNotFoundError(f"{os.fspath(directory)} has neither tokenizer.model nor tokenizer.json")


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer that GGUF metadata describes; ValueError naming `tokenizer.ggml.model` when unsupported."""
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        return BytePairTokenizer.from_gguf_metadata(metadata)
    if model == "llama":
        return LlamaTokenizer.from_gguf_metadata(metadata)
    raise ValueError(
        f"GGUF tokenizer.ggml.model {model!r} is not supported; batchgen reads 'gpt2' (byte-level BPE) and "
        "'llama' (SentencePiece)"
    )
