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


def attend(qg: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array) -> jax.Array:
    """Each token's attention over its own prompt up to itself: qg [B, T, K, G, D] (scaled by D^-0.5), k and v
    [B, T, K, D], starts [B * T] (`segment_starts`) -> [B, T, K, G, D] float32 (zeros for padding)."""
    b, t, k_heads, groups, dim = qg.shape
    n = b * t
    keys = jnp.pad(k.astype(jnp.float32).reshape(n, k_heads, dim).transpose(1, 2, 0), ((0, 0), (0, 0), (0, PADDING)))
    values = v.astype(jnp.float32).reshape(n, k_heads, dim).transpose(1, 0, 2)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, k_heads, groups, dim), jnp.float32))(
        qg.reshape(n, k_heads, groups, dim), keys, values, starts.astype(jnp.int32)
    )
    return out.reshape(b, t, k_heads, groups, dim)
