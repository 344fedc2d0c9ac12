"""keras-hub preset directories (the `save_to_preset` format of keras-hub 0.32): `layout` (what the files hold),
`reader` (load) and `writer` (save)."""

from model.checkpoints.keras_hub.reader import is_keras_hub_config, llama_config_from_keras_hub, load_keras_hub_preset
from model.checkpoints.keras_hub.writer import save_keras_hub_preset

__all__ = ["is_keras_hub_config", "llama_config_from_keras_hub", "load_keras_hub_preset", "save_keras_hub_preset"]
