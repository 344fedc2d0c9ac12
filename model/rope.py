"""Rotary position embeddings: plain, linear-scaled and Llama 3.1 frequency-scaled.

The rotation pairs dimension i with i + D/2 ("rotate half"), as Hugging Face and keras-hub do. GGUF files store
q/k rows in llama.cpp's interleaved order instead; the GGUF loader undoes that, so this module has one layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation speeds, shape [D/2], float64 on the host (folded into programs as constants)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_max_wavelength ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # Llama 3.1: wavelengths longer than the original context are slowed by `factor`, shorter than
    # original/high_freq_factor are kept, and the band between is interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelength = old_context / scaling.low_freq_factor
    high_freq_wavelength = old_context / scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(is_medium, smoothed, scaled)


class Rotation(NamedTuple):
    """cos and sin of positions' angles, [..., T, 1, D] float32 for positions [..., T]: computed once and shared by
    every layer's queries and keys. Per layer, XLA fused a copy of the sin/cos into each layer's products (60 of
    each in a decode step of the demo model)."""

    cos: jnp.ndarray
    sin: jnp.ndarray


def rotation(positions: jnp.ndarray, inv_freq: np.ndarray) -> Rotation:
    """The rotation for absolute positions [..., T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., T, 1, D]
    return Rotation(jnp.cos(angles), jnp.sin(angles))


def rotate(x: jnp.ndarray, by: Rotation) -> jnp.ndarray:
    """Rotates queries or keys x [B, T, heads, D] by their positions' rotation, [B, T, 1, D] (`rotation`)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated_half = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * by.cos + rotated_half * by.sin).astype(x.dtype)
