"""`load_preset`: one entry point for every checkpoint source `from_preset` accepts.

Dispatch, in order: a built-in preset name (its Kaggle handle, or the demo model's GGUF file); `hf://` and
`kaggle://` handles (downloaded, then treated as a directory); then, at any local path or fsspec URL, a GGUF file,
a keras-hub preset directory (config.json with a keras-hub `registered_name`, e.g. `keras_hub>LlamaBackbone`), a
Hugging Face directory (config.json with `architectures` / `model_type`), or a directory holding exactly one GGUF
file.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec

from model.checkpoints import huggingface, presets, resolve
from model.checkpoints.gguf import load_gguf_checkpoint
from model.checkpoints.loaded_preset import LoadedPreset

GGUF_MAGIC = b"GGUF"


def load_preset(preset: str | os.PathLike[str], *, load_weights: bool = True, dtype: Any = None) -> LoadedPreset:
    """Loads a backbone, tokenizer and stop ids from any supported source.

    `load_weights=False` reads only the config and tokenizer and keeps the random initialisation. `dtype` is the
    backbone's Keras dtype policy ("float32", "bfloat16", ...; None: Keras' default).

    Example:
        >>> loaded = load_preset("smollm2_135m_instruct")  # doctest: +SKIP
        >>> loaded.backbone.config.num_layers  # doctest: +SKIP
        30
    """
    name = os.fspath(preset)
    if name in presets.BUILTIN_PRESETS:
        loaded = load_preset(presets.preset_location(name), load_weights=load_weights, dtype=dtype)
        loaded.source = f"{name} ({loaded.source})"
        return loaded
    where = resolve.resolve(name)
    fs, path = where.fs, where.path
    shown = where.url
    if not fs.exists(path):
        hint = ""
        if "/" not in name and "\\" not in name and not name.endswith(".gguf"):
            hint = f"; built-in presets: {', '.join(presets.BUILTIN_PRESETS)}"
        raise FileNotFoundError(f"preset {name!r}: {shown} does not exist{hint}")
    if fs.isfile(path):
        if _is_gguf(fs, path):
            return load_gguf_checkpoint(resolve.local_file(fs, path), load_weights, dtype, source=shown)
        raise ValueError(
            f"preset {name!r}: {shown} is a file but not a GGUF file; pass a GGUF file or a preset directory "
            "(keras-hub preset or Hugging Face checkpoint)"
        )
    return _load_directory(fs, path, shown, load_weights, dtype)


def _load_directory(
    fs: fsspec.AbstractFileSystem, path: str, shown: str, load_weights: bool, dtype: Any
) -> LoadedPreset:
    config_path = posixpath.join(path, "config.json")
    if fs.exists(config_path):
        with fs.open(config_path, "r", encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{resolve.display(fs, config_path)} is not valid JSON: {e}") from e
        from model.checkpoints import keras_hub

        # Any keras-hub (or older keras-nlp) serialization goes to the keras-hub reader, which accepts
        # LlamaBackbone and Llama3Backbone and names any other class in its error.
        if isinstance(config, dict) and keras_hub.is_keras_hub_config(config):
            return keras_hub.load_keras_hub_preset(fs, path, load_weights, dtype)
        if isinstance(config, dict) and huggingface.is_huggingface_config(config):
            return huggingface.load_huggingface_checkpoint(fs, path, load_weights, dtype)
        raise ValueError(
            f"{resolve.display(fs, config_path)} is neither a keras-hub preset config (registered_name) nor a "
            "Hugging Face config (architectures / model_type)"
        )
    ggufs = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".gguf"))
    if len(ggufs) == 1:
        return load_gguf_checkpoint(
            resolve.local_file(fs, ggufs[0]), load_weights, dtype, source=resolve.display(fs, ggufs[0])
        )
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
    if len(ggufs) > 1:
        raise ValueError(f"{shown} holds several GGUF files {names}; pass the one to load")
    raise ValueError(
        f"{shown} is not a checkpoint batchgen can read: no config.json (keras-hub preset or Hugging Face "
        f"directory) and no .gguf file; it holds {names}"
    )


def _is_gguf(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    with fs.open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
