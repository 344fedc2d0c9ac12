"""The CPU int8-weight product (`cpu_int8_matmul.cc`): built on first use (see `model.kernels.build`), called
through `jax.ffi`.

Why a kernel: the engine's int8 is weight-only (activations stay float32, so its quality is that of the
quantized weights alone). XLA converts such a weight to float inside each product, over the whole weight for
every few columns, and at 64 rows that made int8 slower than float32. The kernel converts each block once into
an L1-sized float panel and runs all rows against it (see the .cc file). `model.transformer.project`'s XLA
product stays the reference and runs wherever this cannot: other platforms (`jax.lax.platform_dependent`),
weights split across devices, activations that are not float32, or a machine without a C++ compiler.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from model.kernels import build

NAME, SYMBOL, TARGET = "cpu_int8_matmul", "BatchgenInt8Matmul", "batchgen_int8_matmul"


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    return build.library_path(NAME)


def supports(x: jax.Array, w: jax.Array, scale: jax.Array) -> bool:
    """Whether the kernel takes these operands: float32 x [M, K], an int8 weight of K x N entries, N (the
    scale's size) whole 16-float vectors."""
    n = scale.size
    return (
        x.ndim == 2 and x.dtype == jnp.float32 and w.dtype == jnp.int8 and scale.dtype == jnp.float32
        and n % 16 == 0 and w.size == x.shape[1] * n
    )


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: products then stay XLA's."""
    return build.register(NAME, SYMBOL, TARGET)


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array, transposed: bool) -> jax.Array:
    """x [M, K] float32 times int8 w viewed as [K, N] ([N, K] when `transposed`) with one scale per output
    channel: [M, N] float32."""
    n = scale.size
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w, scale.reshape(n), transposed=transposed)
