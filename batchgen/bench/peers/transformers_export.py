"""The benchmark's model as a transformers export (`save_pretrained`), made once from its GGUF file and cached.

CTranslate2's converter and vLLM read a Hugging Face model folder; transformers dequantizes the GGUF file to
float32 (the same weights our engine loads) and writes one. Imported by the peer scripts as a sibling module;
needs torch and transformers, imported only when an export must be made.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchgen" / "bench-peers"


def file_key(path: Path) -> str:
    """A folder name for what is made from `path`: its stem and the start of its SHA-256 (a new file, a new key)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def cached(target: Path, make) -> Path:
    """`target`, made by `make(folder)` into a temporary sibling first and renamed, so a half-made one never counts."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another run made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def transformers_export(gguf_path: str, cache_dir: str | None) -> Path:
    """The folder of the export of `gguf_path` (config, float32 safetensors, tokenizer) under `cache_dir`."""
    gguf = Path(gguf_path)
    if not gguf.is_file():
        raise FileNotFoundError(f"transformers export: GGUF file {gguf} does not exist")
    target = Path(cache_dir or DEFAULT_CACHE) / "transformers" / file_key(gguf)

    def make(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a model read from GGUF as quantized and refuses to save it, although its weights are
        # plain float32 by now: move them into a model built from the same config without the GGUF marker.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))

    return cached(target, make)
