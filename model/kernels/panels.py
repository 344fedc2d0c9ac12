"""Weights in panels: the layout the CPU product kernel reads in place (`cpu_matmul.cc`).

A product's weight viewed as [K, N] (a Dense kernel [In, Out], or the tied embedding [V, M] read transposed as the
LM head) is stored as [N / 16, K, 16]: the 16 columns of each AVX-512 vector, depth after depth. The kernel's
tiles then stream each weight straight from memory; from [K, N] it first had to copy every block into a small
panel (rows of [K, N] lie N floats apart and would evict each other from L1), a pass over the whole weight that
was ~15% of a float32 decode step at 64 to 128 rows, measured with `perf` on the engine's step.

The engine keeps its per-layer decode weights in panels on CPU (`for_kernel`); XLA reads them too, with one
`dot_general` that contracts K in place (`product`), so every platform and the tests have a reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

WIDTH = 16  # columns per panel: one AVX-512 vector of float32

# The decode step's product weights: every layer's projections, and the LM head (its own, or the tied embedding).
LAYER_PRODUCTS = ("query", "key", "value", "attention_output", "gate", "up", "down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Panels:
    """A weight [K, N] stored as data [N / 16, K, 16] (float32, or int8 with its scale kept beside it as before)."""

    data: jax.Array

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def inputs(self) -> int:
        return self.data.shape[1]


def to_panels(w: jax.Array, inputs: int, transposed: bool = False) -> Panels:
    """w viewed as [inputs, N] ([N, inputs] when `transposed`) -> Panels; N must be whole panels."""
    matrix = w.reshape(-1, inputs) if transposed else w.reshape(inputs, -1).T  # [N, K]
    n = matrix.shape[0]
    if n % WIDTH:
        raise ValueError(f"{n} columns are not whole panels of {WIDTH}")
    return Panels(matrix.reshape(n // WIDTH, WIDTH, inputs).transpose(0, 2, 1))


def product(x: jax.Array, panels: Panels) -> jax.Array:
    """x [M, K] times the weight in panels: [M, N] float32, XLA's product (the kernel's reference)."""
    out = jax.lax.dot_general(
        x, panels.data.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [M, N / 16, 16]
    return out.reshape(x.shape[0], -1)


def rows(panels: Panels, ids: jax.Array) -> jax.Array:
    """Rows `ids` of the [N, K] matrix the panels hold (the tied embedding's lookup): [..., K]."""
    return panels.data[ids // WIDTH, :, ids % WIDTH]


def for_kernel(params: dict, hidden_dim: int) -> dict:
    """Per-layer weights (`transformer.unstack_layers`) with every product weight the kernel takes (float32, or
    int8 with a scale, whole panels of columns) in panels: each layer's (`layer_for_kernel`) and the LM head
    (`head_for_kernel`)."""
    layers = [layer_for_kernel(layer, hidden_dim) for layer in params["layers"]]
    return head_for_kernel({**params, "layers": layers}, hidden_dim)


def layer_for_kernel(layer: dict, hidden_dim: int) -> dict:
    """One layer's weights with its products in panels (see `for_kernel`)."""
    layer = dict(layer)
    for name in LAYER_PRODUCTS:  # the two that write the residual stream have M outputs, the rest M inputs
        _convert(layer, name, layer[name].size // hidden_dim if name in ("attention_output", "down") else hidden_dim)
    return layer


def head_for_kernel(params: dict, hidden_dim: int) -> dict:
    """The weights with the LM head in panels (see `for_kernel`). A tied embedding goes into panels too: the head
    reads it as panels and decode's token lookup reads rows of them (`rows`), one copy for both."""
    out = dict(params)
    if "lm_head" in out:
        _convert(out, "lm_head", hidden_dim)
    else:
        _convert(out, "token_embedding", hidden_dim, transposed=True)
    return jax.block_until_ready(out)


def _convert(weights: dict, name: str, inputs: int, transposed: bool = False) -> None:
    """weights[name] into panels, in the dict, where the kernel takes it."""
    w = weights.get(name)
    if w is None:
        return
    scaled = name + "_scale" in weights
    if (w.dtype == jnp.float32 and not scaled or w.dtype == jnp.int8 and scaled) and (w.size // inputs) % WIDTH == 0:
        weights[name] = to_panels(w, inputs, transposed)
