"""LlamaCausalLMPreprocessor: strings to packed token ids for `fit()`, `generate()` and `score()`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from model.tokenizers.base import Tokenizer


class LlamaCausalLMPreprocessor:
    """Tokenizes and packs text to `sequence_length`, right-padded, as keras-hub's preprocessor does.

    Called on strings for training it returns `(x, y, sample_weight)`: x = {"token_ids", "padding_mask"} of
    length `sequence_length`, y the same ids shifted left by one, and sample_weight masking padding.

    Example:
        >>> x, y, w = preprocessor(["The quick brown fox"])
        >>> x["token_ids"].shape == (1, preprocessor.sequence_length)
        True
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        sequence_length: int = 1024,
        add_start_token: bool = True,
        add_end_token: bool = True,
    ) -> None:
        if sequence_length < 2:
            raise ValueError(f"sequence_length must be >= 2, got {sequence_length}")
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    def _ids(self, text: str, add_end: bool) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"expected a string to tokenize, got {type(text).__name__}: {text!r}")
        ids = list(self.tokenizer.tokenize(text))
        start = self.tokenizer.start_token_id
        if self.tokenizer.add_start_token and not self.add_start_token and ids[:1] == [start]:
            ids = ids[1:]  # the tokenizer adds it on its own; the caller asked for none
        if add_end and self.tokenizer.end_token_id is not None:
            ids.append(self.tokenizer.end_token_id)
        return ids

    def _pack(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
        token_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, np.int32)
        padding_mask = np.zeros((len(rows), length), bool)
        for i, ids in enumerate(rows):
            ids = ids[:length]
            token_ids[i, : len(ids)] = ids
            padding_mask[i, : len(ids)] = True
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def __call__(
        self, x: str | Sequence[str], y: Any = None, sample_weight: Any = None, sequence_length: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        if y is not None or sample_weight is not None:
            raise ValueError("a causal LM makes its own labels from x; pass raw strings only")
        texts = [x] if isinstance(x, str) else list(x)
        length = sequence_length or self.sequence_length
        # One extra token so that inputs and labels are both `length` long after the shift.
        packed = self._pack([self._ids(t, self.add_end_token) for t in texts], length + 1)
        inputs = {k: v[:, :-1] for k, v in packed.items()}
        return inputs, packed["token_ids"][:, 1:], packed["padding_mask"][:, 1:].astype("float32")

    def generate_preprocess(self, x: str | Sequence[str], sequence_length: int | None = None) -> dict[str, np.ndarray]:
        """Packs prompts for generation: start token, no end token, right padding."""
        texts = [x] if isinstance(x, str) else list(x)
        return self._pack([self._ids(t, add_end=False) for t in texts], sequence_length or self.sequence_length)

    def generate_postprocess(self, x: dict[str, np.ndarray]) -> list[str]:
        """Detokenizes packed outputs, dropping padding and the start / end / stop tokens."""
        special = {self.tokenizer.start_token_id, self.tokenizer.end_token_id, *self.tokenizer.stop_token_ids}
        texts = []
        for ids, mask in zip(np.asarray(x["token_ids"]), np.asarray(x["padding_mask"])):
            texts.append(self.tokenizer.detokenize([int(t) for t, m in zip(ids, mask) if m and int(t) not in special]))
        return texts

    def get_config(self) -> dict[str, Any]:
        return {
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }
