"""The CPU decode-attention kernel (`cpu_paged_attention.cc`): built on first use, called through `jax.ffi`.

Why a kernel: on CPU, XLA runs decode attention's small per-page products as batched dots on one core, ~30% of
a 64-slot decode step of the demo model, and reads every page below the highest one in use, so a step of a few
rows in a mostly empty pool still reads it all. The kernel walks each slot's own pages and spreads the slots
over XLA's intra-op threads (see the .cc file). `model.paged_attention.decode_attention` stays the reference
and runs wherever this cannot: other platforms (`jax.lax.platform_dependent` picks per platform at compile
time), pools that are not float32, a pool split across devices, or a machine without a C++ compiler.

The kernel is built on first use (see `model.kernels.build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from model.kernels import build

NAME, SYMBOL, TARGET = "cpu_paged_attention", "BatchgenPagedAttention", "batchgen_paged_attention"


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    return build.library_path(NAME)


def supports(q: jax.Array, chunks_k: Sequence[jax.Array]) -> bool:
    """Whether the library has an instantiation for these shapes and types (`Select` in the .cc file): float32
    pools of 32-position pages, head size 64 or 128, 1 to 8 query heads per KV head."""
    (_, _, h, d), (_, k_heads, _, page) = q.shape, chunks_k[0].shape
    return chunks_k[0].dtype == jnp.float32 and page == 32 and d in (64, 128) and 1 <= h // k_heads <= 8


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: the engine then uses the pure-JAX attention."""
    return build.register(NAME, SYMBOL, TARGET)


def decode_attention(q: jax.Array, chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], view) -> jax.Array:
    """`model.paged_attention.decode_attention` computed by the kernel: q [B, 1, H, D] -> [B, 1, H, D]. The pool
    chunks must be float32; view.owner and view.start are not needed (a slot's row of the page table lists its
    pages in position order)."""
    b, _, h, d = q.shape
    k_heads = chunks_k[0].shape[1]
    qg = (q[:, 0].astype(jnp.float32) * d**-0.5).reshape(b, k_heads, h // k_heads, d)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(qg.shape, jnp.float32))
    out = call(qg, view.lengths.astype(jnp.int32), view.table.astype(jnp.int32), *chunks_k, *chunks_v)
    return out.reshape(b, 1, h, d).astype(q.dtype)
