"""A Llama causal LM in Keras 3 on JAX, with the public API of `keras_hub.models.LlamaCausalLM`.

Layout: `config` (architecture), `transformer` (the pure forward pass) and `backbone` (the Keras model owning
the weights); `tokenizers/`, `preprocessor`; `generation/` (the continuous-batching engine) and `samplers/`;
`checkpoints/` (keras-hub presets, Hugging Face directories, GGUF files, built-in presets); `causal_lm` ties
them together.
"""

import os

# batchgen runs on JAX; set it before Keras is first imported so users need not export it themselves.
os.environ.setdefault("KERAS_BACKEND", "jax")
if os.environ["KERAS_BACKEND"] != "jax":
    raise ImportError(f"batchgen's model needs KERAS_BACKEND=jax, found {os.environ['KERAS_BACKEND']!r}")

from model.config import LlamaConfig, RopeScaling  # noqa: E402
from model.backbone import LlamaBackbone  # noqa: E402
from model.preprocessor import LlamaCausalLMPreprocessor  # noqa: E402
from model.causal_lm import CausalLM, LlamaCausalLM  # noqa: E402
from model import samplers  # noqa: E402

__all__ = [
    "CausalLM", "LlamaBackbone", "LlamaCausalLM", "LlamaCausalLMPreprocessor", "LlamaConfig", "RopeScaling",
    "samplers",
]
