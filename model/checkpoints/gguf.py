"""GGUF files (llama.cpp's format) with the `llama` architecture, dequantized to float on load.

The `gguf` package reads the file (memory-mapped, so it needs a real local file; `resolve.local_file` copies a
remote one first) and dequantizes each tensor when it is assigned. The architecture comes from the metadata
(`llama.block_count`, `llama.embedding_length`, ...), the tokenizer and chat template from `tokenizer.*`.

llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head, so that its rotary kernel can
rotate adjacent pairs (2i, 2i+1); this model (like Hugging Face and keras-hub) rotates dimension i with i + D/2.
`unpermute_rows` undoes it, as transformers' GGUF loader does (`modeling_gguf_pytorch_utils.py`); skipping it
gives fluent-looking nonsense. Llama 3.1 files carry their RoPE scaling as a `rope_freqs` tensor of per-frequency
divisors rather than metadata; `llama3_scaling_from_rope_freqs` recovers the scaling parameters from it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from model import rope
from model.backbone import LlamaBackbone
from model.checkpoints.loaded_preset import LoadedPreset
from model.checkpoints.weights import CheckpointTensor, assign_weights
from model.config import LlamaConfig, RopeScaling
from model.tokenizers import END_OF_TURN_TOKENS, Tokenizer, read_gguf_metadata, tokenizer_from_gguf_metadata

Q = gguf.GGMLQuantizationType
# The tensor types read here: floats, the classic block quants and the K-quants. Others (IQ*, TQ*, MXFP4, ...)
# are refused by name rather than trusted to a path no test covers.
SUPPORTED_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {
        Q.F32, Q.F16, Q.BF16, Q.F64,
        Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    }
)  # fmt: skip

_DEQUANTIZE_CHUNK_BYTES = 8 * 1024 * 1024

_GLOBAL_TENSORS = {
    "token_embd.weight": ("token_embedding", False),
    "output_norm.weight": ("final_norm", False),
}
_LAYER_TENSORS = {
    "attn_norm.weight": ("layers/attention_norm", False),
    "attn_q.weight": ("layers/query", True),
    "attn_k.weight": ("layers/key", True),
    "attn_v.weight": ("layers/value", True),
    "attn_output.weight": ("layers/attention_output", True),
    "ffn_norm.weight": ("layers/mlp_norm", False),
    "ffn_gate.weight": ("layers/gate", True),
    "ffn_up.weight": ("layers/up", True),
    "ffn_down.weight": ("layers/down", True),
}


def open_gguf(local_path: str, shown: str | None = None) -> gguf.GGUFReader:
    """A `GGUFReader` on a local file, with errors that name the file."""
    shown = shown or local_path
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"GGUF file {shown} does not exist")
    try:
        return gguf.GGUFReader(local_path, "r")
    except ValueError as e:  # also raised for a tensor type id this gguf version does not know
        raise ValueError(f"{shown} is not a GGUF file this gguf package can read: {e}") from e


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """The value of a metadata key (string, number, bool or list), or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(reader: gguf.GGUFReader, *, source: str) -> LlamaConfig:
    """The `LlamaConfig` recorded in a GGUF file's metadata (and, for Llama 3.1, its `rope_freqs` tensor)."""
    arch = metadata(reader, gguf.Keys.General.ARCHITECTURE)
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture is {arch!r}, not 'llama'; batchgen loads Llama models only")

    def key(template: str, default: Any = None, required: bool = False) -> Any:
        name = template.format(arch=arch)
        value = metadata(reader, name, default)
        if required and value is None:
            raise ValueError(f"{source}: metadata key {name!r} is missing")
        return value

    heads = int(key(gguf.Keys.Attention.HEAD_COUNT, required=True))
    hidden = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH, required=True))
    head_dim = int(key(gguf.Keys.Attention.KEY_LENGTH, hidden // heads))
    tensors = {t.name: t for t in reader.tensors}
    tokens = metadata(reader, gguf.Keys.Tokenizer.LIST)
    if tokens is not None:
        vocabulary = len(tokens)
    elif key(gguf.Keys.LLM.VOCAB_SIZE) is not None:
        vocabulary = int(key(gguf.Keys.LLM.VOCAB_SIZE))
    elif "token_embd.weight" in tensors:
        vocabulary = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest axis first
    else:
        raise ValueError(f"{source}: no tokenizer.ggml.tokens, llama.vocab_size nor token_embd.weight")
    theta = float(key(gguf.Keys.Rope.FREQ_BASE, 10000.0))
    scaling = _rope_scaling(reader, key, tensors, theta, head_dim, source)
    return LlamaConfig(
        vocabulary_size=vocabulary,
        num_layers=int(key(gguf.Keys.LLM.BLOCK_COUNT, required=True)),
        num_query_heads=heads,
        num_key_value_heads=int(key(gguf.Keys.Attention.HEAD_COUNT_KV, heads)),
        hidden_dim=hidden,
        intermediate_dim=int(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH, required=True)),
        head_dim=head_dim,
        rope_max_wavelength=theta,
        rope_scaling=scaling,
        layer_norm_epsilon=float(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        max_sequence_length=int(key(gguf.Keys.LLM.CONTEXT_LENGTH, 4096)),
    )


def _rope_scaling(
    reader: gguf.GGUFReader,
    key: Callable[..., Any],
    tensors: dict[str, Any],
    theta: float,
    head_dim: int,
    source: str,
) -> RopeScaling | None:
    kind = key(gguf.Keys.Rope.SCALING_TYPE)
    factor = key(gguf.Keys.Rope.SCALING_FACTOR) or key("{arch}.rope.scale_linear")  # older files: scale_linear
    if "rope_freqs.weight" in tensors:
        if kind not in (None, "none", "llama3"):
            raise ValueError(f"{source}: both a rope_freqs tensor and rope scaling type {kind!r}")
        divisors = dequantize(tensors["rope_freqs.weight"], source)
        original = key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)
        return llama3_scaling_from_rope_freqs(divisors, theta, head_dim, original, source)
    if kind in (None, "none"):
        if factor not in (None, 1.0):  # scale_linear without a type: linear, as llama.cpp reads it
            return RopeScaling(kind="linear", factor=float(factor))
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(factor or 1.0))
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (linear and Llama 3.1 are)")


def llama3_scaling_from_rope_freqs(
    divisors: np.ndarray, theta: float, head_dim: int, original_context: int | None, source: str
) -> RopeScaling | None:
    """Llama 3.1 scaling parameters that reproduce llama.cpp's per-frequency divisors [D/2].

    llama.cpp writes divisor 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) between,
    with s = (original / wavelength - low) / (high - low). Between the bands s is linear in 1 / wavelength, so two
    such frequencies give original / (high - low) and low / (high - low); any (high - low) reproduces the divisors,
    and 3 (Llama 3.1's 4 - 1) recovers the published values. The result is checked against the divisors.
    """
    divisors = np.asarray(divisors, np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"{source}: rope_freqs.weight has {divisors.size} entries, expected head_dim/2 = {head_dim // 2}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelength = 2 * math.pi / base
    medium = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    if medium.sum() >= 2:
        smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelength[medium], smooth, 1)
        spread = 3.0
        low = round(float(-intercept * spread), 5)  # the divisors are float32: drop the fit's rounding noise
        scaling = RopeScaling(
            kind="llama3",
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=low + spread,
            original_max_position_embeddings=int(round(slope * spread)),
        )
    else:
        # At most one frequency between the bands: Llama 3.1's factors, with the context that fits the bands.
        candidates = [original_context, 8192] if original_context else [8192]
        kept = wavelength[divisors <= 1 + 1e-6]
        slowed = wavelength[divisors >= factor - 1e-6]
        low_bound = 4 * kept.max() if kept.size else 0.0
        high_bound = slowed.min() if slowed.size else math.inf
        candidates.append(int(math.sqrt(max(low_bound, 1.0) * min(high_bound, 1e12))))
        if medium.sum() == 1:
            s = (1 / divisors[medium][0] - 1 / factor) / (1 - 1 / factor)
            candidates.insert(0, int(round(wavelength[medium][0] * (3 * s + 1))))
        scaling = None
        for context in candidates:
            trial = RopeScaling(kind="llama3", factor=factor, original_max_position_embeddings=int(context))
            if _matches(trial, divisors, base, theta, head_dim):
                scaling = trial
                break
    if scaling is None or not _matches(scaling, divisors, base, theta, head_dim):
        raise ValueError(
            f"{source}: rope_freqs.weight {np.round(divisors, 4).tolist()} does not follow the Llama 3.1 scaling rule"
        )
    return scaling


def _matches(scaling: RopeScaling, divisors: np.ndarray, base: np.ndarray, theta: float, head_dim: int) -> bool:
    probe = LlamaConfig(
        vocabulary_size=1, num_layers=1, num_query_heads=1, num_key_value_heads=1, hidden_dim=head_dim,
        intermediate_dim=1, head_dim=head_dim, rope_max_wavelength=theta, rope_scaling=scaling,
    )  # fmt: skip
    return bool(np.allclose(rope.inverse_frequencies(probe), base / divisors, rtol=1e-4, atol=0))


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: within each head, rows (2i, 2i+1) go back to (i, i + D/2).

    weight [heads * D, M] in torch layout. llama.cpp stored reshape(heads, 2, D/2, M).swapaxes(1, 2).
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize(tensor: gguf.ReaderTensor, source: str) -> np.ndarray:
    """A tensor's values as float32 in numpy axis order (the GGUF shape reversed)."""
    kind = tensor.tensor_type
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"{source}: tensor {tensor.name!r} has type {kind.name}, which batchgen does not read "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    shape = tuple(reversed([int(n) for n in tensor.shape]))
    data = tensor.data  # [rows, stored items per row], memory-mapped
    if kind == Q.F64:
        return np.asarray(data, np.float32).reshape(shape)
    if kind == Q.F32:
        return np.array(data, np.float32).reshape(shape)  # a copy: the file's pages are not kept mapped in
    # Dequantizing builds several float temporaries per block; going through the rows in slices keeps them
    # to a few tens of MB however large the tensor (an 8B model's embedding is 2 GB as float32).
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    values = np.empty((rows.shape[0], int(np.prod(shape)) // rows.shape[0]), np.float32)
    step = max(1, _DEQUANTIZE_CHUNK_BYTES // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        values[start : start + step] = gguf.quants.dequantize(rows[start : start + step], kind)
    return values.reshape(shape)


def gguf_tensors(
    reader: gguf.GGUFReader, config: LlamaConfig, source: str
) -> dict[str, CheckpointTensor | list[CheckpointTensor]]:
    """The backbone's tensors in the file, type-checked now and dequantized when read."""
    by_name = {t.name: t for t in reader.tensors}

    def take(name: str, torch_layout: bool, heads: int | None = None) -> CheckpointTensor:
        tensor = by_name.get(name)
        if tensor is None:
            raise ValueError(f"{source}: tensor {name!r} is missing")
        dequantize_checked = _reader(tensor, source, heads)
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        return CheckpointTensor(file=source, name=name, shape=shape, read=dequantize_checked, torch_layout=torch_layout)

    tensors: dict[str, CheckpointTensor | list[CheckpointTensor]] = {}
    for name, (path, torch_layout) in _GLOBAL_TENSORS.items():
        tensors[path] = take(name, torch_layout)
    if not config.tie_word_embeddings:
        tensors["lm_head"] = take("output.weight", True)
    heads_of = {"attn_q.weight": config.num_query_heads, "attn_k.weight": config.num_key_value_heads}
    for name, (path, torch_layout) in _LAYER_TENSORS.items():
        tensors[path] = [
            take(f"blk.{i}.{name}", torch_layout, heads_of.get(name)) for i in range(config.num_layers)
        ]
    return tensors


def _reader(tensor: gguf.ReaderTensor, source: str, heads: int | None) -> Callable[[], np.ndarray]:
    if tensor.tensor_type not in SUPPORTED_TYPES:  # refuse before any data is read
        dequantize(tensor, source)

    def read() -> np.ndarray:
        values = dequantize(tensor, source)
        return values if heads is None else unpermute_rows(values, heads)

    return read


def load_gguf_checkpoint(
    local_path: str, load_weights: bool = True, dtype: Any = None, *, source: str | None = None
) -> LoadedPreset:
    """Reads a llama GGUF file into a backbone (dequantized), its tokenizer and its stop ids.

    Example:
        >>> loaded = load_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    source = source or local_path
    reader = open_gguf(local_path, source)
    config = llama_config_from_gguf(reader, source=source)
    backbone = LlamaBackbone(config, dtype=dtype, random_init=not load_weights)
    if load_weights:
        assign_weights(backbone, gguf_tensors(reader, config, source), checkpoint=source)
    tokenizer = _load_tokenizer(reader, source)
    return LoadedPreset(
        backbone=backbone,
        tokenizer=tokenizer,
        stop_token_ids=stop_token_ids(reader, tokenizer),
        sequence_length=None,
        source=source,
    )


def stop_token_ids(reader: gguf.GGUFReader, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The eos id, the end-of-turn id, and <|im_end|> / <|eot_id|> when the vocabulary has them."""
    ids: list[int] = []
    for key in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID):
        value = metadata(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if tokenizer is not None:
        ids.extend(id for id in tokenizer.stop_token_ids if id not in ids)
    else:  # no tokenizer object (a kind not read here): still find the end-of-turn markers by their text
        tokens = metadata(reader, gguf.Keys.Tokenizer.LIST) or []
        ids.extend(tokens.index(t) for t in END_OF_TURN_TOKENS if t in tokens and tokens.index(t) not in ids)
    return tuple(ids)


def _load_tokenizer(reader: gguf.GGUFReader, source: str) -> Tokenizer | None:
    """The tokenizer in the metadata; None (with a warning) when the file has none or one of another kind."""
    fields = read_gguf_metadata(reader, prefixes=("tokenizer.",))
    if "tokenizer.ggml.model" not in fields:
        return None
    try:
        return tokenizer_from_gguf_metadata(fields)
    except ValueError as e:
        # The weights are still usable with token ids; say why text in / text out will not work.
        warnings.warn(f"{source}: no tokenizer loaded: {e}", stacklevel=3)
        return None
