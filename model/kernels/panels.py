"""Weights in panels: the layout the CPU product kernel reads in place (`cpu_matmul.cc`).

A product's weight viewed as [K, N] (a Dense kernel [In, Out], or the tied embedding [V, M] read transposed as the
LM head) is stored as [N / 16, K, 16]: the 16 columns of each AVX-512 vector, depth after depth. The kernel's
tiles then stream each weight straight from memory; from [K, N] it first had to copy every block into a small
panel (rows of [K, N] lie N floats apart and would evict each other from L1), a pass over the whole weight that
was ~15% of a float32 decode step at 64 to 128 rows, measured with `perf` on the engine's step.

The engine keeps its per-layer decode weights in panels on CPU (`for_kernel`); XLA reads them too, with one
`dot_general` that contracts K in place (`product`), so every platform and the tests have a reference.

Where the kernel is built with AVX512-VNNI (`cpu_matmul.quads`), int8 weights go into quads instead: uint8
[N / 16, K / 4, 16, 4], each weight + 128, a column's four depths side by side as one `vpdpbusd` lane sums them
(see `cpu_matmul.cc`). The same Panels class holds them; its data's dtype, uint8, tells the two apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

WIDTH = 16  # columns per panel: one AVX-512 vector of float32
QUAD = 4  # depths a quad holds side by side: the int8 products one 32-bit lane of `vpdpbusd` sums
OFFSET = 128  # added to an int8 weight in quads: `vpdpbusd` takes its weight operand unsigned

# The decode step's product weights: every layer's projections, and the LM head (its own, or the tied embedding).
LAYER_PRODUCTS = ("query", "key", "value", "attention_output", "gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Panels:
    """A weight [K, N] stored as data [N / 16, K, 16] (float32, or int8 with its scale kept beside it as before),
    or an int8 one in quads: uint8 data [N / 16, K / 4, 16, 4] holding weight + 128."""

    data: jax.Array

    @property
    def quads(self) -> bool:
        return self.data.dtype == jnp.uint8

    @property
    def dtype(self) -> Any:
        """The weight's own type (int8 for quads)."""
        return jnp.dtype(jnp.int8) if self.quads else self.data.dtype

    @property
    def inputs(self) -> int:
        return self.data.shape[1] * (QUAD if self.quads else 1)

    def matrix(self) -> jax.Array:
        """The weight as data [N / 16, K, 16] of its own type (quads unpacked)."""
        if not self.quads:
            return self.data
        groups, quads = self.data.shape[:2]
        values = (self.data.astype(jnp.int16) - OFFSET).astype(jnp.int8)
        return values.transpose(0, 1, 3, 2).reshape(groups, quads * QUAD, WIDTH)


def to_panels(w: jax.Array, inputs: int, transposed: bool = False) -> Panels:
    """w viewed as [inputs, N] ([N, inputs] when `transposed`) -> Panels; N must be whole panels."""
    matrix = w.reshape(-1, inputs) if transposed else w.reshape(inputs, -1).T  # [N, K]
    n = matrix.shape[0]
    if n % WIDTH:
        raise ValueError(f"{n} columns are not whole panels of {WIDTH}")
    return Panels(matrix.reshape(n // WIDTH, WIDTH, inputs).transpose(0, 2, 1))


def to_quads(w: jax.Array, inputs: int, transposed: bool = False) -> Panels:
    """An int8 weight viewed as [inputs, N] ([N, inputs] when `transposed`) -> Panels in quads; N must be whole
    panels and `inputs` whole quads."""
    if inputs % QUAD:
        raise ValueError(f"{inputs} inputs are not whole quads of {QUAD}")
    data = to_panels(w, inputs, transposed).data  # [N / 16, K, 16]
    groups = data.shape[0]
    quads = data.reshape(groups, inputs // QUAD, QUAD, WIDTH).transpose(0, 1, 3, 2)  # [N / 16, K / 4, 16, 4]
    return Panels((quads.astype(jnp.int16) + OFFSET).astype(jnp.uint8))


def product(x: jax.Array, panels: Panels) -> jax.Array:
    """x [M, K] times the weight in panels: [M, N] float32, XLA's product (the kernel's reference)."""
    out = jax.lax.dot_general(
        x, panels.matrix().astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [M, N / 16, 16]
    return out.reshape(x.shape[0], -1)


def rows(panels: Panels, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the [N, K] matrix the panels hold (the tied embedding's lookup): [..., K]."""
    if panels.quads:
        quads = panels.data[ids // WIDTH, :, ids % WIDTH]  # [..., K / 4, 4]
        values = quads.reshape(*quads.shape[:-2], panels.inputs)
        return (values.astype(jnp.int16) - OFFSET).astype(jnp.int8)
    return panels.data[ids // WIDTH, :, ids % WIDTH]


def for_kernel(params: dict, hidden_dim: int, quads: bool = False) -> dict:
    """Per-layer weights (`transformer.unstack_layers`) with every product weight the kernel takes (float32, or
    int8 with a scale, whole panels of columns) in panels: each layer's (`layer_for_kernel`) and the LM head
    (`head_for_kernel`). `quads`: int8 weights in quads (where the kernel multiplies those: `cpu_matmul.quads`)."""
    layers = [layer_for_kernel(layer, hidden_dim, quads) for layer in params["layers"]]
    return head_for_kernel({**params, "layers": layers}, hidden_dim, quads)


def layer_for_kernel(layer: dict, hidden_dim: int, quads: bool = False) -> dict:
    """One layer's weights with its products in panels (see `for_kernel`)."""
    layer = dict(layer)
    for name in LAYER_PRODUCTS:
        if not isinstance(layer[name], Panels):  # quads sliced from prefill's stacked ones are in place already
            _convert(layer, name, product_inputs(name, layer[name].size, hidden_dim), quads=quads)
    return layer


def product_inputs(name: str, size: int, hidden_dim: int) -> int:
    """K of the layer product `name` whose weight has `size` entries: the two that write the residual stream
    (attention_output, down) have M outputs, the rest M inputs."""
    return size // hidden_dim if name in ("attention_output", "down") else hidden_dim


def head_for_kernel(params: dict, hidden_dim: int, quads: bool = False) -> dict:
    """The weights with the LM head in panels (see `for_kernel`). A tied embedding goes into panels too: the head
    reads it as panels and decode's token lookup reads rows of them (`rows`), one copy for both."""
    out = dict(params)
    if "lm_head" in out:
        _convert(out, "lm_head", hidden_dim, quads=quads)
    else:
        _convert(out, "token_embedding", hidden_dim, transposed=True, quads=quads)
    return jax.block_until_ready(out)


def fits_quads(dtype: Any, inputs: int, outputs: int, scaled: bool) -> bool:
    """Whether a weight [inputs, outputs] can go into quads: int8 with a scale, whole quads of inputs and whole
    panels of outputs."""
    return dtype == jnp.int8 and scaled and inputs % QUAD == 0 and outputs % WIDTH == 0


def _convert(weights: dict, name: str, inputs: int, transposed: bool = False, quads: bool = False) -> None:
    """weights[name] into panels, in the dict, where the kernel takes it (an int8 one in quads with `quads`)."""
    w = weights.get(name)
    if w is None or (w.size // inputs) % WIDTH:
        return
    scaled = name + "_scale" in weights
    if quads and fits_quads(w.dtype, inputs, w.size // inputs, scaled):
        weights[name] = to_quads(w, inputs, transposed)
    elif w.dtype == jnp.float32 and not scaled or w.dtype == jnp.int8 and scaled:
        weights[name] = to_panels(w, inputs, transposed)
