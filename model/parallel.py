"""Tensor parallelism: one model's weights and KV cache split across the devices of one worker.

The layout is Megatron's: each block's matmuls are split along the axis that needs no communication until the
block's end, so a decoder layer costs two all-reduces of its [B, T, M] activations (after the attention output
projection and after the MLP down projection); the embedding lookup and the logits over the split vocabulary
add one small reduction each. Weights and the KV cache never move between devices.

    token_embedding [V, M]      split on V         lm_head [M, V]                 split on V
    query [L, M, H, D]          split on H         attention_output [L, H, D, M]  split on H
    key, value [L, M, K, D]     split on K         KV cache [L, B, K, S, D]       split on K, as key / value
    gate, up [L, M, F]          split on F         down [L, F, M]                 split on F
    norms [M], [L, M]           replicated

The N devices form a mesh (batch 1) x (kv a) x (group b), with a = gcd(K, N) and b = N / a; "split N ways" means
over both axes, ("kv", "group"). K/V heads are split over "kv" only: with fewer KV heads than devices (8 on 16,
2 on 4) each KV head lives on the b devices whose query heads read it, so attention stays local (no device
needs another's keys) and the cache is split a ways rather than copied to all N. When K and N share no factor
(the demo model's 3 KV heads on 2, 4 or 8 devices) K/V are replicated. Query heads are split N ways when each
device's share lies within one KV head's group (G % b == 0), else over "kv" only, else replicated (the demo
model's 9 query heads: attention runs whole on every device and only the MLP and vocabulary are split). The
MLP and the vocabulary are split N ways when N divides F / V, else replicated. An int8 kernel's "_scale" is
split like its kernel, except on the axes the scale has reduced to size 1.

The layout is applied with `keras.distribution`: variables created inside a `TensorParallel` scope are created
sharded (large ones initialised directly in shards), and keep their layout on later `assign`s. `assign` sends
each device only its own shard, so loading a checkpoint in the scope never builds the model on one device. The
engine's jitted steps take the sharded weights and cache as arguments and XLA partitions them (GSPMD).

Example:
    >>> lm = LlamaCausalLM.from_preset("smollm2_135m_instruct", devices=jax.devices()[:4])  # doctest: +SKIP
    >>> print(describe(lm.backbone))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import jax
import keras
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from model.config import LlamaConfig
from model.weights import QUANTIZED_KERNELS, weight_shapes

BATCH_AXIS = "batch"  # size 1: one model replica per worker; named so keras' data layout stays well-formed
KV_AXIS = "kv"
GROUP_AXIS = "group"
MODEL_AXES = (KV_AXIS, GROUP_AXIS)  # split over all N devices

# The KV-head axis of every KV cache layout (the dense [L, B, K, S, D] of `model.generation.kv_cache` and the
# engine's paged pool [L, N, K, ., .]): a split cache is split along it, as the key weights' K axis.
CACHE_HEAD_AXIS = 2
_SCALE_SUFFIX = "_scale"  # int8 kernels' scales (see `LlamaBackbone.quantize`)


def mesh_shape(config: LlamaConfig, num_devices: int) -> tuple[int, int]:
    """(a, b): the "kv" and "group" mesh axis sizes for `config` on `num_devices` devices."""
    if num_devices < 1:
        raise ValueError(f"tensor parallelism needs at least one device, got {num_devices}")
    kv = math.gcd(config.num_key_value_heads, num_devices)
    return kv, num_devices // kv


def layout_table(config: LlamaConfig, num_devices: int) -> dict[str, PartitionSpec]:
    """The layout of every weight of `config` (and of each int8 kernel's "_scale") on `num_devices` devices."""
    kv, group = mesh_shape(config, num_devices)
    if config.num_query_groups % group == 0:
        query_heads: Any = MODEL_AXES
    else:
        query_heads = KV_AXIS if kv > 1 else None
    kv_heads = KV_AXIS if kv > 1 else None
    mlp = MODEL_AXES if config.intermediate_dim % num_devices == 0 else None
    vocab = MODEL_AXES if config.vocabulary_size % num_devices == 0 else None
    specs = {
        "token_embedding": (vocab, None),
        "lm_head": (None, vocab),
        "final_norm": (None,),
        "layers/attention_norm": (None, None),
        "layers/query": (None, None, query_heads, None),
        "layers/key": (None, None, kv_heads, None),
        "layers/value": (None, None, kv_heads, None),
        "layers/attention_output": (None, query_heads, None, None),
        "layers/mlp_norm": (None, None),
        "layers/gate": (None, None, mlp),
        "layers/up": (None, None, mlp),
        "layers/down": (None, mlp, None),
    }
    table = {path: PartitionSpec(*specs[path]) for path in weight_shapes(config)}
    for path, reduced in QUANTIZED_KERNELS.items():
        if path in table:
            table[path + _SCALE_SUFFIX] = PartitionSpec(
                *(None if axis in reduced else name for axis, name in enumerate(specs[path]))
            )
    return table


class TensorParallel(keras.distribution.ModelParallel):
    """A keras distribution that splits the Llama weights created in its scope across `devices`.

    Without a config it only carries the devices: a `LlamaBackbone` built in its scope (for instance by a
    checkpoint reader, which learns the config from the file) enters `TensorParallel(devices, config)` for its
    own weights (`layout_scope`). Variables other than the backbone weights of `config` (optimizer state,
    metrics) are replicated.

    Example:
        >>> with TensorParallel(jax.devices()[:2]).scope():  # doctest: +SKIP
        ...     backbone = LlamaBackbone(config)
    """

    def __init__(self, devices: Sequence[jax.Device], config: LlamaConfig | None = None) -> None:
        devices = list(devices)
        if not devices:
            raise ValueError("TensorParallel needs at least one device, got an empty list")
        if len(set(devices)) != len(devices):
            raise ValueError(f"TensorParallel got a device more than once: {devices}")
        kv, group = mesh_shape(config, len(devices)) if config is not None else (len(devices), 1)
        mesh = keras.distribution.DeviceMesh((1, kv, group), (BATCH_AXIS, KV_AXIS, GROUP_AXIS), devices=devices)
        super().__init__(layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name=BATCH_AXIS)
        self.devices = devices
        self.config = config
        self._specs = layout_table(config, len(devices)) if config is not None else {}

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.device_mesh.backend_mesh

    def get_variable_layout(self, variable: keras.Variable) -> Any:
        path = variable.name.replace("__", "/")  # the backbone names its variables by path, '/' -> '__'
        if path not in self._specs or getattr(variable, "_layout", None) is not None:
            return super().get_variable_layout(variable)  # replicated
        return NamedSharding(self.mesh, self._specs[path])


def layout_scope(
    config: LlamaConfig, devices: Sequence[jax.Device] | None = None
) -> contextlib.AbstractContextManager:
    """The scope in which a backbone of `config` creates its weights.

    `TensorParallel(devices, config)` when `devices` are given or a `TensorParallel` scope is active (its devices);
    otherwise nothing, and the weights go to the default device as usual.
    """
    if devices is None:
        active = keras.distribution.distribution()
        if not isinstance(active, TensorParallel):
            return contextlib.nullcontext()
        if active.config == config:
            return contextlib.nullcontext()
        devices = active.devices
    return TensorParallel(devices, config).scope()


def replica_devices(count: int) -> list[jax.Device]:
    """The first `count` devices this process sees (a worker's GPUs, else its host devices), for one model.

    Raises ValueError naming what the process sees when there are fewer: a Ray worker sees only the GPUs it was
    given, and a CPU worker sees one host device unless XLA_FLAGS=--xla_force_host_platform_device_count=N was
    set before jax started.

    Example:
        >>> lm = LlamaCausalLM.from_preset(preset, devices=replica_devices(4))  # doctest: +SKIP
    """
    if count < 1:
        raise ValueError(f"devices per replica must be >= 1, got {count}")
    devices = jax.devices()
    if len(devices) < count:
        raise ValueError(
            f"{count} devices per replica requested, but this process sees {len(devices)}: {devices} "
            "(for host devices set XLA_FLAGS=--xla_force_host_platform_device_count before jax starts)"
        )
    return devices[:count]


def devices_of(backbone: Any) -> list[jax.Device] | None:
    """The devices a backbone's weights are split over, in mesh order; None when they are not split."""
    sharding = backbone.weight("token_embedding").value.sharding
    if not isinstance(sharding, NamedSharding):
        return None
    return list(sharding.mesh.devices.flat)


def assign(variable: keras.Variable, array: np.ndarray) -> None:
    """Assigns a host array to a variable, sending each device only the shard the variable keeps there.

    `variable.assign(array)` would first copy the whole array to the default device and split it from there: for
    a large stacked weight, more than that device may hold next to its own shards.
    """
    variable.assign(jax.device_put(array, variable.value.sharding))


def cache_sharding(backbone: Any) -> NamedSharding | None:
    """The sharding of this backbone's KV cache (dense [L, B, K, S, D] or the engine's paged pool [L, N, K, ., .]):
    K split exactly as the key weights' K axis.

    None for a backbone whose weights are not split (the cache is then a plain array on the default device).
    """
    key = backbone.weight("layers/key").value.sharding
    if not isinstance(key, NamedSharding):
        return None
    spec: list[Any] = [None] * 5
    spec[CACHE_HEAD_AXIS] = (tuple(key.spec) + (None,) * 4)[2]  # key [L, M, K, D]
    return NamedSharding(key.mesh, PartitionSpec(*spec))


@dataclasses.dataclass(frozen=True)
class WeightPlacement:
    """Where one weight lives: its shape, its layout, its bytes and the most bytes any one device holds of it."""

    path: str
    shape: tuple[int, ...]
    spec: tuple[Any, ...]
    total_bytes: int
    max_device_bytes: int

    @property
    def fraction(self) -> float:
        """The share of the weight one device holds: 1 / (ways it is split)."""
        return self.max_device_bytes / self.total_bytes


def placements(backbone: Any) -> list[WeightPlacement]:
    """Each weight's layout and per-device bytes, measured on the buffers the devices hold."""
    out = []
    for path in backbone.weight_paths():
        value = backbone.weight(path).value
        per_device: dict[Any, int] = {}
        for shard in value.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        spec = tuple(value.sharding.spec) if isinstance(value.sharding, NamedSharding) else ()
        spec += (None,) * (value.ndim - len(spec))
        out.append(WeightPlacement(path, tuple(value.shape), spec, int(value.nbytes), max(per_device.values())))
    return out


def describe(backbone: Any) -> str:
    """A table of every weight: shape, layout, and the share of it one device holds."""

    def axis(name: Any) -> str:
        if name is None:
            return "-"
        return "+".join(name) if isinstance(name, tuple) else name

    rows = [f"{'weight':30} {'shape':24} {'layout':36} per device"]
    for p in placements(backbone):
        layout = "(" + ", ".join(axis(a) for a in p.spec) + ")"
        rows.append(f"{p.path:30} {str(p.shape):24} {layout:36} {p.fraction:.3f}")
    return "\n".join(rows)
