"""keras-hub preset directories (the `save_to_preset` format of keras-hub 0.32): read and written.

A preset directory holds:
- config.json: the backbone's Keras serialization; `registered_name` is "keras_hub>LlamaBackbone" or
  "keras_hub>Llama3Backbone" ("keras_nlp>..." in presets saved before the rename), its constructor arguments
  under "config".
- model.weights.h5: the Keras weights file of the backbone. Each layer's variables are the datasets
  `<group>/vars/0`, `/1`, ...; groups are named by layer class and order, not by layer name, e.g.
  layers/llama_transformer_decoder_1/_self_attention_layer/_query_dense. Large models are split instead:
  model.weights.json maps each "/<group>/vars" to the shard file(s) model_0000N.weights.h5 holding it.
- tokenizer.json + assets/tokenizer/: vocabulary.spm (SentencePiece, `LlamaTokenizer`) or vocabulary.json +
  merges.txt (byte-level BPE, `Llama3Tokenizer`); preprocessor.json (sequence_length, add_start_token);
  task.json (the CausalLM holding both); metadata.json (versions, date; keras-hub never reads it back).

Weights are read with h5py (no keras-hub, no Keras deserialization: nothing in the files is executed). keras-hub's
per-layer kernels already have the backbone's per-layer shapes (query [M, H, D], attention_output [H, D, M],
gate/up [M, F], down [F, M], the reverse embedding [M, V]), so they are stacked along the layer axis as stored.
Int8 presets (`quantize("int8")` in keras-hub: int8 kernel + per-output-channel `kernel_scale`, with
w = kernel / kernel_scale) load as a batchgen int8 backbone with the same per-channel grouping.

What keras-hub 0.32's format cannot carry, and how batchgen handles it:
- keras-hub leaves `tie_word_embeddings` out of config.json (so it cannot reload its own tied presets); batchgen
  writes the key, which keras-hub's constructor accepts, and on reading infers the tie from the weights file
  (a tied embedding has no reverse embedding dataset) when the key is absent.
- keras-hub stores `rope_position_scaling_factor` but its Llama rotary embedding never applies it, so a preset
  with a factor other than 1 has no well-defined meaning: reading one is an error, as is writing linear rope
  scaling. Llama 3.1 frequency scaling maps onto the four `rope_*_factor` / pretraining-length keys.
- The context length, a chat template and a non-Llama-3 BPE split are not part of the format; batchgen keeps
  them in metadata.json under "batchgen" and reads them back from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import h5py
import keras
import ml_dtypes
import numpy as np
import tokenizers
from fsspec.implementations.local import LocalFileSystem

from model.backbone import QUANTIZED_KERNELS, LlamaBackbone, weight_shapes
from model.checkpoints.loaded_preset import LoadedPreset
from model.checkpoints.weights import CheckpointTensor, assign_weights
from model.config import LlamaConfig, RopeScaling
from model.tokenizers.base import Tokenizer
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from model.tokenizers.pre_tokenizers import pre_tokenization
from model.tokenizers.sentencepiece_tokenizer import LlamaTokenizer

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TASK_FILE = "task.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_INDEX = "model.weights.json"
SENTENCEPIECE_ASSET = "vocabulary.spm"
VOCABULARY_ASSET = "vocabulary.json"
MERGES_ASSET = "merges.txt"
FORMAT_VERSION = "0.32.0"  # the keras-hub version whose preset layout this module reads and writes

_REGISTRY_PREFIXES = ("keras_hub>", "keras_nlp>")
_LLAMA3_START, _LLAMA3_END = "<|begin_of_text|>", "<|end_of_text|>"
# keras-hub's Llama3Tokenizer registers these as special tokens whatever the vocabulary; they must be in it.
_LLAMA3_REQUIRED = (_LLAMA3_START, _LLAMA3_END, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA3_PRE_TOKENIZER = "llama-bpe"  # keras-hub's Llama3Tokenizer always splits text with Llama 3's regex


@dataclasses.dataclass(frozen=True)
class _Family:
    """The keras-hub classes that make one Llama generation's preset."""

    prefix: str  # snake-case stem of keras-hub's default layer names ("llama", "llama3")
    module: str  # keras_hub.src.models.<module>.<prefix>_<file>
    backbone: str
    tokenizer: str
    preprocessor: str
    task: str
    default_context: int  # the generation's context length, used when a preset does not record one

    def serialized(self, class_name: str, file: str, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "module": f"keras_hub.src.models.{self.module}.{self.prefix}_{file}",
            "class_name": class_name,
            "config": config,
            "registered_name": f"keras_hub>{class_name}",
        }


_FAMILIES = {
    "LlamaBackbone": _Family(
        "llama", "llama", "LlamaBackbone", "LlamaTokenizer", "LlamaCausalLMPreprocessor", "LlamaCausalLM", 4096
    ),
    "Llama3Backbone": _Family(
        "llama3", "llama3", "Llama3Backbone", "Llama3Tokenizer", "Llama3CausalLMPreprocessor", "Llama3CausalLM", 8192
    ),
}

# config.json keys that fix the architecture, and those that do not change what the model computes
# (Keras bookkeeping, the dtype handled apart, dropout which is off at inference).
_SIZE_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "hidden_dim",
    "intermediate_dim",
    "num_key_value_heads",
)
_LLAMA3_ROPE_KEYS = (
    "rope_frequency_adjustment_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_pretraining_sequence_length",
)
_ARCHITECTURE_KEYS = frozenset(
    _SIZE_KEYS
    + _LLAMA3_ROPE_KEYS
    + ("rope_max_wavelength", "rope_position_scaling_factor", "layer_norm_epsilon", "tie_word_embeddings")
)
_INERT_KEYS = frozenset({"name", "trainable", "dtype", "dropout"})


# ---- where each backbone weight lives in keras-hub's weights file ----------------------------------------


def _decoder_group(layer: int) -> str:
    # Keras names list members by class, numbering repeats: llama_transformer_decoder, ..._1, ..._2.
    return "layers/llama_transformer_decoder" + (f"_{layer}" if layer else "")


# Backbone path -> (group inside a decoder block, keras-hub layer path used in dtype policy maps).
_LAYER_GROUPS: dict[str, tuple[str, str]] = {
    "layers/attention_norm": ("_self_attention_layernorm", "self_attention_layernorm"),
    "layers/query": ("_self_attention_layer/_query_dense", "self_attention/query"),
    "layers/key": ("_self_attention_layer/_key_dense", "self_attention/key"),
    "layers/value": ("_self_attention_layer/_value_dense", "self_attention/value"),
    "layers/attention_output": ("_self_attention_layer/_output_dense", "self_attention/attention_output"),
    "layers/mlp_norm": ("_feedforward_layernorm", "feedforward_layernorm"),
    "layers/gate": ("_feedforward_gate_dense", "feedforward_gate_dense"),
    "layers/up": ("_feedforward_intermediate_dense", "feedforward_intermediate_dense"),
    "layers/down": ("_feedforward_output_dense", "feedforward_output_dense"),
}
_EMBEDDING_GROUP = "layers/reversible_embedding"
_FINAL_NORM_GROUP = "layers/llama_layer_norm"


def _int8_scale_shape(path: str, config: LlamaConfig) -> tuple[int, ...]:
    """Shape of keras-hub's int8 scale for one layer's (or the embedding's) kernel at backbone `path`."""
    c = config
    return {
        "layers/query": (1, 1, c.num_query_heads, c.head_dim),
        "layers/key": (1, 1, c.num_key_value_heads, c.head_dim),
        "layers/value": (1, 1, c.num_key_value_heads, c.head_dim),
        "layers/attention_output": (1, 1, c.hidden_dim),
        "layers/gate": (c.intermediate_dim,),
        "layers/up": (c.intermediate_dim,),
        "layers/down": (c.hidden_dim,),
        "token_embedding": (c.vocabulary_size,),
        "lm_head": (c.vocabulary_size,),
    }[path]


def _policy_layer_paths(config: LlamaConfig) -> list[str]:
    """keras-hub's layer paths (the keys of a DTypePolicyMap) of every int8-quantizable layer."""
    paths = ["token_embedding"]
    for layer in range(config.num_layers):
        for path, (_, policy_path) in _LAYER_GROUPS.items():
            if path in QUANTIZED_KERNELS:
                paths.append(f"transformer_layer_{layer}/{policy_path}")
    return paths


# ---- reading ----------------------------------------------------------------------------------------------


def is_keras_hub_config(config: Mapping[str, Any]) -> bool:
    """Whether a parsed config.json is a keras-hub serialization (of any class) rather than, e.g., Hugging Face's."""
    registered = config.get("registered_name")
    return isinstance(registered, str) and registered.startswith(_REGISTRY_PREFIXES) and "config" in config


def load_keras_hub_preset(
    fs: fsspec.AbstractFileSystem, path: str, load_weights: bool = True, dtype: Any = None
) -> LoadedPreset:
    """Reads the keras-hub preset directory at `path` on `fs` into a backbone, its tokenizer and stop ids.

    `dtype` overrides the preset's saved dtype (keras-hub's `from_preset(dtype=...)`); None keeps it.

    Example:
        >>> import fsspec
        >>> loaded = load_keras_hub_preset(fsspec.filesystem("file"), "/presets/llama3_8b_en")  # doctest: +SKIP
        >>> loaded.backbone.config.num_layers  # doctest: +SKIP
        32
    """
    source = fs.unstrip_protocol(path)
    config_file = posixpath.join(path, CONFIG_FILE)
    serialized = _read_json(fs, config_file)
    family = _family(serialized, fs.unstrip_protocol(config_file))
    values = serialized["config"]
    metadata_file = posixpath.join(path, METADATA_FILE)
    metadata = _read_json(fs, metadata_file) if fs.isfile(metadata_file) else {}
    extras = metadata.get("batchgen") or {}

    with contextlib.ExitStack() as stack:
        store = None
        if load_weights or "tie_word_embeddings" not in values:
            store = stack.enter_context(_WeightStore(fs, path))
        config = llama_config_from_keras_hub(
            values,
            source=fs.unstrip_protocol(config_file),
            tied_in_weights=store.embedding_is_tied() if store is not None else None,
            max_sequence_length=int(extras.get("max_sequence_length", family.default_context)),
        )
        preset_dtype, quantized_layers = _dtype_policy(values.get("dtype"), fs.unstrip_protocol(config_file))
        backbone_dtype = dtype if dtype is not None else preset_dtype
        backbone = LlamaBackbone(config, dtype=backbone_dtype, random_init=not load_weights)
        if load_weights:
            assert store is not None
            tensors, all_int8 = _checkpoint_tensors(store, config)
            assign_weights(backbone, tensors, checkpoint=source)
        else:
            all_int8 = set(_policy_layer_paths(config)) <= quantized_layers
    if all_int8:
        # Re-quantizing the dequantized kernels gives back keras-hub's int8 values: both scale each output
        # channel by its absolute maximum over the same input axes.
        backbone.quantize("int8")

    preprocessor_file = posixpath.join(path, PREPROCESSOR_FILE)
    preprocessor = _read_json(fs, preprocessor_file).get("config", {}) if fs.isfile(preprocessor_file) else {}
    tokenizer = _load_tokenizer(fs, path, bool(preprocessor.get("add_start_token", True)), extras)
    sequence_length = preprocessor.get("sequence_length")
    return LoadedPreset(
        backbone=backbone,
        tokenizer=tokenizer,
        stop_token_ids=tokenizer.stop_token_ids if tokenizer is not None else (),
        sequence_length=int(sequence_length) if sequence_length is not None else None,
        source=source,
    )


def llama_config_from_keras_hub(
    values: Mapping[str, Any],
    *,
    source: str = CONFIG_FILE,
    tied_in_weights: bool | None = None,
    max_sequence_length: int = 4096,
) -> LlamaConfig:
    """Maps the "config" of a keras-hub Llama backbone onto `LlamaConfig`.

    `tied_in_weights` is what the weights file shows (no reverse embedding: tied); it decides when config.json
    has no `tie_word_embeddings` (keras-hub 0.32 never writes it) and must agree with it otherwise.
    """
    unknown = sorted(set(values) - _ARCHITECTURE_KEYS - _INERT_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown backbone config keys {unknown}; batchgen cannot tell whether they change the "
            f"architecture (known: {sorted(_ARCHITECTURE_KEYS)})"
        )
    missing = [key for key in _SIZE_KEYS if values.get(key) is None]
    if missing:
        raise ValueError(f"{source}: missing backbone config keys {missing}")

    position_scaling = float(values.get("rope_position_scaling_factor") or 1.0)
    if position_scaling != 1.0:
        raise ValueError(
            f"{source}: rope_position_scaling_factor={position_scaling} is not supported: keras-hub stores it but "
            "its Llama rotary embedding never applies it, so the positions this preset expects are ambiguous"
        )
    llama3 = [values.get(key) for key in _LLAMA3_ROPE_KEYS]
    if all(value is None for value in llama3):
        rope_scaling = None
    elif any(value is None for value in llama3):
        given = {key: values.get(key) for key in _LLAMA3_ROPE_KEYS}
        raise ValueError(f"{source}: Llama 3.1 rope scaling needs all of {list(_LLAMA3_ROPE_KEYS)} or none: {given}")
    else:
        factor, low, high, original = llama3
        rope_scaling = RopeScaling(
            kind="llama3",
            factor=float(factor),
            low_freq_factor=float(low),
            high_freq_factor=float(high),
            original_max_position_embeddings=int(original),
        )

    tied = values.get("tie_word_embeddings")
    if tied is None:
        if tied_in_weights is None:
            raise ValueError(f"{source}: no tie_word_embeddings, and no weights file shows whether the LM head is tied")
        tied = tied_in_weights
    elif tied_in_weights is not None and bool(tied) != tied_in_weights:
        raise ValueError(
            f"{source}: tie_word_embeddings={tied}, but the weights file "
            f"{'has no' if tied_in_weights else 'has a'} separate LM head (reverse embedding)"
        )
    return LlamaConfig(
        **{key: int(values[key]) for key in _SIZE_KEYS},
        rope_max_wavelength=float(values.get("rope_max_wavelength", 10000)),
        rope_scaling=rope_scaling,
        layer_norm_epsilon=float(values.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=bool(tied),
        max_sequence_length=max_sequence_length,
    )


def _family(serialized: Mapping[str, Any], source: str) -> _Family:
    registered = serialized.get("registered_name") or serialized.get("class_name")
    class_name = str(registered).split(">", 1)[-1]
    if not isinstance(registered, str) or class_name not in _FAMILIES or not isinstance(serialized.get("config"), dict):
        supported = [f"keras_hub>{name}" for name in _FAMILIES]
        raise ValueError(
            f"{source}: registered_name {registered!r} is not a Llama backbone; batchgen reads keras-hub presets of "
            f"{supported}"
        )
    return _FAMILIES[class_name]


def _dtype_policy(dtype: Any, source: str) -> tuple[str | None, set[str]]:
    """The saved dtype name (None: Keras' default) and the keras-hub layer paths its policy quantizes to int8."""
    if dtype is None or isinstance(dtype, str):
        return dtype, set()
    if not isinstance(dtype, Mapping):
        raise ValueError(f"{source}: cannot read the dtype {dtype!r}")
    class_name = dtype.get("class_name")
    config = dtype.get("config") or {}
    if class_name in ("DTypePolicy", "FloatDTypePolicy"):
        return config.get("name"), set()
    if class_name != "DTypePolicyMap":
        raise ValueError(f"{source}: dtype policy {class_name!r} is not supported (DTypePolicy, DTypePolicyMap)")
    name, _ = _dtype_policy(config.get("default_policy"), source)
    quantized = set()
    for layer, policy in (config.get("policy_map") or {}).items():
        if not isinstance(policy, Mapping) or not str(policy.get("class_name", "")).startswith("Quantized"):
            continue
        policy_config = policy.get("config") or {}
        if policy_config.get("mode") != "int8":
            raise ValueError(
                f"{source}: layer {layer} is quantized as {policy_config.get('mode')!r}; batchgen reads int8 only"
            )
        quantized.add(layer)
        name = name or policy_config.get("source_name")
    return name, quantized


class _WeightStore(contextlib.AbstractContextManager):
    """The datasets of model.weights.h5, or of the shard files that model.weights.json lists, by group.

    Files are opened on first use and stay open until the store is closed (leaving its `with` block), because
    the `CheckpointTensor`s it hands out read from them lazily.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self._fs = fs
        self._path = path
        self._stack = contextlib.ExitStack()
        self._files: dict[str, h5py.File] = {}
        single = posixpath.join(path, WEIGHTS_FILE)
        index = posixpath.join(path, SHARDED_WEIGHTS_INDEX)
        self._weight_map: dict[str, list[str]] | None = None
        if fs.isfile(single):
            self._single = WEIGHTS_FILE
        elif fs.isfile(index):
            self._single = None
            weight_map = _read_json(fs, index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{fs.unstrip_protocol(index)} has no weight_map object")
            self._weight_map = {
                group.strip("/"): [files] if isinstance(files, str) else list(files)
                for group, files in weight_map.items()
            }
        else:
            raise FileNotFoundError(
                f"{fs.unstrip_protocol(path)} has no weights: neither {WEIGHTS_FILE} nor {SHARDED_WEIGHTS_INDEX}"
            )

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()

    def _file(self, name: str) -> h5py.File:
        if name not in self._files:
            location = posixpath.join(self._path, name)
            if not self._fs.isfile(location):
                raise FileNotFoundError(f"{self._fs.unstrip_protocol(location)} (a weights shard) does not exist")
            if isinstance(self._fs, LocalFileSystem):
                source: Any = location
            else:  # h5py reads any seekable file object; remote files are read by byte range
                source = self._stack.enter_context(self._fs.open(location, "rb"))
            try:
                self._files[name] = self._stack.enter_context(h5py.File(source, "r"))
            except OSError as e:
                raise ValueError(f"{self._fs.unstrip_protocol(location)} is not an HDF5 weights file: {e}") from e
        return self._files[name]

    def _files_of(self, group: str) -> list[str]:
        if self._single is not None:
            return [self._single]
        assert self._weight_map is not None
        return self._weight_map.get(f"{group}/vars", [])

    def dataset(self, group: str, index: int) -> tuple[str, h5py.Dataset] | None:
        """The file name and dataset `group/vars/index`, or None when no file holds it."""
        key = f"{group}/vars/{index}"
        for name in self._files_of(group):
            file = self._file(name)
            if key in file:
                return name, file[key]
        return None

    def count(self, group: str) -> int:
        """How many datasets `group/vars` holds, over all files."""
        total = 0
        for name in self._files_of(group):
            file = self._file(name)
            if f"{group}/vars" in file:
                total += sum(isinstance(item, h5py.Dataset) for item in file[f"{group}/vars"].values())
        return total

    def embedding_is_tied(self) -> bool:
        """A tied ReversibleEmbedding stores only the table (and its int8 scale); an untied one also the head."""
        count = self.count(_EMBEDDING_GROUP)
        first = self.dataset(_EMBEDDING_GROUP, 0)
        if first is None:
            raise ValueError(f"{self.describe()} holds no token embedding ({_EMBEDDING_GROUP}/vars/0)")
        per_table = 2 if first[1].dtype == np.int8 else 1
        return count <= per_table

    def describe(self, name: str | None = None) -> str:
        return self._fs.unstrip_protocol(posixpath.join(self._path, name or self._single or SHARDED_WEIGHTS_INDEX))


def _read_dataset(dataset: h5py.Dataset) -> np.ndarray:
    values = dataset[()]
    if dataset.attrs.get("dtype") == "bfloat16":  # h5py has no bfloat16: Keras stores the raw 2-byte values
        return np.asarray(values).view(ml_dtypes.bfloat16)
    return np.asarray(values)


def _checkpoint_tensors(
    store: _WeightStore, config: LlamaConfig
) -> tuple[dict[str, CheckpointTensor | list[CheckpointTensor]], bool]:
    """The backbone's weights as stored, and whether every int8-quantizable kernel was stored as int8."""
    int8_seen: dict[str, bool] = {}

    def tensor(path: str, group: str, index: int, what: str) -> CheckpointTensor:
        found = store.dataset(group, index)
        if found is None:
            raise ValueError(f"{store.describe()} has no dataset {group}/vars/{index} ({what})")
        name, dataset = found
        file = store.describe(name)
        shape = tuple(dataset.shape)
        if dataset.dtype != np.int8:
            int8_seen.setdefault(path, False)
            return CheckpointTensor(file=file, name=dataset.name, shape=shape, read=lambda: _read_dataset(dataset))
        if path not in QUANTIZED_KERNELS:
            raise ValueError(f"{file}: {dataset.name} is int8, but {what} is never quantized")
        int8_seen[path] = True
        scale_index = index + 1  # keras saves each int8 kernel followed by its scale
        found_scale = store.dataset(group, scale_index)
        if found_scale is None:
            raise ValueError(f"{file}: int8 {dataset.name} has no scale ({group}/vars/{scale_index})")
        scale_dataset = found_scale[1]

        def dequantized() -> np.ndarray:
            values = _read_dataset(dataset).astype(np.float32)
            scale = _read_dataset(scale_dataset).astype(np.float32)
            if path == "token_embedding":
                scale = scale.reshape(-1, 1)  # one scale per token row
            elif scale.ndim > values.ndim:  # EinsumDense scales carry the output's leading batch axes
                scale = scale.reshape(scale.shape[scale.ndim - values.ndim :])
            return values / scale  # keras: int8 = round(w * scale)

        return CheckpointTensor(file=file, name=dataset.name, shape=shape, read=dequantized)

    tensors: dict[str, CheckpointTensor | list[CheckpointTensor]] = {
        "token_embedding": tensor("token_embedding", _EMBEDDING_GROUP, 0, "token_embedding"),
        "final_norm": tensor("final_norm", _FINAL_NORM_GROUP, 0, "final_norm"),
    }
    if not config.tie_word_embeddings:
        head_index = 2 if int8_seen["token_embedding"] else 1
        tensors["lm_head"] = tensor("lm_head", _EMBEDDING_GROUP, head_index, "lm_head (reverse embedding)")
    for path, (group, _) in _LAYER_GROUPS.items():
        tensors[path] = [
            tensor(path, f"{_decoder_group(layer)}/{group}", 0, f"{path} of layer {layer}")
            for layer in range(config.num_layers)
        ]
    extra = store.dataset(_decoder_group(config.num_layers) + "/_feedforward_gate_dense", 0)
    if extra is not None:
        raise ValueError(
            f"{store.describe(extra[0])} holds more decoder blocks than num_layers={config.num_layers} in config.json"
        )
    quantizable = [path for path in int8_seen if path in QUANTIZED_KERNELS]
    return tensors, bool(quantizable) and all(int8_seen[path] for path in quantizable)


def _load_tokenizer(
    fs: fsspec.AbstractFileSystem, path: str, add_start_token: bool, extras: Mapping[str, Any]
) -> Tokenizer | None:
    """The tokenizer that tokenizer.json and its assets describe, or None for a backbone-only preset."""
    file = posixpath.join(path, TOKENIZER_FILE)
    if not fs.isfile(file):
        return None
    serialized = _read_json(fs, file)
    shown = fs.unstrip_protocol(file)
    class_name = str(serialized.get("registered_name") or serialized.get("class_name")).split(">", 1)[-1]
    config = serialized.get("config") or {}
    # keras-hub keeps a tokenizer's files in assets/<its config file's stem>/.
    assets = posixpath.join(path, "assets", str(config.get("config_file", TOKENIZER_FILE)).split(".")[0])
    chat_template = extras.get("chat_template")
    if class_name == "LlamaTokenizer":
        proto = _read_bytes(fs, posixpath.join(assets, SENTENCEPIECE_ASSET))
        return LlamaTokenizer(proto, add_start_token=add_start_token, chat_template=chat_template)
    if class_name == "Llama3Tokenizer":
        vocabulary = json.loads(_read_bytes(fs, posixpath.join(assets, VOCABULARY_ASSET)).decode("utf-8"))
        merges = _read_bytes(fs, posixpath.join(assets, MERGES_ASSET)).decode("utf-8").split("\n")
        start = config.get("bos_token", _LLAMA3_START)
        end = config.get("eos_token", _LLAMA3_END)
        special = list(config.get("unsplittable_tokens") or [])
        # keras-hub also adds <|eot_id|> as a second end token when the end token is <|end_of_text|>.
        if end == _LLAMA3_END and "<|eot_id|>" in vocabulary and "<|eot_id|>" not in special:
            special.append("<|eot_id|>")
        return BytePairTokenizer.from_vocabulary_and_merges(
            vocabulary,
            merges,
            pre_tokenizer=extras.get("pre_tokenizer", _LLAMA3_PRE_TOKENIZER),
            special_tokens=special,
            start_token=start,
            end_token=end,
            add_start_token=add_start_token,
            chat_template=chat_template,
        )
    raise ValueError(f"{shown}: tokenizer class {class_name!r} is not supported (LlamaTokenizer, Llama3Tokenizer are)")


# ---- writing ----------------------------------------------------------------------------------------------


def save_keras_hub_preset(
    backbone: LlamaBackbone,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike[str],
    fs: fsspec.AbstractFileSystem | None = None,
    sequence_length: int | None = None,
    max_shard_size: float | None = 10.0,
) -> None:
    """Writes `backbone` (and `tokenizer`) as a keras-hub preset directory that keras-hub 0.32 loads.

    A SentencePiece `LlamaTokenizer` makes a Llama 2 preset (`LlamaBackbone`, `LlamaCausalLM`), a byte-level
    BPE tokenizer a Llama 3 one (`Llama3Backbone`, `Llama3CausalLM`); without a tokenizer only the backbone is
    written. Weights larger than `max_shard_size` GB are sharded as keras-hub shards them; `sequence_length`
    (default 1024, keras-hub's) goes to preprocessor.json. `path` is a local path or, without `fs`, any fsspec
    URL.

    Example:
        >>> save_keras_hub_preset(loaded.backbone, loaded.tokenizer, "/tmp/my_preset")  # doctest: +SKIP
    """
    if fs is None:
        fs, path = fsspec.core.url_to_fs(os.fspath(path))
    path = os.fspath(path)
    family = _FAMILIES["Llama3Backbone" if isinstance(tokenizer, BytePairTokenizer) else "LlamaBackbone"]
    if tokenizer is not None and not isinstance(tokenizer, (LlamaTokenizer, BytePairTokenizer)):
        raise TypeError(f"cannot save a {type(tokenizer).__name__} in a keras-hub preset (LlamaTokenizer or BPE)")
    backbone_config = _backbone_config(backbone, family.backbone)
    extras: dict[str, Any] = {"max_sequence_length": backbone.config.max_sequence_length}
    if tokenizer is not None and tokenizer.chat_template is not None:
        extras["chat_template"] = tokenizer.chat_template.source

    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        _write_preset(path, backbone, backbone_config, tokenizer, family, sequence_length, max_shard_size, extras)
        return
    # h5py writes only to seekable files, so the preset is made locally and uploaded file by file.
    with tempfile.TemporaryDirectory() as local:
        _write_preset(local, backbone, backbone_config, tokenizer, family, sequence_length, max_shard_size, extras)
        for root, _, files in os.walk(local):
            for name in files:
                relative = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
                target = posixpath.join(path, relative)
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                fs.put_file(os.path.join(root, name), target)


def _backbone_config(backbone: LlamaBackbone, class_name: str = "LlamaBackbone") -> dict[str, Any]:
    """config.json's content for `backbone`: keras-hub's serialization as `class_name` (or Llama3Backbone)."""
    family = _FAMILIES[class_name]
    c = backbone.config
    if c.head_dim * c.num_query_heads != c.hidden_dim:
        raise ValueError(
            f"keras-hub's Llama backbone derives head_dim as hidden_dim // num_query_heads "
            f"({c.hidden_dim} // {c.num_query_heads}); this backbone's head_dim is {c.head_dim}"
        )
    scaling = c.rope_scaling
    if scaling is not None and scaling.kind != "llama3":
        raise ValueError(
            f"keras-hub presets cannot express {scaling.kind} rope scaling: keras-hub stores "
            "rope_position_scaling_factor but never applies it"
        )
    values: dict[str, Any] = {
        "name": f"{family.prefix}_backbone",
        "trainable": True,
        "dtype": _serialized_dtype(backbone),
        "vocabulary_size": c.vocabulary_size,
        "num_layers": c.num_layers,
        "num_query_heads": c.num_query_heads,
        "hidden_dim": c.hidden_dim,
        "intermediate_dim": c.intermediate_dim,
        "rope_max_wavelength": c.rope_max_wavelength,
        "rope_position_scaling_factor": 1.0,
        "rope_frequency_adjustment_factor": scaling.factor if scaling else None,
        "rope_low_freq_factor": scaling.low_freq_factor if scaling else None,
        "rope_high_freq_factor": scaling.high_freq_factor if scaling else None,
        "rope_pretraining_sequence_length": scaling.original_max_position_embeddings if scaling else None,
        "num_key_value_heads": c.num_key_value_heads,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "dropout": 0,
        # keras-hub 0.32 leaves this out and then cannot reload a tied preset; its constructor accepts it.
        "tie_word_embeddings": c.tie_word_embeddings,
    }
    return family.serialized(family.backbone, "backbone", values)


def _serialized_policy(name: str) -> dict[str, Any]:
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": None}


def _serialized_dtype(backbone: LlamaBackbone) -> dict[str, Any]:
    name = backbone.dtype_policy.name
    if not backbone.quantization:
        return _serialized_policy(name)
    quantized = {
        "module": "keras.dtype_policies",
        "class_name": "QuantizedDTypePolicy",
        "config": {"mode": "int8", "source_name": name},
        "registered_name": None,
    }
    return {
        "module": "keras.dtype_policies",
        "class_name": "DTypePolicyMap",
        "config": {
            "default_policy": _serialized_policy(name),
            "policy_map": {layer: quantized for layer in _policy_layer_paths(backbone.config)},
        },
        "registered_name": None,
    }


def _write_preset(
    directory: str,
    backbone: LlamaBackbone,
    backbone_config: dict[str, Any],
    tokenizer: Tokenizer | None,
    family: _Family,
    sequence_length: int | None,
    max_shard_size: float | None,
    extras: dict[str, Any],
) -> None:
    """Writes every file of the preset into the local `directory`."""

    def write_json(name: str, value: Any) -> None:
        with open(os.path.join(directory, name), "w", encoding="utf-8") as file:
            file.write(json.dumps(value, indent=4, ensure_ascii=False))

    write_json(CONFIG_FILE, backbone_config)
    _write_weights(directory, backbone, backbone_config["config"]["name"], max_shard_size)
    metadata: dict[str, Any] = {
        "keras_version": keras.__version__,
        "keras_hub_version": FORMAT_VERSION,
        "parameter_count": backbone.config.num_parameters(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"] if tokenizer is not None else [],
        "batchgen": extras,
    }
    if tokenizer is None:
        write_json(METADATA_FILE, metadata)
        return

    assets = os.path.join(directory, "assets", "tokenizer")
    os.makedirs(assets, exist_ok=True)
    tokenizer_values: dict[str, Any] = {
        "name": f"{family.prefix}_tokenizer",
        "trainable": True,
        "dtype": _serialized_policy("int32"),
        "config_file": TOKENIZER_FILE,
    }
    if isinstance(tokenizer, LlamaTokenizer):
        with open(os.path.join(assets, SENTENCEPIECE_ASSET), "wb") as file:
            file.write(tokenizer.proto)
        tokenizer_values.update({"proto": None, "sequence_length": None, "add_bos": False, "add_eos": False})
    else:
        assert isinstance(tokenizer, BytePairTokenizer)
        vocabulary, merges, pre_tokenizer = _byte_pair_assets(tokenizer)
        with open(os.path.join(assets, VOCABULARY_ASSET), "w", encoding="utf-8") as file:
            file.write(json.dumps(vocabulary, ensure_ascii=False))
        with open(os.path.join(assets, MERGES_ASSET), "w", encoding="utf-8") as file:
            file.writelines(f"{merge}\n" for merge in merges)
        tokenizer_values.update(
            {"sequence_length": None, "add_prefix_space": False, "unsplittable_tokens": list(tokenizer.special_tokens)}
        )
        if tokenizer.start_token_id is None:
            raise ValueError("keras-hub's Llama3Tokenizer needs a start token; this tokenizer has none")
        if tokenizer.end_token_id is None:
            raise ValueError("keras-hub's Llama3Tokenizer needs an end token; this tokenizer has none")
        start, end = tokenizer.id_to_token(tokenizer.start_token_id), tokenizer.id_to_token(tokenizer.end_token_id)
        # keras-hub's constructor takes these; written only when they differ from its Llama 3 defaults.
        if start != _LLAMA3_START:
            tokenizer_values["bos_token"] = start
        if end != _LLAMA3_END:
            tokenizer_values["eos_token"] = end
        if pre_tokenizer != _LLAMA3_PRE_TOKENIZER:
            extras["pre_tokenizer"] = pre_tokenizer
        absent = [token for token in _LLAMA3_REQUIRED if token not in vocabulary]
        if absent or pre_tokenizer != _LLAMA3_PRE_TOKENIZER:
            warnings.warn(
                f"{directory}: keras-hub's Llama3Tokenizer will not read this tokenizer as batchgen does "
                f"(vocabulary lacks {absent}; pre-tokenizer {pre_tokenizer!r}); batchgen reads it back exactly",
                stacklevel=3,
            )
    tokenizer_json = family.serialized(family.tokenizer, "tokenizer", tokenizer_values)
    preprocessor = family.serialized(
        family.preprocessor,
        "causal_lm_preprocessor",
        {
            "name": f"{family.prefix}_causal_lm_preprocessor",
            "trainable": True,
            "dtype": _serialized_policy("float32"),
            "tokenizer": tokenizer_json,
            "config_file": PREPROCESSOR_FILE,
            "sequence_length": int(sequence_length) if sequence_length is not None else 1024,
            "add_start_token": tokenizer.add_start_token,
            "add_end_token": True,
        },
    )
    task = family.serialized(
        family.task,
        "causal_lm",
        {"backbone": backbone_config, "preprocessor": preprocessor, "name": f"{family.prefix}_causal_lm"},
    )
    write_json(TOKENIZER_FILE, tokenizer_json)
    write_json(PREPROCESSOR_FILE, preprocessor)
    write_json(TASK_FILE, task)
    write_json(METADATA_FILE, metadata)


def _byte_pair_assets(tokenizer: BytePairTokenizer) -> tuple[dict[str, int], list[str], str]:
    """vocabulary.json's content, merges.txt's lines, and the name of the tokenizer's pre-tokenizer."""
    saved = json.loads(tokenizer.to_tokenizer_json())
    model = saved["model"]
    vocabulary = dict(model["vocab"])
    for added in saved.get("added_tokens", []):
        vocabulary.setdefault(added["content"], added["id"])
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    for merge in merges:
        if merge.count(" ") != 1:
            raise ValueError(f"merge {merge!r} holds a space inside a token; merges.txt cannot store it")
    return dict(sorted(vocabulary.items(), key=lambda item: item[1])), merges, _pre_tokenizer_name(saved)


def _pre_tokenizer_name(saved: Mapping[str, Any]) -> str:
    """llama.cpp's name of the split a saved tokenizer.json uses, so that it can be rebuilt on loading."""
    for name in (_LLAMA3_PRE_TOKENIZER, "smollm", "gpt2"):
        probe = tokenizers.Tokenizer(tokenizers.models.BPE())
        probe.pre_tokenizer = pre_tokenization(name).pre_tokenizer
        if json.loads(probe.to_str())["pre_tokenizer"] == saved.get("pre_tokenizer"):
            return name
    raise ValueError(f"cannot name the tokenizer's pre-tokenizer {saved.get('pre_tokenizer')!r} for a preset")


@dataclasses.dataclass
class _Group:
    """One layer's group in the weights file: its Keras layer name and its variables, in save order."""

    path: str
    name: str
    values: list[np.ndarray] = dataclasses.field(default_factory=list)


def _weight_groups(backbone: LlamaBackbone) -> list[_Group]:
    """The groups of keras-hub's weights file in the order Keras saves them (which decides shard boundaries).

    Keras walks the functional model's layers in order, and each layer's attributes alphabetically; layers
    without variables still get a group, which holds only the layer name.
    """
    config = backbone.config
    quantized = backbone.quantization == "int8"

    def values(path: str, layer: int | None = None) -> list[np.ndarray]:
        weight = np.asarray(keras.ops.convert_to_numpy(backbone.weight(path).value))
        if layer is not None:
            weight = weight[layer]
        if not (quantized and path in QUANTIZED_KERNELS):
            return [weight]
        scale = np.asarray(keras.ops.convert_to_numpy(backbone.weight(path + "_scale").value), np.float32)
        if layer is not None:
            scale = scale[layer]
        # batchgen stores w = int8 * scale, keras int8 = round(w * scale): the scales are reciprocals.
        return [weight, (1.0 / scale).reshape(_int8_scale_shape(path, config))]

    embedding = _Group(_EMBEDDING_GROUP, "token_embedding", values("token_embedding"))
    if not config.tie_word_embeddings:
        embedding.values += values("lm_head")
    groups = [
        _Group("layers/input_layer", "token_ids"),
        _Group("layers/input_layer_1", "padding_mask"),
        embedding,
    ]
    for layer in range(config.num_layers):
        decoder = _decoder_group(layer)
        suffix = f"_{layer}" if layer else ""  # Keras' unique names of the per-layer helper layers

        def kernel(path: str, name: str) -> _Group:
            return _Group(f"{decoder}/{_LAYER_GROUPS[path][0]}", name, values(path, layer))  # noqa: B023

        groups += [
            _Group(decoder, f"transformer_layer_{layer}"),
            kernel("layers/gate", "feedforward_gate_dense"),
            kernel("layers/up", "feedforward_intermediate_dense"),
            kernel("layers/mlp_norm", "feedforward_layernorm"),
            kernel("layers/down", "feedforward_output_dense"),
            _Group(f"{decoder}/_self_attention_dropout", "self_attention_dropout"),
            _Group(f"{decoder}/_self_attention_layer", "self_attention"),
            _Group(f"{decoder}/_self_attention_layer/_dropout_layer", f"dropout{suffix}"),
            kernel("layers/key", "key"),
            kernel("layers/attention_output", "attention_output"),
            kernel("layers/query", "query"),
            _Group(f"{decoder}/_self_attention_layer/_softmax", "attention_softmax"),
            kernel("layers/value", "value"),
            _Group(f"{decoder}/_self_attention_layer/rotary_embedding_layer", f"llama_rotary_embedding{suffix}"),
            kernel("layers/attention_norm", "self_attention_layernorm"),
        ]
    groups.append(_Group(_FINAL_NORM_GROUP, "sequence_output_layernorm", values("final_norm")))
    return groups


def _write_weights(directory: str, backbone: LlamaBackbone, name: str, max_shard_size: float | None) -> None:
    """model.weights.h5, or model.weights.json + shards when the weights exceed `max_shard_size` GB.

    Sharding follows Keras' `ShardedH5IOStore`: values are written in save order and a new shard file starts
    when the next value would push the current one past the limit; a group split across files is listed
    with each file in the weight map.
    """
    groups = _weight_groups(backbone)
    total = sum(value.nbytes for group in groups for value in group.values)
    for stale in (WEIGHTS_FILE, SHARDED_WEIGHTS_INDEX):  # a previous save of the other kind would shadow this one
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, stale))
    sharded = max_shard_size is not None and total > max_shard_size * 1024**3
    if not sharded:
        with h5py.File(os.path.join(directory, WEIGHTS_FILE), "w") as file:
            file.create_group("vars").attrs["name"] = name
            for group in groups:
                vars_group = file.create_group(f"{group.path}/vars")
                vars_group.attrs["name"] = group.name
                for index, value in enumerate(group.values):
                    _write_dataset(vars_group, str(index), value)
        return

    assert max_shard_size is not None
    limit = max_shard_size * 1024**3
    weight_map: dict[str, str | list[str]] = {}
    shard_index = 0
    shard_size = 0.0

    def shard_name(index: int) -> str:
        return f"model_{index:05}.weights.h5"

    file = h5py.File(os.path.join(directory, shard_name(0)), "w")
    try:
        file.create_group("vars").attrs["name"] = name
        for group in groups:
            file.create_group(f"{group.path}/vars").attrs["name"] = group.name
            for index, value in enumerate(group.values):
                if value.nbytes > limit:
                    raise ValueError(
                        f"{group.path}/vars/{index} takes {value.nbytes} bytes, more than max_shard_size "
                        f"{max_shard_size} GB"
                    )
                shard_size += value.nbytes
                if shard_size > limit:
                    file.close()
                    shard_index += 1
                    file = h5py.File(os.path.join(directory, shard_name(shard_index)), "w")
                    shard_size = value.nbytes
                vars_group = file.require_group(f"{group.path}/vars")
                _write_dataset(vars_group, str(index), value)
                key, name = f"/{group.path}/vars", shard_name(shard_index)
                listed = weight_map.get(key)
                if listed is None:
                    weight_map[key] = name
                elif isinstance(listed, str) and listed != name:
                    weight_map[key] = [listed, name]
                elif isinstance(listed, list) and name not in listed:
                    listed.append(name)
    finally:
        file.close()
    index = {"metadata": {"total_size": float(total)}, "weight_map": weight_map}
    with open(os.path.join(directory, SHARDED_WEIGHTS_INDEX), "w", encoding="utf-8") as out:
        out.write(json.dumps(index, indent=4))


def _write_dataset(group: h5py.Group, key: str, value: np.ndarray) -> None:
    if value.dtype == ml_dtypes.bfloat16:
        # As Keras does: the raw 2-byte values, marked so that readers view them as bfloat16 again.
        group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
    else:
        group[key] = value


# ---- small file helpers -----------------------------------------------------------------------------------


def _read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    if not fs.isfile(path):
        raise FileNotFoundError(f"{fs.unstrip_protocol(path)} does not exist")
    with fs.open(path, "rb") as file:
        return file.read()


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    shown = fs.unstrip_protocol(path)
    try:
        value = json.loads(_read_bytes(fs, path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{shown} should hold a JSON object, got {type(value).__name__}")
    return value


__all__: Sequence[str] = (
    "is_keras_hub_config",
    "llama_config_from_keras_hub",
    "load_keras_hub_preset",
    "save_keras_hub_preset",
)
