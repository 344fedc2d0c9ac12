"""Runs tiny models split over N forced host devices and compares them with one device; prints a JSON report.

Run by tests/test_parallel.py in a subprocess, because the number of host devices is fixed when jax starts:
    python tests/parallel_worker.py N configs NAME[,NAME...]   # tiny configs from CONFIGS
    python tests/parallel_worker.py N loading                  # int8 after a split load; from_preset(devices=)
For each tiny config the reference is a backbone on one device; the split one is created in a `TensorParallel`
scope and loaded from the reference's arrays through `assign_weights` (the checkpoint readers' path) with every
host-to-device transfer logged. The report holds the logits difference, both greedy continuations, every
weight's and the cache's per-device share, the logged transfers and the collectives in the compiled steps.
"""

from __future__ import annotations

import os
import sys

NUM_DEVICES = int(sys.argv[1])
MODE = sys.argv[2]
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from model import parallel  # noqa: E402
from model.backbone import LlamaBackbone  # noqa: E402
from model.causal_lm import LlamaCausalLM  # noqa: E402
from model.checkpoints.weights import CheckpointTensor, assign_weights  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model import transformer  # noqa: E402
from model.generation import paged_cache, steps  # noqa: E402
from model.generation.engine import GenerationEngine  # noqa: E402
from model.generation.paged_cache import PAGE_SIZE, PagedKVCache, PageTable  # noqa: E402
from model.generation.requests import Request, SamplingParams  # noqa: E402
from model.generation import sampling  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = dict(num_layers=2, hidden_dim=64, intermediate_dim=128, vocabulary_size=256, max_sequence_length=128)
CONFIGS = {
    # 4 KV heads: split N ways on 2 and 4 devices; on 8, each KV head lives on the 2 devices that read it.
    "h8_k4": LlamaConfig(**BASE, num_query_heads=8, num_key_value_heads=4),
    # 2 KV heads, fewer than 4 or 8 devices; tied embedding (the LM head is the split embedding table).
    "h8_k2_tied": LlamaConfig(**{**BASE, "tie_word_embeddings": True}, num_query_heads=8, num_key_value_heads=2),
    # The demo model's heads (9 query, 3 KV) share no factor with 2, 4 or 8: attention is replicated and only the
    # MLP and vocabulary are split; a vocabulary of 250 splits on 2 devices only.
    "h9_k3_demo_heads": LlamaConfig(**{**BASE, "hidden_dim": 72, "vocabulary_size": 250}, num_query_heads=9,
                                    num_key_value_heads=3),
}
GREEDY = SamplingParams(sampler="greedy")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def requests(vocabulary_size: int) -> list[Request]:
    """Six prompts of mixed lengths on four slots, so that finished slots are refilled."""
    rng = np.random.default_rng(1)
    lengths = [5, 11, 3, 17, 8, 2]
    return [
        Request(i, [int(t) for t in rng.integers(0, vocabulary_size, n)], 10, GREEDY, (), (), i)
        for i, n in enumerate(lengths)
    ]


def scored_logits(backbone: LlamaBackbone) -> np.ndarray:
    rng = np.random.default_rng(2)
    token_ids = rng.integers(0, backbone.config.vocabulary_size, (3, 12)).astype(np.int32)
    padding_mask = np.arange(12)[None, :] < np.array([[12], [7], [3]])
    return LlamaCausalLM(backbone).score(token_ids, padding_mask) * padding_mask[..., None]


def load_split(reference: LlamaBackbone, devices: list[jax.Device]) -> tuple[LlamaBackbone, list[str]]:
    """A backbone built in a TensorParallel scope and loaded the way checkpoint readers load."""
    with parallel.TensorParallel(devices).scope():
        backbone = LlamaBackbone(reference.config)
    tensors: dict[str, Any] = {}
    for path in reference.weight_paths():
        array = np.asarray(reference.weight(path).value)
        if path.startswith("layers/"):
            tensors[path] = [CheckpointTensor.from_array(a, file="reference", name=f"{path}.{i}")
                             for i, a in enumerate(array)]
        else:
            tensors[path] = CheckpointTensor.from_array(array, file="reference", name=path)
    transfers = host_transfers(lambda: assign_weights(backbone, tensors, checkpoint="reference"))
    return backbone, transfers


def host_transfers(run: Callable[[], None]) -> list[str]:
    """Runs `run` with every host-to-device transfer logged; returns the logged lines.

    jax logs them from C++ on file descriptor 2, so that descriptor is pointed at a temporary file meanwhile.
    """
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            with jax.transfer_guard_host_to_device("log_explicit"):
                run()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return [line.split("] ", 1)[-1] for line in log.read().decode().splitlines() if "host-to-device" in line]


def collectives(compiled: Any) -> dict[str, int]:
    counts = {name: 0 for name in COLLECTIVES}
    for line in compiled.as_text().splitlines():
        match = re.search(r"= \S+ (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match:
            counts[match.group(1)] += 1
    return counts


def compiled_steps(backbone: LlamaBackbone, slots: int = 4, max_length: int = 64) -> dict[str, dict[str, int]]:
    """Collectives in the engine's prefill and decode programs for this backbone's weights and cache layout."""
    config = backbone.config
    params = backbone.params()
    pages = PageTable(slots * max_length // PAGE_SIZE, PAGE_SIZE, slots, max_length)
    cache = PagedKVCache.allocate(config, pages.pages, PAGE_SIZE, np.float32, parallel.cache_sharding(backbone))
    rows, variant = sampling.row_sampling_params([GREEDY] * slots)
    ints = np.zeros(slots, np.int32)
    seeds = np.zeros(slots, np.uint32)
    tokens = np.zeros((1, 32), np.int32)
    prefill = steps.prefill_tokens.lower(
        params, tokens, tokens, tokens, ints, rows, seeds, config=config, variant=variant
    ).compile()
    decode = steps.decode.lower(
        transformer.unstack_layers(params), cache, pages.table, pages.owner, pages.start, ints, ints, ints, np.ones(slots, bool), ints + 5,
        np.full((slots, 4), -1, np.int32), rows, seeds, config=config, variant=variant, steps=4,
        chunks=len(paged_cache.chunk_sizes(pages.pages)),
        max_length=max_length,
    ).compile()
    return {"prefill": collectives(prefill), "decode": collectives(decode)}


def generate(backbone: LlamaBackbone) -> tuple[list[list[int]], GenerationEngine]:
    engine = GenerationEngine(backbone, None, max_slots=4, max_length=64, steps_per_call=4)
    completions = engine.generate(requests(backbone.config.vocabulary_size))
    return [list(c.token_ids) for c in completions], engine


def shard_fraction(array: jax.Array) -> float:
    per_device: dict[Any, int] = {}
    for shard in array.addressable_shards:
        per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / array.nbytes


def placements(backbone: LlamaBackbone) -> list[dict[str, Any]]:
    return [
        {"path": p.path, "spec": [list(a) if isinstance(a, tuple) else a for a in p.spec], "fraction": p.fraction,
         "bytes": p.total_bytes}
        for p in parallel.placements(backbone)
    ]


def check_config(config: LlamaConfig, devices: list[jax.Device]) -> dict[str, Any]:
    started = time.perf_counter()
    keras.utils.set_random_seed(0)
    reference = LlamaBackbone(config)
    split, transfers = load_split(reference, devices)
    reference_tokens, _ = generate(reference)
    split_tokens, split_engine = generate(split)
    compiles_before = split_engine.stats.programs_compiled
    again = split_engine.generate(requests(config.vocabulary_size))  # same shapes: nothing may recompile
    return {
        "mesh": list(parallel.mesh_shape(config, len(devices))),
        "max_logit_diff": float(np.max(np.abs(scored_logits(reference) - scored_logits(split)))),
        "greedy_reference": reference_tokens,
        "greedy_split": split_tokens,
        "greedy_split_again": [list(c.token_ids) for c in again],
        "recompiled_on_second_run": split_engine.stats.programs_compiled - compiles_before,
        "cache_fraction": shard_fraction(split_engine._cache.k[0][0]),
        "cache_spec": str(split_engine._cache.k[0][0].sharding.spec),
        "load_transfers": transfers,
        "weights": placements(split),
        "collectives": compiled_steps(split),
        "seconds": time.perf_counter() - started,
    }


def check_int8(devices: list[jax.Device]) -> dict[str, Any]:
    """A split model quantized in place after loading: the new int8 kernels and scales are split like the floats."""
    keras.utils.set_random_seed(0)
    reference = LlamaBackbone(CONFIGS["h8_k4"])
    split, _ = load_split(reference, devices)
    reference.quantize("int8")
    split.quantize("int8")
    return {
        "max_logit_diff": float(np.max(np.abs(scored_logits(reference) - scored_logits(split)))),
        "weights": placements(split),
    }


def check_preset(devices: list[jax.Device]) -> dict[str, Any]:
    """`LlamaCausalLM.from_preset(..., devices=...)` on a tiny Hugging Face checkpoint, text in and out."""
    preset = str(ROOT / "tests/fixtures/hf_llama2_tiny")
    report: dict[str, Any] = {}
    for label, devs in (("reference", None), ("split", devices)):
        lm = LlamaCausalLM.from_preset(preset, dtype="float32", devices=devs)
        lm.compile(sampler="greedy")
        report[label] = lm.generate(["the quick brown fox", "hello"], max_length=24, seed=0)
        report[label + "_weights"] = placements(lm.backbone)
    return report


def main() -> None:
    devices = jax.devices()
    assert len(devices) == NUM_DEVICES, (devices, NUM_DEVICES)
    report: dict[str, Any] = {"devices": NUM_DEVICES}
    if MODE == "configs":
        report["configs"] = {name: check_config(CONFIGS[name], devices) for name in sys.argv[3].split(",")}
    elif MODE == "loading":
        report["int8"] = check_int8(devices)
        report["preset"] = check_preset(devices)
    else:
        raise SystemExit(f"mode must be 'configs' or 'loading', got {MODE!r}")
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
