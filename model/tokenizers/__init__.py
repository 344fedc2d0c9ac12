"""Tokenizers of Llama-family checkpoints: the common interface, chat templates, and one class per kind.

- `LlamaTokenizer`: SentencePiece `tokenizer.model` or GGUF `tokenizer.ggml.model = llama` (Llama 2).
- `BytePairTokenizer`: byte-level BPE from tokenizer.json, keras-hub vocabulary.json + merges.txt, or GGUF
  metadata (Llama 3, SmolLM).
- `tokenizer_from_huggingface(directory)` and `tokenizer_from_gguf_metadata(metadata)` pick the kind.
"""

from model.tokenizers.chat_template import ChatTemplate
from model.tokenizers.base import END_OF_TURN_TOKENS, Tokenizer, default_stop_token_ids
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from model.tokenizers.sentencepiece_tokenizer import LlamaTokenizer
from model.tokenizers.detect import tokenizer_from_gguf_metadata, tokenizer_from_huggingface
from model.tokenizers.gguf_metadata import read_gguf_metadata

__all__ = [
    "BytePairTokenizer",
    "ChatTemplate",
    "END_OF_TURN_TOKENS",
    "LlamaTokenizer",
    "Tokenizer",
    "default_stop_token_ids",
    "read_gguf_metadata",
    "tokenizer_from_gguf_metadata",
    "tokenizer_from_huggingface",
]
