"""Tensor parallelism: the layout rules, and split models on 2, 4 and 8 forced host devices against one device.

The split runs happen in subprocesses (tests/parallel_worker.py) because jax fixes its number of host devices
when it starts; each prints a JSON report that the tests below check.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import subprocess
import sys
from typing import Any

import jax
import pytest
from jax.sharding import PartitionSpec

from model import parallel
from model.backbone import LlamaBackbone
from model.config import LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "parallel_worker.py"

# Which tiny configs each device count runs (two each, to keep every subprocess well under a minute), chosen so
# that every layout case appears: all split N ways, KV heads fewer than devices (kv x group mesh), attention
# replicated (the demo model's 9 / 3 heads), vocabulary replicated, tied embedding.
CONFIGS_BY_DEVICES = {
    2: ("h8_k4", "h9_k3_demo_heads"),
    4: ("h8_k2_tied", "h9_k3_demo_heads"),
    8: ("h8_k4", "h8_k2_tied"),
}
ALL_SPLIT = ("kv", "group")

LLAMA3_8B = LlamaConfig(vocabulary_size=128256, num_layers=32, num_query_heads=32, num_key_value_heads=8,
                        hidden_dim=4096, intermediate_dim=14336)
SMOLLM2_135M = LlamaConfig(vocabulary_size=49152, num_layers=30, num_query_heads=9, num_key_value_heads=3,
                           hidden_dim=576, intermediate_dim=1536, tie_word_embeddings=True)


@functools.lru_cache(maxsize=None)
def worker_report(num_devices: int, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(WORKER), str(num_devices), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    if result.returncode != 0 or not lines:
        raise AssertionError(f"{WORKER.name} {num_devices} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("REPORT "))


def configs_report(num_devices: int) -> dict[str, Any]:
    return worker_report(num_devices, "configs", ",".join(CONFIGS_BY_DEVICES[num_devices]))["configs"]


def ways(spec: list[Any], mesh: list[int]) -> int:
    """How many pieces a weight with this spec is cut into on a (kv, group) mesh."""
    sizes = {"kv": mesh[0], "group": mesh[1]}
    names = [n for axis in spec if axis is not None for n in (axis if isinstance(axis, list) else [axis])]
    return math.prod(sizes[n] for n in names)


# ---- the layout rules (no devices needed) ------------------------------------------------------------------


def test_llama3_8b_on_8_devices_splits_everything_but_the_norms():
    table = parallel.layout_table(LLAMA3_8B, 8)
    assert parallel.mesh_shape(LLAMA3_8B, 8) == (8, 1)
    assert table["layers/query"] == PartitionSpec(None, None, ALL_SPLIT, None)
    assert table["layers/key"] == table["layers/value"] == PartitionSpec(None, None, "kv", None)
    assert table["layers/attention_output"] == PartitionSpec(None, ALL_SPLIT, None, None)
    assert table["layers/gate"] == table["layers/up"] == PartitionSpec(None, None, ALL_SPLIT)
    assert table["layers/down"] == PartitionSpec(None, ALL_SPLIT, None)
    assert table["token_embedding"] == PartitionSpec(ALL_SPLIT, None)
    assert table["lm_head"] == PartitionSpec(None, ALL_SPLIT)
    for norm in ("final_norm", "layers/attention_norm", "layers/mlp_norm"):
        assert all(axis is None for axis in table[norm])


def test_fewer_kv_heads_than_devices_puts_each_kv_head_on_the_devices_that_read_it():
    # 8 KV heads on 16 devices: K split 8 ways, each head on 2 devices; the 32 query heads split 16 ways.
    assert parallel.mesh_shape(LLAMA3_8B, 16) == (8, 2)
    table = parallel.layout_table(LLAMA3_8B, 16)
    assert table["layers/key"] == PartitionSpec(None, None, "kv", None)
    assert table["layers/query"] == PartitionSpec(None, None, ALL_SPLIT, None)
    # Multi-head attention (G = 1) on twice as many devices as heads: a query head cannot be cut, so queries
    # follow their KV head and are split 8 ways, not 16.
    mha = LlamaConfig(vocabulary_size=256, num_layers=2, num_query_heads=8, num_key_value_heads=8, hidden_dim=64,
                      intermediate_dim=128)
    assert parallel.layout_table(mha, 16)["layers/query"] == PartitionSpec(None, None, "kv", None)


def test_kv_heads_sharing_no_factor_with_the_devices_are_replicated():
    # 3 KV heads on 4 devices, 12 query heads: K/V replicated, queries still split (4 heads per KV head).
    config = LlamaConfig(vocabulary_size=250, num_layers=2, num_query_heads=12, num_key_value_heads=3,
                         hidden_dim=96, intermediate_dim=102)
    table = parallel.layout_table(config, 4)
    assert parallel.mesh_shape(config, 4) == (1, 4)
    assert table["layers/key"] == PartitionSpec(None, None, None, None)
    assert table["layers/query"] == PartitionSpec(None, None, ALL_SPLIT, None)
    # 250 tokens and 102 MLP units do not divide 4 devices: replicated rather than split unevenly.
    assert table["token_embedding"] == PartitionSpec(None, None)
    assert table["layers/gate"] == PartitionSpec(None, None, None)


def test_demo_model_replicates_attention_and_splits_mlp_and_vocabulary():
    for n in (2, 4, 8):
        table = parallel.layout_table(SMOLLM2_135M, n)
        for path in ("layers/query", "layers/key", "layers/value", "layers/attention_output"):
            assert all(axis is None for axis in table[path]), (n, path, table[path])
        assert table["layers/gate"] == PartitionSpec(None, None, ALL_SPLIT)
        assert table["token_embedding"] == PartitionSpec(ALL_SPLIT, None)
        assert "lm_head" not in table  # tied: the embedding table is the head
    assert parallel.layout_table(SMOLLM2_135M, 3)["layers/query"] == PartitionSpec(None, None, ALL_SPLIT, None)


def test_int8_scales_follow_their_kernels_except_on_reduced_axes():
    table = parallel.layout_table(LLAMA3_8B, 8)
    assert table["layers/query_scale"] == table["layers/query"]  # scale [L, 1, H, D]
    assert table["layers/down_scale"] == PartitionSpec(None, None, None)  # scale [L, 1, M]: F reduced
    assert table["layers/attention_output_scale"] == PartitionSpec(None, None, None, None)
    assert table["token_embedding_scale"] == PartitionSpec(ALL_SPLIT, None)  # one scale per token


def test_tensor_parallel_refuses_no_devices_and_repeated_devices():
    with pytest.raises(ValueError, match="at least one device"):
        parallel.TensorParallel([])
    device = jax.devices()[0]
    with pytest.raises(ValueError, match="more than once"):
        parallel.TensorParallel([device, device])


def test_replica_devices_names_what_the_process_sees():
    assert parallel.replica_devices(1) == jax.devices()[:1]
    with pytest.raises(ValueError, match=f"sees {len(jax.devices())}"):
        parallel.replica_devices(len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        parallel.replica_devices(0)


def test_one_device_scope_leaves_a_plain_backbone(tiny_config):
    # One device is the degenerate mesh: keras keeps the arrays as they are, so nothing is split and the engine
    # allocates an ordinary cache.
    with parallel.TensorParallel(jax.devices()[:1]).scope():
        backbone = LlamaBackbone(tiny_config)
    assert parallel.devices_of(backbone) is None and parallel.cache_sharding(backbone) is None
    assert all(p.fraction == 1.0 for p in parallel.placements(backbone))
    table = parallel.describe(backbone)
    assert all(path in table for path in backbone.weight_paths())


# ---- split models on forced host devices --------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_split_logits_and_greedy_outputs_equal_one_device(num_devices):
    for name, report in configs_report(num_devices).items():
        assert report["max_logit_diff"] <= 1e-4, (name, report["max_logit_diff"])
        assert report["greedy_split"] == report["greedy_reference"], name
        assert report["greedy_split_again"] == report["greedy_reference"], name
        assert report["recompiled_on_second_run"] == 0, name  # the cache keeps its layout between calls


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_each_device_holds_its_share_of_the_split_weights(num_devices):
    for name, report in configs_report(num_devices).items():
        mesh = report["mesh"]
        split_bytes = split_device_bytes = 0
        print(f"\n{name} on {num_devices} devices, mesh kv {mesh[0]} x group {mesh[1]}:")
        for weight in report["weights"]:
            pieces = ways(weight["spec"], mesh)
            print(f"  {weight['path']:26} {str(weight['spec']):40} per-device fraction {weight['fraction']:.4f}")
            assert weight["fraction"] == pytest.approx(1 / pieces), (name, weight)
            if pieces == num_devices:
                split_bytes += weight["bytes"]
                split_device_bytes += weight["fraction"] * weight["bytes"]
        total = sum(w["bytes"] for w in report["weights"])
        per_device = sum(w["fraction"] * w["bytes"] for w in report["weights"])
        print(f"  weights split N ways: {split_device_bytes / split_bytes:.4f} of their bytes per device; "
              f"whole model: {per_device / total:.4f}")
        assert split_device_bytes / split_bytes == pytest.approx(1 / num_devices)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_kv_cache_is_split_like_the_key_weights(num_devices):
    for name, report in configs_report(num_devices).items():
        kv = report["mesh"][0]
        assert report["cache_fraction"] == pytest.approx(1 / kv), (name, report["cache_fraction"])
        key = next(w for w in report["weights"] if w["path"] == "layers/key")
        assert ways(key["spec"], report["mesh"]) == kv, name


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_jitted_steps_gather_no_weights(num_devices):
    # Megatron's pattern: all-reduces of activations (two per layer, the embedding lookup, the argmax over the
    # split vocabulary) and nothing that moves weights or the cache.
    for name, report in configs_report(num_devices).items():
        for step, counts in report["collectives"].items():
            moved = {op: n for op, n in counts.items() if op != "all-reduce" and n}
            assert not moved, (name, step, counts)
            assert counts["all-reduce"] >= 1, (name, step, counts)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_loading_sends_each_shard_straight_to_its_devices(num_devices):
    for name, report in configs_report(num_devices).items():
        transfers = report["load_transfers"]
        assert transfers, name
        whole_on_one_device = [t for t in transfers if "SingleDeviceSharding" in t]
        assert not whole_on_one_device, (name, whole_on_one_device[:3])


def test_int8_and_from_preset_on_4_devices():
    report = worker_report(4, "loading")
    assert report["int8"]["max_logit_diff"] <= 1e-4
    fractions = {w["path"]: w["fraction"] for w in report["int8"]["weights"]}
    assert fractions["layers/gate"] == fractions["layers/gate_scale"] == pytest.approx(1 / 4)
    assert fractions["layers/down_scale"] == 1.0
    preset = report["preset"]
    assert preset["split"] == preset["reference"]
    split = {w["path"]: w["fraction"] for w in preset["split_weights"]}
    assert split["layers/query"] == split["lm_head"] == pytest.approx(1 / 4)  # tiny Llama 2: 4 heads, 400 tokens
    assert split["layers/key"] == pytest.approx(1 / 2)  # 2 KV heads on 4 devices
    assert all(w["fraction"] == 1.0 for w in preset["reference_weights"])
