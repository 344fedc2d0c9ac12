"""Shared fixtures: tiny random models (most tests) and the real demo model (marked slow)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest  # noqa: E402

from model.config import LlamaConfig  # noqa: E402

TINY = dict(
    vocabulary_size=96, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
    intermediate_dim=32, max_sequence_length=256,
)


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig(**TINY)


@pytest.fixture
def tiny_backbone(tiny_config):
    import keras

    from model.backbone import LlamaBackbone

    keras.utils.set_random_seed(0)
    return LlamaBackbone(tiny_config)
