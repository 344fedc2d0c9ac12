"""The CPU cache kernel (`cpu_paged_cache.cc`): prefill's writes into the paged KV pool and copies of whole pages,
in place, built on first use and called through `jax.ffi`.

Why a kernel: XLA's CPU backend has no bfloat16 scatter; it converts the whole pool to float32 and back around
every write, so over a bfloat16 cache prefill ran at half its float32 speed. `model.generation.paged_cache`'s
XLA writes stay the reference and run wherever this cannot: other platforms (`platform.on_cpu`),
pools split across devices, pools neither float32 nor bfloat16 (copies take any type), or a machine without a
C++ compiler.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from model.kernels import build

NAME = "cpu_paged_cache"
WRITE = ("BatchgenPagedWrite", "batchgen_paged_write")  # (the handler's symbol in the library, its XLA target)
COPY = ("BatchgenPagedCopy", "batchgen_paged_copy")


def supports_write(chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array]) -> bool:
    """Whether the kernel writes into this pool: keys and values all float32 or all bfloat16 (`cpu_paged_pool.h`;
    the attention kernel reads and writes the same pools)."""
    dtypes = {chunk.dtype for chunk in (*chunks_k, *chunks_v)}
    return len(dtypes) == 1 and dtypes.pop() in (jnp.float32, jnp.bfloat16)


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: the pool's writes then stay XLA's."""
    return all(build.register(NAME, symbol, target) for symbol, target in (WRITE, COPY))


def write(
    chunks_k: Sequence[jax.Array], chunks_v: Sequence[jax.Array], new_k: jax.Array, new_v: jax.Array,
    pages: jax.Array, offsets: jax.Array,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """`paged_cache.write_layer` by the kernel: X tokens' keys and values [X, K, D] written at (pages [X],
    offsets [X]) of one layer's pool (a page past the pool writes nothing); the chunks updated in place."""
    chunks = (*chunks_k, *chunks_v)
    before = 4  # the operands before the chunks
    call = jax.ffi.ffi_call(
        WRITE[1], tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in chunks),
        input_output_aliases={before + i: i for i in range(len(chunks))},
    )
    written = call(new_k.astype(jnp.float32), new_v.astype(jnp.float32), pages.astype(jnp.int32),
                   offsets.astype(jnp.int32), *chunks)
    n = len(chunks_k)
    return tuple(written[:n]), tuple(written[n:])


def copy(chunks: Sequence[jax.Array], source: jax.Array, target: jax.Array) -> tuple[jax.Array, ...]:
    """Pages source [M] copied onto pages target [M] of one layer's keys or values (a target past the pool is
    skipped; every source is read before any target is written); the chunks updated in place."""
    before = 2
    call = jax.ffi.ffi_call(
        COPY[1], tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in chunks),
        input_output_aliases={before + i: i for i in range(len(chunks))},
    )
    return tuple(call(source.astype(jnp.int32), target.astype(jnp.int32), *chunks))
