"""The KV cache: keys and values of every layer, preallocated in grouped form.

Shape [L, B, S, K, D] (layers, slots, max length, KV heads, head dim): K/V heads are stored once, never repeated
to the H query heads. The cache holds no lengths; the engine keeps one length per slot and passes it to
`transformer.forward`, which only reads the cache. Writes are the functions below, used inside jitted steps
whose cache arguments are donated, so XLA updates the buffers in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, D]
    v: jax.Array  # [L, B, S, K, D]

    @classmethod
    def allocate(cls, config: LlamaConfig, slots: int, max_length: int, dtype) -> "KVCache":
        shape = (config.num_layers, slots, max_length, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def write_prompts(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.Array) -> KVCache:
    """Writes whole prompts' keys/values [L, P, T, K, D] at positions 0..T-1 of `slots` [P].

    Padding rows point at slot index B (out of range) and are dropped by the scatter.
    Positions past a prompt's real length receive padding garbage; they stay invisible (beyond that slot's
    length) until decode overwrites them.
    """
    t = new_k.shape[2]
    assert t <= cache.max_length, (t, cache.max_length)
    k = cache.k.at[:, slots, :t].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, :t].set(new_v.astype(cache.v.dtype), mode="drop")
    return KVCache(k, v)


def write_tokens(cache: KVCache, new_k: jax.Array, new_v: jax.Array, positions: jax.Array) -> KVCache:
    """Writes one new token per slot: keys/values [L, B, 1, K, D] at `positions` [B].

    A position past the end (a finished slot) is dropped rather than clamped onto a real entry.
    """
    slots = jnp.arange(cache.slots)
    k = cache.k.at[:, slots, positions].set(new_k[:, :, 0].astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, positions].set(new_v[:, :, 0].astype(cache.v.dtype), mode="drop")
    return KVCache(k, v)
