"""The CPU attention of packed prompts (`cpu_packed_attention.cc`): prefill's and scoring's self-attention,
built on first use (see `model.kernels.build`), called through `jax.ffi`.

Why a kernel: XLA computes a packed row's attention as dense blocks of queries x keys and masks what each token
may not see, so a row of a few long prompts computes most of its causal triangle across prompts, in products
whose 64-wide inner dimension runs far below XLA's matmul rate: ~18% of prefill's op time on the benchmark's main
workload for ~3% of its FLOPs. The kernel walks each token's own prompt only. `model.transformer._self_attention`
stays the reference and runs wherever this cannot: other platforms (`platform.on_cpu`), activations that are not
float32, head sizes or groupings not built, a context of cached pages (prompt sharing), or no C++ compiler.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from model.kernels import build

NAME, SYMBOL, TARGET = "cpu_packed_attention", "BatchgenPackedAttention", "batchgen_packed_attention"
PADDING = 16  # key columns after the last token (the .cc file's loads of a key block never run past them)


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    return build.library_path(NAME)


def supports(qg: jax.Array) -> bool:
    """Whether the library has an instantiation for queries qg [B, T, K, G, D]: float32, head size 64 or 128, 1 to
    8 query heads per KV head."""
    *_, groups, dim = qg.shape
    return qg.dtype == jnp.float32 and dim in (64, 128) and 1 <= groups <= 8


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: attention then stays XLA's."""
    return build.register(NAME, SYMBOL, TARGET)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """The first key each token sees, as the kernel takes it: [B * T] int32 indices into the rows laid end to
    end. segment_ids [B, T]: whole prompts packed one after another in each row (a prompt's tokens contiguous),
    -1 for padding, which sees nothing (its start is past it)."""
    b, t = segment_ids.shape
    index = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t)
    begins = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = jax.lax.cummax(jnp.where(begins, index, 0).reshape(-1))
    return jnp.where(segment_ids.reshape(-1) >= 0, starts, b * t)


def attend(
    qg: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array,
    context: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Each token's attention over its own prompt up to itself: qg [B, T, K, G, D] (scaled by D^-0.5), k and v
    [B, T, K, D], starts [B * T] (`segment_starts`) -> [B, T, K, G, D] float32 (zeros for padding).
    `context`: (keys [B, K, S, D], values [B, K, S, D], visible [B, T, S]) cached keys that come before the
    row's, and which of them each token sees (prompt sharing, `transformer._self_attention`'s context); one row
    (B = 1), as prefill calls are, since a context's keys belong to their row."""
    b, t, k_heads, groups, dim = qg.shape
    n = b * t
    keys = jnp.pad(k.astype(jnp.float32).reshape(n, k_heads, dim).transpose(1, 2, 0), ((0, 0), (0, 0), (0, PADDING)))
    values = v.astype(jnp.float32).reshape(n, k_heads, dim).transpose(1, 0, 2)
    if context is None:
        context_keys = jnp.zeros((k_heads, dim, PADDING), jnp.float32)
        context_values = jnp.zeros((k_heads, 0, dim), jnp.float32)
        visible = jnp.zeros((n, 0), jnp.uint8)
    else:
        if b != 1:
            raise ValueError(f"a context belongs to one row; got {b} rows")
        cache_k, cache_v, cache_visible = context
        context_keys = jnp.pad(cache_k[0].astype(jnp.float32).transpose(0, 2, 1), ((0, 0), (0, 0), (0, PADDING)))
        context_values = cache_v[0].astype(jnp.float32)
        visible = cache_visible.reshape(n, -1).astype(jnp.uint8)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, k_heads, groups, dim), jnp.float32))(
        qg.reshape(n, k_heads, groups, dim), keys, values, starts.astype(jnp.int32), context_keys, context_values,
        visible,
    )
    return out.reshape(b, t, k_heads, groups, dim)
