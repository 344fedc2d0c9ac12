"""Hugging Face checkpoint directories: config.json, safetensors (single or sharded, float32/16, bfloat16), tokenizer.

A directory as `save_pretrained` writes it (or as the Hub serves it) holds `config.json`, the weights as
`model.safetensors` or shards listed in `model.safetensors.index.json`, a tokenizer (`tokenizer.json` or
SentencePiece `tokenizer.model`) with `tokenizer_config.json`, and optionally `generation_config.json` with the
end-of-generation ids. It is read through fsspec, so it may sit at any URL. Safetensors files are parsed here
(an 8-byte header length, a JSON header, raw little-endian data), because the safetensors package's numpy
reader cannot return bfloat16; each tensor is read on its own byte range, so remote shards need no local copy.
Pickled weights (`pytorch_model.bin`) are refused: unpickling a downloaded file runs its code.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import ml_dtypes
import numpy as np

from model.backbone import LlamaBackbone
from model.checkpoints.loaded_preset import LoadedPreset
from model.checkpoints.resolve import display
from model.checkpoints.weights import CheckpointTensor, assign_weights
from model.config import LlamaConfig, RopeScaling
from model.tokenizers import Tokenizer, tokenizer_from_huggingface

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger "length" means this is no safetensors file

# Hugging Face tensor name (after "model." / "model.layers.{i}.") -> backbone path; all matmuls in torch layout.
_GLOBAL_TENSORS = {
    "embed_tokens.weight": ("token_embedding", False),
    "norm.weight": ("final_norm", False),
}
_LAYER_TENSORS = {
    "input_layernorm.weight": ("layers/attention_norm", False),
    "self_attn.q_proj.weight": ("layers/query", True),
    "self_attn.k_proj.weight": ("layers/key", True),
    "self_attn.v_proj.weight": ("layers/value", True),
    "self_attn.o_proj.weight": ("layers/attention_output", True),
    "post_attention_layernorm.weight": ("layers/mlp_norm", False),
    "mlp.gate_proj.weight": ("layers/gate", True),
    "mlp.up_proj.weight": ("layers/up", True),
    "mlp.down_proj.weight": ("layers/down", True),
}


def is_huggingface_config(config: Mapping[str, Any]) -> bool:
    """Whether a parsed config.json looks like a transformers model config (not a keras-hub one)."""
    return "registered_name" not in config and ("architectures" in config or "model_type" in config)


def llama_config_from_huggingface(config: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """The `LlamaConfig` of a transformers `config.json`, in the transformers-4 or -5 layout.

    transformers 4 keeps `rope_theta` and `rope_scaling` ({"rope_type" or "type": "linear" | "llama3", ...})
    at the top level; transformers 5 nests both in `rope_parameters`. Raises ValueError naming `source` for a
    non-Llama architecture or a feature this model does not have (biases, another activation, other RoPE kinds).
    """
    architectures = config.get("architectures") or []
    if architectures:
        if not any(a in LLAMA_ARCHITECTURES for a in architectures):
            raise ValueError(
                f"{source}: architecture {', '.join(map(str, architectures))} is not a Llama causal LM "
                f"(batchgen loads {', '.join(LLAMA_ARCHITECTURES)})"
            )
    elif config.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not a Llama causal LM ('llama')")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source}: {flag}=true, but Llama layers here have no biases")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"{source}: hidden_act {activation!r} is not supported; Llama's MLP uses 'silu'")
    try:
        heads = int(config["num_attention_heads"])
        rope_theta, rope_scaling = _rope(config, source)
        return LlamaConfig(
            vocabulary_size=int(config["vocab_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_query_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            hidden_dim=int(config["hidden_size"]),
            intermediate_dim=int(config["intermediate_size"]),
            head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
            rope_max_wavelength=rope_theta,
            rope_scaling=rope_scaling,
            layer_norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_sequence_length=int(config.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def _rope(config: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either config layout."""
    parameters = config.get("rope_parameters")
    if parameters:  # transformers 5
        theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = parameters
    else:  # transformers 4
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # "type" is the older spelling
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return float(theta), RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"{source}: rope type {kind!r} is not supported (default, linear and llama3 are)")


def load_huggingface_checkpoint(
    fs: fsspec.AbstractFileSystem, path: str, load_weights: bool = True, dtype: Any = None
) -> LoadedPreset:
    """Reads the Hugging Face directory at `path` on `fs` into a backbone, tokenizer and stop ids.

    Example:
        >>> import fsspec
        >>> loaded = load_huggingface_checkpoint(fsspec.filesystem("file"), "/models/llama")  # doctest: +SKIP
    """
    source = display(fs, path)
    config_path = posixpath.join(path, "config.json")
    hf_config = _read_json(fs, config_path)
    config = llama_config_from_huggingface(hf_config, source=display(fs, config_path))
    backbone = LlamaBackbone(config, dtype=dtype, random_init=not load_weights)
    if load_weights:
        tensors = huggingface_tensors(fs, path, config)
        assign_weights(backbone, tensors, checkpoint=source)
    tokenizer = _load_tokenizer(fs, path)
    stop_ids = list(_eos_ids(fs, path, hf_config))
    if tokenizer is not None:
        stop_ids.extend(id for id in tokenizer.stop_token_ids if id not in stop_ids)
    return LoadedPreset(backbone=backbone, tokenizer=tokenizer, stop_token_ids=tuple(stop_ids), source=source)


def huggingface_tensors(
    fs: fsspec.AbstractFileSystem, path: str, config: LlamaConfig
) -> dict[str, CheckpointTensor | list[CheckpointTensor]]:
    """The backbone's tensors as stored in the directory's safetensors files (headers read, data not yet)."""
    stored = _safetensors_catalog(fs, path)
    prefix = "model." if "model.embed_tokens.weight" in stored else ""

    def take(name: str, torch_layout: bool) -> CheckpointTensor:
        if name not in stored:
            files = sorted({t.file for t in stored.values()})
            raise ValueError(f"{display(fs, path)}: tensor {name!r} is in none of {files}")
        tensor = stored[name]
        return CheckpointTensor(tensor.file, tensor.name, tensor.shape, tensor.read, torch_layout=torch_layout)

    tensors: dict[str, CheckpointTensor | list[CheckpointTensor]] = {}
    for name, (backbone_path, torch_layout) in _GLOBAL_TENSORS.items():
        tensors[backbone_path] = take(prefix + name, torch_layout)
    if not config.tie_word_embeddings:  # a tied checkpoint may still store lm_head.weight; it is the same table
        tensors["lm_head"] = take("lm_head.weight", True)
    for name, (backbone_path, torch_layout) in _LAYER_TENSORS.items():
        tensors[backbone_path] = [
            take(f"{prefix}layers.{i}.{name}", torch_layout) for i in range(config.num_layers)
        ]
    return tensors


def _safetensors_catalog(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, CheckpointTensor]:
    """Every tensor of the directory's safetensors files by name, from the index or the files' headers."""
    index_path = posixpath.join(path, SAFETENSORS_INDEX)
    if fs.exists(index_path):
        weight_map = _read_json(fs, index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{display(fs, index_path)}: no 'weight_map' of tensor name -> shard file")
        files = sorted(set(weight_map.values()))
        for file in files:
            if not fs.exists(posixpath.join(path, file)):
                raise FileNotFoundError(
                    f"{display(fs, index_path)} lists shard {file!r}, which is not in {display(fs, path)}"
                )
    elif fs.exists(posixpath.join(path, SAFETENSORS_SINGLE)):
        files = [SAFETENSORS_SINGLE]
    else:
        files = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
    if not files:
        names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"{display(fs, path)} holds only pickled weights ({', '.join(pickles)}); batchgen never "
                "unpickles checkpoint files (unpickling runs code from the file). Convert them to safetensors, "
                "e.g. model.save_pretrained(dir, safe_serialization=True) with transformers."
            )
        raise FileNotFoundError(
            f"{display(fs, path)}: no weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or *.safetensors); "
            f"found {names}"
        )
    catalog: dict[str, CheckpointTensor] = {}
    for file in files:
        catalog.update(safetensors_tensors(fs, posixpath.join(path, file)))
    return catalog


def safetensors_tensors(fs: fsspec.AbstractFileSystem, file_path: str) -> dict[str, CheckpointTensor]:
    """The tensors of one safetensors file, each read from its own byte range when asked."""
    shown = display(fs, file_path)
    with fs.open(file_path, "rb") as f:
        head = f.read(8)
        header_bytes = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_bytes <= _MAX_HEADER_BYTES:
            raise ValueError(f"{shown} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{shown} is not a safetensors file (header is not JSON: {e})") from e
    data_start = 8 + header_bytes
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(
                f"{shown}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(_SAFETENSORS_DTYPES)}"
            )
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{shown}: tensor {name!r} of shape {shape} {entry['dtype']} spans {end - begin} bytes")
        tensors[name] = CheckpointTensor(
            file=shown,
            name=name,
            shape=shape,
            read=_range_reader(fs, file_path, data_start + begin, end - begin, dtype, shape),
        )
    return tensors


def _range_reader(
    fs: fsspec.AbstractFileSystem, file_path: str, offset: int, size: int, dtype: np.dtype, shape: tuple[int, ...]
) -> Callable[[], np.ndarray]:
    """Reads one tensor's bytes (a range request on object stores) into a read-only array."""

    def read() -> np.ndarray:
        with fs.open(file_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{display(fs, file_path)} is truncated: wanted {size} bytes at {offset}")
        return np.frombuffer(data, dtype.newbyteorder("<")).reshape(shape)

    return read


def _eos_ids(fs: fsspec.AbstractFileSystem, path: str, hf_config: Mapping[str, Any]) -> tuple[int, ...]:
    """End-of-generation ids: generation_config.json's eos_token_id (int or list), else config.json's."""
    generation_path = posixpath.join(path, "generation_config.json")
    eos = None
    if fs.exists(generation_path):
        eos = _read_json(fs, generation_path).get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids))


def _load_tokenizer(fs: fsspec.AbstractFileSystem, path: str) -> Tokenizer | None:
    """The directory's tokenizer (tokenizer.model or tokenizer.json), or None when it ships neither."""
    if not any(fs.exists(posixpath.join(path, name)) for name in ("tokenizer.model", "tokenizer.json")):
        return None
    return tokenizer_from_huggingface(display(fs, path))


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    shown = display(fs, path)
    if not fs.exists(path):
        raise FileNotFoundError(f"{shown} does not exist")
    with fs.open(path, "r", encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{shown} should hold a JSON object, got {type(value).__name__}")
    return value
