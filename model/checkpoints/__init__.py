"""Checkpoint loading for `from_preset`: built-in presets, hub handles, keras-hub, Hugging Face and GGUF sources.

Names load on first use (PEP 562): listing presets and checking that one is available (`batchgen presets`,
`batchgen validate`) import neither Keras nor JAX; loading one does.
"""

_EXPORTS = {
    "BUILTIN_PRESETS": "model.checkpoints.presets",
    "BuiltinPreset": "model.checkpoints.presets",
    "list_presets": "model.checkpoints.presets",
    "LoadedPreset": "model.checkpoints.loaded_preset",
    "load_preset": "model.checkpoints.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model.checkpoints' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
