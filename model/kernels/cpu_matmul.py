"""The CPU weight product (`cpu_matmul.cc`), float32 or int8 weights: built on first use (see
`model.kernels.build`), called through `jax.ffi`.

Why a kernel: XLA's CPU products (YNNPACK) reach ~110 GFLOP/s at the decode step's 64 rows on a 2-core AVX-512
Xeon, ~40% of its peak; the kernel's 8 x 48 register tiles over L1-sized weight panels do 5-28% better from 32
to 512 rows (float32, measured interleaved in one process). On a 2-core AVX2 EPYC (Zen 2) its 6 x 16 tiles are
1.2x XLA at 64 rows and behind it above 128 (`AVX2_MAX_ROWS`). And the engine's int8 is weight-only
(activations stay float32, so its quality is that of the quantized weights alone): XLA converts such a weight
to float inside each product, over the whole weight for every few columns, which made int8 slower than float32
at 64 rows. The kernel converts each weight block once, into the same panel. On AVX512-VNNI CPUs (`quads`) it
multiplies int8 weights in quads instead (`panels.to_quads`) against activations rounded per row to 16 bits, two
`vpdpbusd` for what takes eight float32 FMAs: about half float32's time, at the weight-only int8 logits (the
README's int8 notes). `model.transformer.project`'s XLA
product stays the reference and runs wherever this cannot: other platforms (`platform.on_cpu`),
weights split across devices, activations that are not float32, or a machine without a C++ compiler.
`matmul_argmax` is the same product as a greedy step's LM head: it returns each row's first largest column, not
the [rows, vocabulary] logits (`model.transformer.greedy_tokens`). Both take a weight as [K, N], as [N, K]
(`transposed`: the tied embedding) or in panels (`model.kernels.panels`, the engine's decode weights on CPU), which
the kernel reads in place when they are float32.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.kernels import build
from model.kernels.panels import Panels

NAME = "cpu_matmul"
TARGETS = {  # weight dtype -> (the handler's symbol in the library, its XLA target name)
    "float32": ("BatchgenF32Matmul", "batchgen_f32_matmul"),
    "int8": ("BatchgenInt8Matmul", "batchgen_int8_matmul"),
    "uint8": ("BatchgenQuadsMatmul", "batchgen_quads_matmul"),  # int8 weights in quads (AVX512-VNNI builds)
}
LAYER_TARGETS = {  # the same products with one layer of weights stacked [L, ...] (prefill's and scoring's loop)
    "float32": ("BatchgenF32LayerMatmul", "batchgen_f32_layer_matmul"),
    "int8": ("BatchgenInt8LayerMatmul", "batchgen_int8_layer_matmul"),
    "uint8": ("BatchgenQuadsLayerMatmul", "batchgen_quads_layer_matmul"),
}
ARGMAX_TARGETS = {  # the same products, returning each row's best column instead (a greedy step's LM head)
    "float32": ("BatchgenF32MatmulArgmax", "batchgen_f32_matmul_argmax"),
    "int8": ("BatchgenInt8MatmulArgmax", "batchgen_int8_matmul_argmax"),
    "uint8": ("BatchgenQuadsMatmulArgmax", "batchgen_quads_matmul_argmax"),
}


# Below this many rows XLA's product wins: the kernel's panel costs a write and a read of every weight block
# (weights not in panels, or int8), which a few rows do not repay (1 row: 109 vs 70 ms for the demo model's
# products, 2 rows: even; 4 rows: the kernel 11% faster; interleaved in one process).
MIN_ROWS = 4

# Above this many rows a float32 weight not in panels (prefill's and scoring's [K, N], the tied head's [N, K]) is
# faster in XLA's product on an AVX2 build: its 6 x 16 tiles reach ~155-160 GFLOP/s at any M on a 2-core EPYC
# (Zen 2), where XLA's reach 170-175 at 256 and 512 rows and are even at 128 (the demo model's layer products,
# interleaved in one process). At 64 rows the kernel is 1.2x XLA there, and an AVX-512 build wins at every M.
AVX2_MAX_ROWS = 128


def library_path() -> Path:
    """Where this machine's build of the kernel lives (whether built yet or not)."""
    return build.library_path(NAME)


def supports(x: jax.Array, w: jax.Array | Panels, scale: jax.Array | None) -> bool:
    """Whether the kernel takes these operands, and is worth calling: float32 x [M, K] with M >= MIN_ROWS and a
    weight of K x N entries (or Panels of K inputs), float32 without a scale or int8 with a float32 scale of N
    entries, N whole 16-float vectors. (`matmul` itself computes any M.)"""
    in_panels = isinstance(w, Panels)
    if in_panels:
        if w.inputs != x.shape[-1]:
            return False
        w = w.data
    if x.ndim != 2 or x.dtype != jnp.float32 or x.shape[0] < MIN_ROWS or x.shape[1] == 0 or w.size % x.shape[1]:
        return False
    n = w.size // x.shape[1]
    if scale is None:
        kind_ok = w.dtype == jnp.float32
        if not in_panels and x.shape[0] > AVX2_MAX_ROWS and vector_lanes() == 8:
            return False
    else:
        int8 = w.dtype == jnp.int8 or in_panels and w.dtype == jnp.uint8  # uint8: in quads
        kind_ok = int8 and scale.dtype == jnp.float32 and scale.size == n
    return kind_ok and n % 16 == 0


@functools.cache
def vector_lanes() -> int:
    """Floats per vector register of this machine's build: 16 (AVX-512) or 8 (AVX2); 0 when it is not built."""
    if not available():
        return 0
    return ctypes.cdll.LoadLibrary(str(library_path())).BatchgenMatmulLanes()


@functools.cache
def quads() -> bool:
    """Whether this machine's build multiplies int8 weights in quads (AVX512-VNNI: `panels.to_quads`), rounding
    the activations per row to 16 bits (see `cpu_matmul.cc`)."""
    if not available():
        return False
    return ctypes.cdll.LoadLibrary(str(library_path())).BatchgenMatmulQuads() == 1


def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (built now if needed). False, with the
    reason logged once, when it cannot be: products then stay XLA's."""
    targets = (*TARGETS.values(), *LAYER_TARGETS.values(), *ARGMAX_TARGETS.values())
    return all(build.register(NAME, symbol, target) for symbol, target in targets)


def _layout(w: jax.Array | Panels, transposed: bool) -> tuple[jax.Array, np.int32]:
    """The weight's array and its layout as the kernel's `layout` attribute: 0 [K, N], 1 [N, K], 2 panels, 3 quads."""
    if isinstance(w, Panels):
        return w.data, np.int32(3 if w.quads else 2)
    return w, np.int32(1 if transposed else 0)


def matmul(x: jax.Array, w: jax.Array | Panels, scale: jax.Array | None, transposed: bool = False) -> jax.Array:
    """x [M, K] float32 times w viewed as [K, N] ([N, K] when `transposed`; Panels hold their own layout):
    [M, N] float32. An int8 w comes with one scale per output channel, applied to the weight before the sum."""
    w, layout = _layout(w, transposed)
    n = w.size // x.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    if scale is None:
        return jax.ffi.ffi_call(TARGETS["float32"][1], out)(x, w, layout=layout)
    return jax.ffi.ffi_call(TARGETS[w.dtype.name][1], out)(x, w, scale.reshape(n), layout=layout)


def layer_matmul(x: jax.Array, w: jax.Array | Panels, scale: jax.Array | None, layer: jax.Array) -> jax.Array:
    """`matmul(x, w[layer], scale[layer])` for weights stacked [L, ...] (Panels of stacked data too) and their
    scales [L, ...], `layer` an int32 scalar (traced: the loop's index): the kernel reads the layer where it lies,
    where a slice of the stacked array would be copied first for a custom call to read it."""
    w, layout = _layout(w, False)
    layers = w.shape[0]
    n = w.size // layers // x.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    index = jnp.asarray(layer, jnp.int32).reshape(())
    attributes = {"layout": layout, "layers": np.int32(layers)}
    if scale is None:
        return jax.ffi.ffi_call(LAYER_TARGETS["float32"][1], out)(x, w, index, **attributes)
    return jax.ffi.ffi_call(LAYER_TARGETS[w.dtype.name][1], out)(x, w, scale.reshape(layers, n), index, **attributes)


def matmul_argmax(x: jax.Array, w: jax.Array | Panels, scale: jax.Array | None, transposed: bool = False) -> jax.Array:
    """The first column of each row's largest value of `matmul(x, w, scale, transposed)`: [M] int32, without the
    [M, N] product ever being written (the kernel keeps each 48-column panel's best; the first panel holding the
    row's largest value wins here, so ties go to the lowest column, as `jnp.argmax`)."""
    w, layout = _layout(w, transposed)
    n = w.size // x.shape[1]
    panels = -(-n // 48)  # the kernel's work items of 48 columns (cpu_matmul.cc's kPanel)
    out = (jax.ShapeDtypeStruct((x.shape[0], panels), jnp.float32), jax.ShapeDtypeStruct((x.shape[0], panels), jnp.int32))
    if scale is None:
        best, where = jax.ffi.ffi_call(ARGMAX_TARGETS["float32"][1], out)(x, w, layout=layout)
    else:
        best, where = jax.ffi.ffi_call(ARGMAX_TARGETS[w.dtype.name][1], out)(x, w, scale.reshape(n), layout=layout)
    panel = jnp.argmax(best, axis=-1)
    return jnp.take_along_axis(where, panel[:, None], axis=-1)[:, 0]
