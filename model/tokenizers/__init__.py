"""Tokenizers of Llama-family checkpoints: the common interface, chat templates, and one class per kind."""

from model.tokenizers.chat_template import ChatTemplate
from model.tokenizers.base import END_OF_TURN_TOKENS, Tokenizer, default_stop_token_ids

__all__ = ["ChatTemplate", "END_OF_TURN_TOKENS", "Tokenizer", "default_stop_token_ids"]
