"""The logit error of the int8 model against float32: `python -m batchgen.bench.int8_error [--prompts 64]`.

The benchmark's short workload (chat prompts) is generated greedily by the float32 model; then every variant
reads the same sequences (teacher forcing: the prompt and float32's tokens) and its logits at the generated
positions are compared with float32's. Greedy agreement over whole outputs (the benchmark's last column) says how
often a variant's text stays float32's; this says by how much each next-token distribution moves, free of the
divergence that compounds once one token differs.

Variants: float32 through the CPU product kernel (float32 rounding only: a floor for the others); int8 weights
(one scale per output channel) in XLA's product, the weight-only reference; the same weights through the CPU
kernel widened to float32 in its panels (the engine's int8 without AVX512-VNNI); and, on AVX512-VNNI builds, in
quads against activations rounded per row to 16 bits (the engine's int8 there, prefill and decode). Each variant
runs the whole sequence through its own products, as prefill does.
"""

from __future__ import annotations

import argparse


def measure(preset: str = "smollm2_135m_instruct", prompts: int = 64, new_tokens: int = 48, batch: int = 8) -> dict:
    """{"positions": generated positions compared, "variants": {name: {"mean", "max", "top1", "kl"}}}: each
    variant's mean and largest absolute logit error against float32 (XLA's products), the share of positions
    whose top token is float32's, and the mean KL divergence from float32's next-token distribution."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from batchgen.bench.workloads import short_workload
    from model import LlamaCausalLM, transformer
    from model.generation.engine import GenerationEngine
    from model.generation.requests import Request
    from model.kernels import cpu_matmul, panels

    lm = LlamaCausalLM.from_preset(preset, dtype="float32")
    config = lm.backbone.config
    stops = tuple(lm.stop_token_ids)
    workload = short_workload(lm.preprocessor.tokenizer, prompts=prompts, max_new_tokens=new_tokens,
                              stop_token_ids=stops)
    engine = GenerationEngine(lm.backbone, max_slots=64, max_length=160, steps_per_call=8)
    requests = [Request(i, list(r.prompt_ids), new_tokens, stop_token_ids=stops)
                for i, r in enumerate(workload.requests)]
    generated = {c.request_id: c.token_ids for c in engine.generate(requests)}
    sequences = [(list(r.prompt_ids), list(generated[i])) for i, r in enumerate(workload.requests)]

    def stacked(per_layer: dict) -> dict:  # per-layer weights back to stacked [L, ...] (panels too) for `forward`
        return {**per_layer, "layers": jax.tree.map(lambda *ws: jnp.stack(ws), *per_layer["layers"])}

    lm8 = LlamaCausalLM.from_preset(preset, dtype="float32")
    lm8.quantize("int8")
    float_params, int8_params = lm.backbone.params(), lm8.backbone.params()
    variants = {"float32, XLA": (float_params, False)}
    if cpu_matmul.available():
        variants["float32, CPU kernel"] = (float_params, True)
    variants["int8 weights, XLA (weight-only reference)"] = (int8_params, False)
    if cpu_matmul.available():
        unstacked = transformer.unstack_layers(int8_params)
        widened = stacked(panels.for_kernel(unstacked, config.hidden_dim, quads=False))
        variants["int8 weights, CPU kernel, widened"] = (widened, True)
        if cpu_matmul.quads():
            quads = stacked(panels.for_kernel(unstacked, config.hidden_dim, quads=True))
            variants["int8 weights, CPU kernel, quads (16-bit activations)"] = (quads, True)

    forward = jax.jit(lambda p, ids, pos, mask, kernel: transformer.forward(p, config, ids, pos, mask, kernel=kernel)[0],
                      static_argnames="kernel")
    head = jax.jit(transformer.logits, static_argnames="kernel")

    def logits_at_generated(params: dict, kernel: bool, part: list) -> list[np.ndarray]:
        width = max(len(p) + len(g) for p, g in part)
        ids = np.zeros((len(part), width), np.int32)
        mask = np.zeros((len(part), width), bool)
        for row, (prompt, gen) in enumerate(part):
            ids[row, : len(prompt) + len(gen)] = prompt + gen
            mask[row, : len(prompt) + len(gen)] = True
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
        hidden = forward(params, ids, positions, mask, kernel)
        out = []
        for row, (prompt, gen) in enumerate(part):  # the positions that predict each generated token
            at = np.arange(len(prompt) - 1, len(prompt) + len(gen) - 1)
            out.append(np.asarray(head(params, hidden[row, at], kernel)))
        return out

    parts = [sequences[i : i + batch] for i in range(0, len(sequences), batch)]
    results = {name: [x for part in parts for x in logits_at_generated(p, k, part)] for name, (p, k) in variants.items()}
    reference = results["float32, XLA"]

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    rows = {}
    for name, got in results.items():
        errors = np.concatenate([np.abs(g - r).ravel() for g, r in zip(got, reference)])
        top1 = np.concatenate([np.argmax(g, -1) == np.argmax(r, -1) for g, r in zip(got, reference)])
        kl = np.concatenate([
            (np.exp(log_softmax(r)) * (log_softmax(r) - log_softmax(g))).sum(-1) for g, r in zip(got, reference)
        ])
        rows[name] = {"mean": float(errors.mean()), "max": float(errors.max()), "top1": float(top1.mean()),
                      "kl": float(kl.mean())}
    return {"prompts": len(sequences), "positions": sum(len(r) for r in reference), "variants": rows}


def render(result: dict) -> str:
    lines = [
        f"{result['prompts']} short-workload prompts, {result['positions']} generated positions "
        "(float32 greedy, teacher forced)",
        "| variant | mean abs logit error | max abs logit error | top-1 = float32's | mean KL(float32 ‖ variant) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {row['mean']:.3g} | {row['max']:.3g} | {row['top1']:.1%} | {row['kl']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward call")
    args = parser.parse_args()
    print(render(measure(args.preset, args.prompts, args.new_tokens, args.batch)))


if __name__ == "__main__":
    main()
