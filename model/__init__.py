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

# Names load on first use (PEP 562), so that light users (spec checking, `batchgen validate`, `batchgen presets`,
# `model.generation.requests`) import neither Keras nor JAX.
_EXPORTS = {
    "LlamaConfig": "model.config",
    "RopeScaling": "model.config",
    "LlamaBackbone": "model.backbone",
    "LlamaCausalLMPreprocessor": "model.preprocessor",
    "CausalLM": "model.causal_lm",
    "LlamaCausalLM": "model.causal_lm",
}
__all__ = sorted([*_EXPORTS, "samplers"])


def __getattr__(name: str):
    import importlib

    if name == "samplers":
        return importlib.import_module("model.samplers")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
