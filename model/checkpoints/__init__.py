"""Checkpoint loading for `from_preset`: built-in presets, hub handles, keras-hub, Hugging Face and GGUF sources."""

from model.checkpoints.loaded_preset import LoadedPreset
from model.checkpoints.loader import load_preset
from model.checkpoints.presets import BUILTIN_PRESETS, BuiltinPreset, list_presets

__all__ = ["BUILTIN_PRESETS", "BuiltinPreset", "LoadedPreset", "list_presets", "load_preset"]
