"""Writes a backbone and its tokenizer as a keras-hub preset directory that keras-hub 0.32 loads (the files:
`layout`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import fsspec
import h5py
import keras
import ml_dtypes
import numpy as np
import tokenizers
from fsspec.implementations.local import LocalFileSystem

from model.backbone import LlamaBackbone
from model.checkpoints.keras_hub import layout
from model.tokenizers.base import Tokenizer
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from model.tokenizers.pre_tokenizers import pre_tokenization
from model.tokenizers.sentencepiece_tokenizer import LlamaTokenizer
from model.weights import QUANTIZED_KERNELS


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
    family = layout.FAMILIES["Llama3Backbone" if isinstance(tokenizer, BytePairTokenizer) else "LlamaBackbone"]
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
    family = layout.FAMILIES[class_name]
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
            "policy_map": {layer: quantized for layer in layout.policy_layer_paths(backbone.config)},
        },
        "registered_name": None,
    }


def _write_preset(
    directory: str,
    backbone: LlamaBackbone,
    backbone_config: dict[str, Any],
    tokenizer: Tokenizer | None,
    family: layout.Family,
    sequence_length: int | None,
    max_shard_size: float | None,
    extras: dict[str, Any],
) -> None:
    """Writes every file of the preset into the local `directory`."""

    def write_json(name: str, value: Any) -> None:
        with open(os.path.join(directory, name), "w", encoding="utf-8") as file:
            file.write(json.dumps(value, indent=4, ensure_ascii=False))

    write_json(layout.CONFIG_FILE, backbone_config)
    _write_weights(directory, backbone, backbone_config["config"]["name"], max_shard_size)
    metadata: dict[str, Any] = {
        "keras_version": keras.__version__,
        "keras_hub_version": layout.FORMAT_VERSION,
        "parameter_count": backbone.config.num_parameters(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": ["CausalLM"] if tokenizer is not None else [],
        "batchgen": extras,
    }
    if tokenizer is None:
        write_json(layout.METADATA_FILE, metadata)
        return

    assets = os.path.join(directory, "assets", "tokenizer")
    os.makedirs(assets, exist_ok=True)
    tokenizer_values: dict[str, Any] = {
        "name": f"{family.prefix}_tokenizer",
        "trainable": True,
        "dtype": _serialized_policy("int32"),
        "config_file": layout.TOKENIZER_FILE,
    }
    if isinstance(tokenizer, LlamaTokenizer):
        with open(os.path.join(assets, layout.SENTENCEPIECE_ASSET), "wb") as file:
            file.write(tokenizer.proto)
        tokenizer_values.update({"proto": None, "sequence_length": None, "add_bos": False, "add_eos": False})
    else:
        assert isinstance(tokenizer, BytePairTokenizer)
        vocabulary, merges, pre_tokenizer = _byte_pair_assets(tokenizer)
        with open(os.path.join(assets, layout.VOCABULARY_ASSET), "w", encoding="utf-8") as file:
            file.write(json.dumps(vocabulary, ensure_ascii=False))
        with open(os.path.join(assets, layout.MERGES_ASSET), "w", encoding="utf-8") as file:
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
        if start != layout.LLAMA3_START:
            tokenizer_values["bos_token"] = start
        if end != layout.LLAMA3_END:
            tokenizer_values["eos_token"] = end
        if pre_tokenizer != layout.LLAMA3_PRE_TOKENIZER:
            extras["pre_tokenizer"] = pre_tokenizer
        absent = [token for token in layout.LLAMA3_REQUIRED if token not in vocabulary]
        if absent or pre_tokenizer != layout.LLAMA3_PRE_TOKENIZER:
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
            "config_file": layout.PREPROCESSOR_FILE,
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
    write_json(layout.TOKENIZER_FILE, tokenizer_json)
    write_json(layout.PREPROCESSOR_FILE, preprocessor)
    write_json(layout.TASK_FILE, task)
    write_json(layout.METADATA_FILE, metadata)


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
    for name in (layout.LLAMA3_PRE_TOKENIZER, "smollm", "gpt2"):
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
        return [weight, (1.0 / scale).reshape(layout.int8_scale_shape(path, config))]

    embedding = _Group(layout.EMBEDDING_GROUP, "token_embedding", values("token_embedding"))
    if not config.tie_word_embeddings:
        embedding.values += values("lm_head")
    groups = [
        _Group("layers/input_layer", "token_ids"),
        _Group("layers/input_layer_1", "padding_mask"),
        embedding,
    ]
    for layer in range(config.num_layers):
        decoder = layout.decoder_group(layer)
        suffix = f"_{layer}" if layer else ""  # Keras' unique names of the per-layer helper layers

        def kernel(path: str, name: str) -> _Group:
            return _Group(f"{decoder}/{layout.LAYER_GROUPS[path][0]}", name, values(path, layer))  # noqa: B023

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
    groups.append(_Group(layout.FINAL_NORM_GROUP, "sequence_output_layernorm", values("final_norm")))
    return groups


def _write_weights(directory: str, backbone: LlamaBackbone, name: str, max_shard_size: float | None) -> None:
    """model.weights.h5, or model.weights.json + shards when the weights exceed `max_shard_size` GB.

    Sharding follows Keras' `ShardedH5IOStore`: values are written in save order and a new shard file starts
    when the next value would push the current one past the limit; a group split across files is listed
    with each file in the weight map.
    """
    groups = _weight_groups(backbone)
    total = sum(value.nbytes for group in groups for value in group.values)
    # A previous save of the other kind would shadow this one.
    for stale in (layout.WEIGHTS_FILE, layout.SHARDED_WEIGHTS_INDEX):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, stale))
    sharded = max_shard_size is not None and total > max_shard_size * 1024**3
    if not sharded:
        with h5py.File(os.path.join(directory, layout.WEIGHTS_FILE), "w") as file:
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
    with open(os.path.join(directory, layout.SHARDED_WEIGHTS_INDEX), "w", encoding="utf-8") as out:
        out.write(json.dumps(index, indent=4))


def _write_dataset(group: h5py.Group, key: str, value: np.ndarray) -> None:
    if value.dtype == ml_dtypes.bfloat16:
        # As Keras does: the raw 2-byte values, marked so that readers view them as bfloat16 again.
        group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
    else:
        group[key] = value
