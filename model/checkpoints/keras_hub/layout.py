"""The layout of keras-hub preset directories (the `save_to_preset` format of keras-hub 0.32).

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

This module holds the layout both sides share (file names, keras-hub class families, config keys, where each
backbone weight lives in the weights file); `reader` loads, `writer` saves.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import fsspec

from model.config import LlamaConfig
from model.weights import QUANTIZED_KERNELS

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

REGISTRY_PREFIXES = ("keras_hub>", "keras_nlp>")
LLAMA3_START, LLAMA3_END = "<|begin_of_text|>", "<|end_of_text|>"
# keras-hub's Llama3Tokenizer registers these as special tokens whatever the vocabulary; they must be in it.
LLAMA3_REQUIRED = (LLAMA3_START, LLAMA3_END, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3_PRE_TOKENIZER = "llama-bpe"  # keras-hub's Llama3Tokenizer always splits text with Llama 3's regex


@dataclasses.dataclass(frozen=True)
class Family:
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


FAMILIES = {
    "LlamaBackbone": Family(
        "llama", "llama", "LlamaBackbone", "LlamaTokenizer", "LlamaCausalLMPreprocessor", "LlamaCausalLM", 4096
    ),
    "Llama3Backbone": Family(
        "llama3", "llama3", "Llama3Backbone", "Llama3Tokenizer", "Llama3CausalLMPreprocessor", "Llama3CausalLM", 8192
    ),
}

# config.json keys that fix the architecture, and those that do not change what the model computes
# (Keras bookkeeping, the dtype handled apart, dropout which is off at inference).
SIZE_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "hidden_dim",
    "intermediate_dim",
    "num_key_value_heads",
)
LLAMA3_ROPE_KEYS = (
    "rope_frequency_adjustment_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_pretraining_sequence_length",
)
ARCHITECTURE_KEYS = frozenset(
    SIZE_KEYS
    + LLAMA3_ROPE_KEYS
    + ("rope_max_wavelength", "rope_position_scaling_factor", "layer_norm_epsilon", "tie_word_embeddings")
)
INERT_KEYS = frozenset({"name", "trainable", "dtype", "dropout"})


# ---- where each backbone weight lives in keras-hub's weights file ----------------------------------------


def decoder_group(layer: int) -> str:
    # Keras names list members by class, numbering repeats: llama_transformer_decoder, ..._1, ..._2.
    return "layers/llama_transformer_decoder" + (f"_{layer}" if layer else "")


# Backbone path -> (group inside a decoder block, keras-hub layer path used in dtype policy maps).
LAYER_GROUPS: dict[str, tuple[str, str]] = {
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
EMBEDDING_GROUP = "layers/reversible_embedding"
FINAL_NORM_GROUP = "layers/llama_layer_norm"


def int8_scale_shape(path: str, config: LlamaConfig) -> tuple[int, ...]:
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


def policy_layer_paths(config: LlamaConfig) -> list[str]:
    """keras-hub's layer paths (the keys of a DTypePolicyMap) of every int8-quantizable layer."""
    paths = ["token_embedding"]
    for layer in range(config.num_layers):
        for path, (_, policy_path) in LAYER_GROUPS.items():
            if path in QUANTIZED_KERNELS:
                paths.append(f"transformer_layer_{layer}/{policy_path}")
    return paths


# ---- small file helpers -----------------------------------------------------------------------------------


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    if not fs.isfile(path):
        raise FileNotFoundError(f"{fs.unstrip_protocol(path)} does not exist")
    with fs.open(path, "rb") as file:
        return file.read()


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    shown = fs.unstrip_protocol(path)
    try:
        value = json.loads(read_bytes(fs, path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{shown} should hold a JSON object, got {type(value).__name__}")
    return value
