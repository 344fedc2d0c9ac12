"""The compute floor: FLOPs per generated token, and the matrix-product rate this machine reaches.

A generated token costs one pass of every weight matrix over one row (2 FLOPs per weight: a multiply and an
add), plus attention over the context. With L layers, hidden M, H query / K KV heads of size D, FFN F and
vocabulary V:

    weights per token  = L * (M*H*D [query] + 2*M*K*D [key, value] + H*D*M [output] + 3*M*F [gate, up, down])
                         + M*V [LM head; the embedding look-up is no product]
    FLOPs per token    = 2 * weights per token + 4 * L * H*D * context [scores q.k and the weighted sum of v]

Norms, rotary embeddings, softmax and sampling are left out: elementwise, well under 1% of the total.

The prompts cost compute too, before the first token comes out: each prompt token passes every layer's products
(not the LM head) and attends to the tokens before it,

    FLOPs per prompt token = 2 * (weights per token - M*V) + 4 * L * H*D * (its position + 1)

and on a workload of chat prompts that average more tokens than are generated, they are most of the work. So
the floor of a workload is (prompt FLOPs + generated FLOPs) / rate, and "% of floor" compares an engine's
wall time with it. (Counted this way a prompt's last token is paid for twice, once as a prompt token and once
in its first generated token: a 1% overstatement of the work, against the engine.)

The rate is measured, not looked up: a jitted function does exactly one decode step's weight products for the
whole model (every layer's seven products with distinct weights streamed from memory as in decoding, then the LM
head) at the benchmark's batch of rows, in float32. FLOPs per token / that rate is the fastest a float32 engine
can generate on this machine; "% of floor" is an engine's achieved FLOP/s over it.

Example:
    >>> flops = flops_per_token(config, context=100.0)
    >>> rate = measure_matmul_rate(config, rows=64)
    >>> rate.flops_per_second / flops.total  # tokens/s at the floor  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model.config import LlamaConfig

FORMULA = "2*(L*(2*M*H*D + 2*M*K*D + 3*M*F) + M*V) + 4*L*H*D*context"


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one generated token, split into the weight products and attention."""

    weights_per_token: int  # multiply-adds of the weight products, LM head included
    weight_flops: int
    attention_flops: float
    context: float  # mean tokens attended to per generated token
    formula: str = FORMULA

    @property
    def total(self) -> float:
        return self.weight_flops + self.attention_flops


def weights_per_token(config: LlamaConfig) -> int:
    """Weights that take part in products for one token: every layer's projections and the LM head."""
    m, h, k, d = config.hidden_dim, config.num_query_heads, config.num_key_value_heads, config.head_dim
    f = config.intermediate_dim
    per_layer = m * h * d + 2 * m * k * d + h * d * m + 3 * m * f
    return config.num_layers * per_layer + m * config.vocabulary_size


def flops_per_token(config: LlamaConfig, context: float) -> FlopCount:
    """FLOPs of one generated token attending to `context` tokens (see the module docstring)."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    weights = weights_per_token(config)
    attention = 4.0 * config.num_layers * config.num_query_heads * config.head_dim * context
    return FlopCount(weights, 2 * weights, attention, context)


def prompt_flops(config: LlamaConfig, prompt_lengths: Sequence[int]) -> float:
    """FLOPs of prefilling these prompts: every layer's products per token and causal attention (see above)."""
    body = weights_per_token(config) - config.hidden_dim * config.vocabulary_size
    attention = 4.0 * config.num_layers * config.num_query_heads * config.head_dim
    return sum(2.0 * body * n + attention * n * (n + 1) / 2 for n in prompt_lengths)


def mean_context(prompt_lengths: Sequence[int], generated_counts: Sequence[int]) -> float:
    """Mean tokens attended to per generated token: the k-th token (k = 0..g-1) of a prompt of n sees n + k."""
    if len(prompt_lengths) != len(generated_counts):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths but {len(generated_counts)} generated counts")
    tokens = sum(generated_counts)
    if tokens == 0:
        return 0.0
    attended = sum(g * n + g * (g - 1) / 2 for n, g in zip(prompt_lengths, generated_counts))
    return attended / tokens


@dataclasses.dataclass(frozen=True)
class MatmulRate:
    """Measured float32 matrix-product rates (FLOP/s) at the model's shapes, for `rows` rows at once."""

    rows: int
    flops_per_second: float  # the model's whole mix: median of the repeats, what the floor uses
    best_flops_per_second: float
    repeats: int
    shapes: dict[str, float]  # single products, e.g. "[64,576]x[576,1536]" -> FLOP/s (median)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _time(fn: Callable[[], Any], min_repeats: int, min_seconds: float) -> list[float]:
    """Seconds per call of `fn` (already compiled), repeated until both minimums are met."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure_matmul_rate(
    config: LlamaConfig, rows: int, *, min_repeats: int = 5, min_seconds: float = 2.0, seed: int = 0
) -> MatmulRate:
    """Times one decode step's weight products for the whole model at `rows` rows, in float32 (see above)."""
    import jax
    import jax.numpy as jnp

    l, m, f, v = config.num_layers, config.hidden_dim, config.intermediate_dim, config.vocabulary_size
    q, kv = config.num_query_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> jax.Array:
        # Scaled so activations stay O(1) through the layers: inf or denormals would time something else.
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-2]))

    # One dict of arrays per layer, the layers unrolled, as the engine's decode step runs them: a `lax.scan` over
    # stacked weights makes XLA copy each layer's slices before its products, which timed the copies too (the
    # rate read ~1/3 low, and engines beat their "floor").
    layers = [
        {"query": weights(m, q), "key": weights(m, kv), "value": weights(m, kv), "output": weights(q, m),
         "gate": weights(m, f), "up": weights(m, f), "down": weights(f, m)}
        for _ in range(l)
    ]
    head = weights(m, v)
    x = jnp.asarray(rng.standard_normal((rows, m), dtype=np.float32))

    @jax.jit
    def step(x: jax.Array, layers: list[dict[str, jax.Array]], head: jax.Array) -> jax.Array:
        h = x
        for w in layers:
            query, key, value = h @ w["query"], h @ w["key"], h @ w["value"]
            a = query @ w["output"]
            d = (a @ w["gate"] + a @ w["up"]) @ w["down"]
            # Keep key and value live (else XLA drops their products) and the scale bounded; both elementwise.
            d = d * jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + 1e-6)
            h = d + 1e-3 * (key.mean(-1, keepdims=True) + value.mean(-1, keepdims=True))
        return h @ head

    mix_flops = 2.0 * rows * weights_per_token(config)
    run = lambda: step(x, layers, head).block_until_ready()  # noqa: E731
    run()  # compile
    times = _time(run, min_repeats, min_seconds)

    shapes: dict[str, float] = {}
    for n, w in ((f, layers[0]["gate"]), (v, head)):
        single = jax.jit(lambda x, w: x @ w)
        call = lambda: single(x, w).block_until_ready()  # noqa: E731
        call()
        single_times = _time(call, min_repeats, min_seconds / 4)
        shapes[f"[{rows},{m}]x[{m},{n}]"] = 2.0 * rows * m * n / statistics.median(single_times)

    return MatmulRate(
        rows=rows,
        flops_per_second=mix_flops / statistics.median(times),
        best_flops_per_second=mix_flops / min(times),
        repeats=len(times),
        shapes=shapes,
    )
