"""The Llama architecture as one frozen dataclass.

Only architecture lives here; runtime settings (batch size, cache length, dtype of a run) stay out, so two
checkpoints with equal configs are interchangeable. `LlamaBackbone.get_config()` is derived from these fields,
so a new field cannot be forgotten on save.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched beyond the trained context.

    `kind` is "linear" (positions divided by `factor`) or "llama3" (Llama 3.1: low frequencies divided by
    `factor`, high ones kept, a smooth ramp between).
    """

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling kind must be 'linear' or 'llama3', got {self.kind!r}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder.

    Example:
        >>> LlamaConfig(vocabulary_size=32, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        ...             hidden_dim=8, intermediate_dim=16).head_dim
        2
    """

    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    intermediate_dim: int
    head_dim: int | None = None  # None: hidden_dim // num_query_heads, filled in __post_init__
    rope_max_wavelength: float = 10000.0
    rope_scaling: RopeScaling | None = None
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    max_sequence_length: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.head_dim is None:
            if self.hidden_dim % self.num_query_heads:
                raise ValueError(
                    f"hidden_dim {self.hidden_dim} is not divisible by num_query_heads {self.num_query_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_dim // self.num_query_heads)
        if self.num_query_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_query_heads {self.num_query_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        for name in ("vocabulary_size", "num_layers", "hidden_dim", "intermediate_dim", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one KV head (G)."""
        return self.num_query_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown Llama config fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        return cls(**values)

    def num_parameters(self) -> int:
        """Weights in the model (the tied LM head counted once)."""
        h, d = self.hidden_dim, self.head_dim
        attention = h * d * (self.num_query_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_dim
        per_layer = attention + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocabulary_size * h
        return self.vocabulary_size * h + self.num_layers * per_layer + h + head
