"""What every checkpoint reader returns: a backbone with its weights and the tokenizer that goes with it."""

from __future__ import annotations

import dataclasses
from typing import Any

from model.backbone import LlamaBackbone


@dataclasses.dataclass
class LoadedPreset:
    """A checkpoint loaded from any source (keras-hub preset, Hugging Face directory, GGUF file).

    `stop_token_ids` are the checkpoint's own end-of-generation ids (tokenizer end token, end-of-turn tokens,
    `generation_config.json`'s eos ids), used by `generate(stop_token_ids="auto")`. `sequence_length` is the
    preprocessor's default length when the source records one. `source` says where it came from, for messages.
    """

    backbone: LlamaBackbone
    tokenizer: Any | None  # a model.tokenizers tokenizer; None when the source ships none
    stop_token_ids: tuple[int, ...] = ()
    sequence_length: int | None = None
    source: str = ""
