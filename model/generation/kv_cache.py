"""The KV cache: keys and values of every layer, preallocated in grouped form.

Shape [L, B, K, S, D] (layers, slots, KV heads, max length, head dim): K/V heads are stored once, never repeated
to the H query heads. Heads come before positions so that each head's keys are contiguous and the attention
dot products read the cache without a transpose (measured on the demo model's shapes: 2.7x faster per layer
than [L, B, S, K, D]). The cache holds no lengths; the engine keeps one length per slot and passes it to
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
    k: jax.Array  # [L, B, K, S, D]
    v: jax.Array  # [L, B, K, S, D]
    # Static (part of a jitted step's cache key, never traced): a split cache's layout, restated after every
    # write so that XLA keeps the cache split along KV heads through the steps instead of choosing its own.
    sharding: jax.sharding.Sharding | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def allocate(
        cls, config: LlamaConfig, slots: int, max_length: int, dtype, sharding: jax.sharding.Sharding | None = None
    ) -> "KVCache":
        """Zeros; with `sharding` (see `model.parallel.cache_sharding`) each device allocates only its own KV heads."""
        shape = (config.num_layers, slots, config.num_key_value_heads, max_length, config.head_dim)
        return cls(jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding), sharding)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

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
    # [L, P, T, K, D] -> [L, P, K, T, D], the cache's order.
    k = cache.k.at[:, slots, :, :t].set(new_k.swapaxes(2, 3).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, :, :t].set(new_v.swapaxes(2, 3).astype(cache.v.dtype), mode="drop")
    return _keep_layout(cache, k, v)


def write_tokens(cache: KVCache, new_k: jax.Array, new_v: jax.Array, positions: jax.Array) -> KVCache:
    """Writes one new token per slot: keys/values [L, B, 1, K, D] at `positions` [B].

    A position past the end (a finished slot) is dropped rather than clamped onto a real entry.
    """
    slots = jnp.arange(cache.slots)
    # Indexing slots (axis 1) and positions (axis 3) together puts their shared B axis first: [B, L, K, D].
    k = cache.k.at[:, slots, :, positions].set(new_k[:, :, 0].swapaxes(0, 1).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, slots, :, positions].set(new_v[:, :, 0].swapaxes(0, 1).astype(cache.v.dtype), mode="drop")
    return _keep_layout(cache, k, v)


def _keep_layout(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    return KVCache(*keep_layout(cache.sharding, k, v), cache.sharding)


def keep_layout(sharding: jax.sharding.Sharding | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Restates a split cache's layout after a write, so that XLA keeps it split along KV heads."""
    if sharding is None:
        return arrays
    return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)
