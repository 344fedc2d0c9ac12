"""The CPU decode-attention kernel (`cpu_paged_attention.cc`): built on first use, called through `jax.ffi`.

Why a kernel: on CPU, XLA runs decode attention's small per-page products as batched dots on one core, ~30% of
a 64-slot decode step of the demo model, and reads every page below the highest one in use, so a step of a few
rows in a mostly empty pool still reads it all. The kernel walks each slot's own pages and spreads the slots
over XLA's intra-op threads (see the .cc file). It also writes the step's new keys and values into the pool,
which XLA does as an element-by-element scatter (~10% of the step). `model.paged_attention.step_attention`'s
XLA path (`write`, then `decode_attention`) stays the reference and runs wherever this cannot: other platforms
(`model.kernels.platform.on_cpu`), pools that are neither float32 nor
bfloat16, a pool split across devices, or a machine without a C++ compiler.

The kernel is built on first use (see `model.kernels.build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from model.kernels import build, cpu_paged_cache

NAME, SYMBOL, TARGET = "cpu_paged_attention", "BatchgenPagedWriteAttention", "batchgen_paged_write_attention"


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    return build.library_path(NAME)


def supports(q: jax.Array, chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array]) -> bool:
    """Whether the library has an instantiation for these shapes and types (`Select` in the .cc file): float32
    or bfloat16 pools (keys and values alike) of 32-position pages, head size 64 or 128, 1 to 8 query heads per
    KV head."""
    (_, _, h, d), (_, k_heads, _, page) = q.shape, chunks_k[0].shape
    return (cpu_paged_cache.supports_write(chunks_k, chunks_v) and page == 32 and d in (64, 128)
            and 1 <= h // k_heads <= 8)


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: the engine then uses the pure-JAX attention."""
    return build.register(NAME, SYMBOL, TARGET)


def write_and_attend(
    q: jax.Array, new_k: jax.Array, new_v: jax.Array, chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], view
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """`model.paged_attention.step_attention` computed by the kernel: new_k and new_v [B, K, D] written at
    view.write_pages (offset view.lengths % P), then q [B, 1, H, D] attending over each slot's pages. Returns the
    attention [B, 1, H, D] and the chunks, updated in place (each result aliases its argument). view.owner and
    view.start are not needed: a slot's row of the page table lists its pages in position order."""
    b, _, h, d = q.shape
    k_heads = chunks_k[0].shape[1]
    qg = (q[:, 0].astype(jnp.float32) * d**-0.5).reshape(b, k_heads, h // k_heads, d)
    chunks = (*chunks_k, *chunks_v)
    before = 6  # the operands before the chunks
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct(qg.shape, jnp.float32), *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in chunks)),
        input_output_aliases={before + i: 1 + i for i in range(len(chunks))},
    )
    out, *written = call(
        qg, view.lengths.astype(jnp.int32), view.table.astype(jnp.int32), new_k.astype(jnp.float32),
        new_v.astype(jnp.float32), view.write_pages.astype(jnp.int32), *chunks,
    )
    n = len(chunks_k)
    return out.reshape(b, 1, h, d).astype(q.dtype), tuple(written[:n]), tuple(written[n:])
