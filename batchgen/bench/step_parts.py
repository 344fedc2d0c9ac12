"""Where a decode step's time goes, by subtraction: `python -m batchgen.bench.step_parts [--slots 64] ...`.

Wall time, not a profile: XLA's per-op trace (`profile_step.py`) slows the step several-fold and unevenly, so
its shares are hard to trust. Here these programs at full slots run interleaved in one process:
- the engine's decode step (`model.generation.steps.decode`);
- the same step with decode attention replaced by its queries: the pool is still written (by XLA's scatter, where
  the CPU kernel writes its own entries), never read;
- the same step over a bfloat16 KV cache (`cache_dtype = "bfloat16"`): half the bytes for attention to read;
- the step's weight products alone: every layer's projections and the LM head on [slots, M] rows.
Then the weight products at `--slots` rows: float32 in XLA and through the CPU kernel
(`model.kernels.cpu_matmul`, what the engine runs on CPU); int8 weights converted inside each XLA product, and
through the kernel, widened to float32 in its panels and (AVX512-VNNI builds, the engine's int8 there) in quads
against activations rounded per row to 16 bits; and int8 x int8 -> int32 with each row's activations quantized
to 8 bits on the fly (not used by the engine: see the README's notes on int8). Last, the engine's decode step of
the int8 model and of the bfloat16 model (bfloat16 activations and weights, XLA's products with float32
accumulation: the CPU kernels take float32).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable


@contextlib.contextmanager
def _attention_replaced(attention: Callable) -> Any:
    """Decode attention swapped for `attention` while a program is traced inside the block."""
    from model import paged_attention

    real = paged_attention.step_attention

    def replaced(q, new_k, new_v, chunks_k, chunks_v, view, write, kernel):  # the pool still written by XLA
        written_k, written_v = write(chunks_k, chunks_v, new_k, new_v)
        return attention(q, written_k, written_v, view), tuple(written_k), tuple(written_v)

    paged_attention.step_attention = replaced
    try:
        yield
    finally:
        paged_attention.step_attention = real


def _quantized(params: dict, names: tuple[str, ...], config: Any) -> dict:
    """Every layer's `names` kernels as int8 matrices [In, Out] with one float scale per output channel."""
    import jax
    import jax.numpy as jnp

    inputs = {"attention_output": config.num_query_heads * config.head_dim, "down": config.intermediate_dim}

    def quantize(w, rows):
        w = w.reshape(rows, -1)
        scale = jnp.max(jnp.abs(w), axis=0) / 127
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale

    def layer(weights):
        out = {}
        for name in names:
            out[name], out[name + "_scale"] = quantize(weights[name], inputs.get(name, config.hidden_dim))
        return out

    head = params.get("lm_head", params["token_embedding"].T)
    lm_head, lm_head_scale = quantize(head, config.hidden_dim)
    return jax.jit(lambda p: {"layers": [layer(w) for w in p["layers"]], "lm_head": lm_head,
                              "lm_head_scale": lm_head_scale})(params)


def _weight_products(params: dict, config: Any, steps: int, kind: str) -> Callable[[Any], Any]:
    """A jitted call running `steps` times every weight product of a decode step on x [rows, M]: x -> x."""
    import jax
    import jax.numpy as jnp

    from model import transformer
    from model.kernels import panels

    m, f = config.hidden_dim, config.intermediate_dim
    names = ("query", "key", "value", "attention_output", "gate", "up", "down")
    weights = params if kind.startswith("float32") else _quantized(params, names, config)
    if kind.endswith("CPU kernel"):  # as the engine keeps them for the kernel
        weights = panels.for_kernel(weights, config.hidden_dim, quads="quads" in kind)

    def product(x, layer, name, inputs):
        if kind != "int8 x int8 (activations per row)":  # XLA's product, or the kernel
            return transformer.project(x, layer, name, inputs, kernel=kind.endswith("CPU kernel"))
        row_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
        xq = jnp.round(x / jnp.maximum(row_scale, 1e-12)).astype(jnp.int8)
        out = jax.lax.dot_general(xq, layer[name], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return out.astype(jnp.float32) * row_scale * layer[name + "_scale"]

    def run(x, weights):
        def step(x, _):
            for layer in weights["layers"]:
                q, k, v = (product(x, layer, name, m) for name in names[:3])
                x = x + product(q + jnp.tile(k + v, (1, q.shape[1] // k.shape[1])), layer, names[3], q.shape[1])
                x = x + product(jax.nn.silu(product(x, layer, "gate", m)) * product(x, layer, "up", m), layer, "down", f)
            if kind.startswith("float32"):
                head = transformer.logits(weights, x, kernel=kind.endswith("CPU kernel"))
            else:
                head = product(x, weights, "lm_head", m)
            return x + head[:, :m], None

        return jax.lax.scan(step, x, None, length=steps)[0]

    jitted = jax.jit(run)
    return lambda x: jitted(x, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--context", type=int, default=100, help="cached tokens per slot")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per call")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from batchgen.bench.slots import best_step_seconds, decode_weights, full_slots_decode
    from model import LlamaCausalLM, transformer
    from model.generation import steps

    lm = LlamaCausalLM.from_preset(args.preset, dtype="float32")
    config = lm.backbone.config
    params = transformer.unstack_layers(lm.backbone.params())  # XLA's products alone take the weights as stored
    decode_params = decode_weights(lm)  # the engine's: products in the CPU kernel's panels
    b = args.slots

    def decode_call(attention: Callable | None = None, cache_dtype: Any = None):
        decode = None  # the engine's steps.decode
        if attention is not None:
            def decode_replaced(*args, **kwargs):  # the replacement holds whenever jit traces, first call or later
                with _attention_replaced(attention):
                    return steps.decode.__wrapped__(*args, **kwargs)

            decode = jax.jit(decode_replaced, donate_argnames=("cache",),
                             static_argnames=("config", "variant", "steps", "chunks", "max_length", "logprobs_k"))
        call, cache = full_slots_decode(
            lm, decode_params, b, args.context, args.steps, decode=decode, cache_dtype=cache_dtype
        )
        return [call, jax.block_until_ready(call(cache))]  # compiled

    x = jnp.ones((b, config.hidden_dim), jnp.float32)
    programs = {
        "decode step": decode_call(),
        "decode step, attention replaced by its queries": decode_call(lambda q, chunks_k, chunks_v, view: q),
        "decode step, bfloat16 KV cache": decode_call(cache_dtype=jnp.bfloat16),
    }
    from model.kernels import cpu_matmul

    quads = ("int8 weights in quads, CPU kernel",) if cpu_matmul.quads() else ()
    kinds = ("float32", "float32, CPU kernel", "int8 weights", "int8 weights, CPU kernel", *quads,
             "int8 x int8 (activations per row)")
    for kind in kinds:
        call = _weight_products(params, config, args.steps, kind)
        programs[f"weight products alone, {kind}"] = [call, jax.block_until_ready(call(x))]
    lm8 = LlamaCausalLM.from_preset(args.preset, dtype="float32")
    lm8.quantize("int8")
    call, cache = full_slots_decode(lm8, decode_weights(lm8), b, args.context, args.steps)
    programs["decode step, int8 model"] = [call, jax.block_until_ready(call(cache))]
    lm16 = LlamaCausalLM.from_preset(args.preset, dtype="bfloat16")
    call, cache = full_slots_decode(lm16, decode_weights(lm16), b, args.context, args.steps)
    programs["decode step, bfloat16 model"] = [call, jax.block_until_ready(call(cache))]
    best = best_step_seconds(programs, args.rounds, args.steps)
    floor = best["weight products alone, float32"]
    print(f"{b} slots, {args.context} cached tokens each, best of {args.rounds} interleaved calls of {args.steps} steps:")
    print("| program | ms per step | / float32 weight products |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / floor:.2f}x |")


if __name__ == "__main__":
    main()
