"""Reads keras-hub preset directories into a backbone, its tokenizer and stop ids (the files: `layout`).

Weights are read with h5py (no keras-hub, no Keras deserialization: nothing in the files is executed).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import h5py
import ml_dtypes
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from model.backbone import LlamaBackbone
from model.checkpoints.keras_hub import layout
from model.checkpoints.loaded_preset import LoadedPreset
from model.checkpoints.weights import CheckpointTensor, assign_weights
from model.config import LlamaConfig, RopeScaling
from model.tokenizers.base import Tokenizer
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from model.tokenizers.sentencepiece_tokenizer import LlamaTokenizer
from model.weights import QUANTIZED_KERNELS


def is_keras_hub_config(config: Mapping[str, Any]) -> bool:
    """Whether a parsed config.json is a keras-hub serialization (of any class) rather than, e.g., Hugging Face's."""
    registered = config.get("registered_name")
    return isinstance(registered, str) and registered.startswith(layout.REGISTRY_PREFIXES) and "config" in config


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
    config_file = posixpath.join(path, layout.CONFIG_FILE)
    serialized = layout.read_json(fs, config_file)
    family = _family(serialized, fs.unstrip_protocol(config_file))
    values = serialized["config"]
    metadata_file = posixpath.join(path, layout.METADATA_FILE)
    metadata = layout.read_json(fs, metadata_file) if fs.isfile(metadata_file) else {}
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
            all_int8 = set(layout.policy_layer_paths(config)) <= quantized_layers
    if all_int8:
        # Re-quantizing the dequantized kernels gives back keras-hub's int8 values: both scale each output
        # channel by its absolute maximum over the same input axes.
        backbone.quantize("int8")

    preprocessor_file = posixpath.join(path, layout.PREPROCESSOR_FILE)
    preprocessor = layout.read_json(fs, preprocessor_file).get("config", {}) if fs.isfile(preprocessor_file) else {}
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
    source: str = layout.CONFIG_FILE,
    tied_in_weights: bool | None = None,
    max_sequence_length: int = 4096,
) -> LlamaConfig:
    """Maps the "config" of a keras-hub Llama backbone onto `LlamaConfig`.

    `tied_in_weights` is what the weights file shows (no reverse embedding: tied); it decides when config.json
    has no `tie_word_embeddings` (keras-hub 0.32 never writes it) and must agree with it otherwise.
    """
    unknown = sorted(set(values) - layout.ARCHITECTURE_KEYS - layout.INERT_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown backbone config keys {unknown}; batchgen cannot tell whether they change the "
            f"architecture (known: {sorted(layout.ARCHITECTURE_KEYS)})"
        )
    missing = [key for key in layout.SIZE_KEYS if values.get(key) is None]
    if missing:
        raise ValueError(f"{source}: missing backbone config keys {missing}")

    position_scaling = float(values.get("rope_position_scaling_factor") or 1.0)
    if position_scaling != 1.0:
        raise ValueError(
            f"{source}: rope_position_scaling_factor={position_scaling} is not supported: keras-hub stores it but "
            "its Llama rotary embedding never applies it, so the positions this preset expects are ambiguous"
        )
    llama3 = [values.get(key) for key in layout.LLAMA3_ROPE_KEYS]
    if all(value is None for value in llama3):
        rope_scaling = None
    elif any(value is None for value in llama3):
        given = {key: values.get(key) for key in layout.LLAMA3_ROPE_KEYS}
        needed = list(layout.LLAMA3_ROPE_KEYS)
        raise ValueError(f"{source}: Llama 3.1 rope scaling needs all of {needed} or none: {given}")
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
        **{key: int(values[key]) for key in layout.SIZE_KEYS},
        rope_max_wavelength=float(values.get("rope_max_wavelength", 10000)),
        rope_scaling=rope_scaling,
        layer_norm_epsilon=float(values.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=bool(tied),
        max_sequence_length=max_sequence_length,
    )


def _family(serialized: Mapping[str, Any], source: str) -> layout.Family:
    registered = serialized.get("registered_name") or serialized.get("class_name")
    class_name = str(registered).split(">", 1)[-1]
    known = class_name in layout.FAMILIES
    if not isinstance(registered, str) or not known or not isinstance(serialized.get("config"), dict):
        supported = [f"keras_hub>{name}" for name in layout.FAMILIES]
        raise ValueError(
            f"{source}: registered_name {registered!r} is not a Llama backbone; batchgen reads keras-hub presets of "
            f"{supported}"
        )
    return layout.FAMILIES[class_name]


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
        single = posixpath.join(path, layout.WEIGHTS_FILE)
        index = posixpath.join(path, layout.SHARDED_WEIGHTS_INDEX)
        self._weight_map: dict[str, list[str]] | None = None
        if fs.isfile(single):
            self._single = layout.WEIGHTS_FILE
        elif fs.isfile(index):
            self._single = None
            weight_map = layout.read_json(fs, index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{fs.unstrip_protocol(index)} has no weight_map object")
            self._weight_map = {
                group.strip("/"): [files] if isinstance(files, str) else list(files)
                for group, files in weight_map.items()
            }
        else:
            raise FileNotFoundError(
                f"{fs.unstrip_protocol(path)} has no weights: neither {layout.WEIGHTS_FILE} nor "
                f"{layout.SHARDED_WEIGHTS_INDEX}"
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
        count = self.count(layout.EMBEDDING_GROUP)
        first = self.dataset(layout.EMBEDDING_GROUP, 0)
        if first is None:
            raise ValueError(f"{self.describe()} holds no token embedding ({layout.EMBEDDING_GROUP}/vars/0)")
        per_table = 2 if first[1].dtype == np.int8 else 1
        return count <= per_table

    def describe(self, name: str | None = None) -> str:
        name = name or self._single or layout.SHARDED_WEIGHTS_INDEX
        return self._fs.unstrip_protocol(posixpath.join(self._path, name))


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
        "token_embedding": tensor("token_embedding", layout.EMBEDDING_GROUP, 0, "token_embedding"),
        "final_norm": tensor("final_norm", layout.FINAL_NORM_GROUP, 0, "final_norm"),
    }
    if not config.tie_word_embeddings:
        head_index = 2 if int8_seen["token_embedding"] else 1
        tensors["lm_head"] = tensor("lm_head", layout.EMBEDDING_GROUP, head_index, "lm_head (reverse embedding)")
    for path, (group, _) in layout.LAYER_GROUPS.items():
        tensors[path] = [
            tensor(path, f"{layout.decoder_group(layer)}/{group}", 0, f"{path} of layer {layer}")
            for layer in range(config.num_layers)
        ]
    extra = store.dataset(layout.decoder_group(config.num_layers) + "/_feedforward_gate_dense", 0)
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
    file = posixpath.join(path, layout.TOKENIZER_FILE)
    if not fs.isfile(file):
        return None
    serialized = layout.read_json(fs, file)
    shown = fs.unstrip_protocol(file)
    class_name = str(serialized.get("registered_name") or serialized.get("class_name")).split(">", 1)[-1]
    config = serialized.get("config") or {}
    # keras-hub keeps a tokenizer's files in assets/<its config file's stem>/.
    assets = posixpath.join(path, "assets", str(config.get("config_file", layout.TOKENIZER_FILE)).split(".")[0])
    chat_template = extras.get("chat_template")
    if class_name == "LlamaTokenizer":
        proto = layout.read_bytes(fs, posixpath.join(assets, layout.SENTENCEPIECE_ASSET))
        return LlamaTokenizer(proto, add_start_token=add_start_token, chat_template=chat_template)
    if class_name == "Llama3Tokenizer":
        vocabulary = json.loads(layout.read_bytes(fs, posixpath.join(assets, layout.VOCABULARY_ASSET)).decode("utf-8"))
        merges = layout.read_bytes(fs, posixpath.join(assets, layout.MERGES_ASSET)).decode("utf-8").split("\n")
        start = config.get("bos_token", layout.LLAMA3_START)
        end = config.get("eos_token", layout.LLAMA3_END)
        special = list(config.get("unsplittable_tokens") or [])
        # keras-hub also adds <|eot_id|> as a second end token when the end token is <|end_of_text|>.
        if end == layout.LLAMA3_END and "<|eot_id|>" in vocabulary and "<|eot_id|>" not in special:
            special.append("<|eot_id|>")
        return BytePairTokenizer.from_vocabulary_and_merges(
            vocabulary,
            merges,
            pre_tokenizer=extras.get("pre_tokenizer", layout.LLAMA3_PRE_TOKENIZER),
            special_tokens=special,
            start_token=start,
            end_token=end,
            add_start_token=add_start_token,
            chat_template=chat_template,
        )
    raise ValueError(f"{shown}: tokenizer class {class_name!r} is not supported (LlamaTokenizer, Llama3Tokenizer are)")
