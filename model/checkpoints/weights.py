"""Putting a checkpoint's tensors into a `LlamaBackbone`, checked and one tensor at a time.

Every reader (Hugging Face safetensors, GGUF, keras-hub) describes its tensors as `CheckpointTensor`s: where
each one lives, its stored shape, and how to read it. `assign_weights` checks the whole description against the
backbone's config before reading any data (so a wrong checkpoint fails in a second, not after gigabytes), then
reads, converts and assigns tensor by tensor. Per-layer tensors are written into one preallocated [L, ...]
buffer in the variable's dtype, so at any moment the process holds the backbone, at most one stacked weight
and one source tensor: never two copies of the model, which matters for an 8B checkpoint.

Readers store matmul weights in one of two layouts:
- torch layout (`torch_layout=True`): a `torch.nn.Linear` weight [out, in], as Hugging Face safetensors and GGUF
  files hold them. Assignment transposes to [in, out] and splits the axes into the backbone's shape
  (q_proj [H*D, M] -> query [M, H, D]; o_proj [M, H*D] -> attention_output [H, D, M]; lm_head [V, M] -> [M, V]).
- backbone layout (`torch_layout=False`): already the backbone's per-layer shape (keras-hub presets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from model import parallel
from model.backbone import LlamaBackbone
from model.weights import weight_shapes


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """One stored tensor of a checkpoint, read only when it is assigned.

    `shape` is the stored shape, known from the file's header without reading data; `read()` returns the
    array with that shape (any float dtype; a reader may fix row order, e.g. GGUF's Q/K permutation, inside it).
    """

    file: str
    name: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    torch_layout: bool = False

    @classmethod
    def from_array(cls, array: np.ndarray, *, file: str, name: str, torch_layout: bool = False) -> "CheckpointTensor":
        """Wraps an array already in memory."""
        return cls(file=file, name=name, shape=tuple(array.shape), read=lambda: array, torch_layout=torch_layout)


# The backbone paths as a checkpoint supplies them: each "layers/..." path takes one tensor per layer.
TensorsByPath = Mapping[str, "CheckpointTensor | Sequence[CheckpointTensor]"]


def stored_shape(target: tuple[int, ...], torch_layout: bool, path: str) -> tuple[int, ...]:
    """The shape a tensor must have in the file to become one backbone entry (one layer's slice) of `target`."""
    if not torch_layout or len(target) == 1:
        return target
    # Backbone kernels are [in axes..., out axes...]; torch stores [out, in] with each side flattened.
    input_axes = 2 if path == "layers/attention_output" else 1  # [H, D] feed the output projection
    return (math.prod(target[input_axes:]), math.prod(target[:input_axes]))


def to_backbone_layout(array: np.ndarray, target: tuple[int, ...], torch_layout: bool) -> np.ndarray:
    """A stored tensor rearranged into the backbone's shape `target` (a view where numpy allows)."""
    if torch_layout and array.ndim == 2 and len(target) > 1:
        array = array.T
    return array.reshape(target)


def assign_weights(backbone: LlamaBackbone, tensors: TensorsByPath, *, checkpoint: str) -> None:
    """Checks `tensors` against the backbone's config, then reads and assigns them one at a time.

    `tensors` maps each backbone weight path (`model.backbone.weight_shapes`) to a `CheckpointTensor`, or for
    "layers/..." paths to a sequence of one tensor per layer. Raises ValueError, naming `checkpoint`, the file
    and the tensor, when a weight is missing or extra, a layer count is off, or a shape differs from the config.
    """
    if backbone.quantization:
        raise ValueError(
            f"cannot load {checkpoint} into a backbone already quantized ({backbone.quantization}); "
            "load the weights first, then quantize"
        )
    plan = _check(backbone, tensors, checkpoint)
    for path, (target, parts) in plan.items():
        variable = backbone.weight(path)
        dtype = np.dtype(jnp.dtype(variable.dtype))
        if path.startswith("layers/"):
            stacked = np.empty(target, dtype)
            per_layer = target[1:]
            for layer, tensor in enumerate(parts):
                stacked[layer] = to_backbone_layout(_read(tensor), per_layer, tensor.torch_layout)
            parallel.assign(variable, stacked)  # each device receives only its shard
            del stacked
        else:
            (tensor,) = parts
            array = to_backbone_layout(_read(tensor), target, tensor.torch_layout).astype(dtype, copy=False)
            parallel.assign(variable, array)


def _check(
    backbone: LlamaBackbone, tensors: TensorsByPath, checkpoint: str
) -> dict[str, tuple[tuple[int, ...], list[CheckpointTensor]]]:
    """Every path present and nothing extra, one tensor per layer, every stored shape as the config implies."""
    config = backbone.config
    expected = weight_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if extra:
            problems.append(f"not in this architecture {extra}")
        tied = "tied" if config.tie_word_embeddings else "untied"
        raise ValueError(f"{checkpoint}: weights do not match the config ({tied} LM head): {'; '.join(problems)}")
    plan: dict[str, tuple[tuple[int, ...], list[CheckpointTensor]]] = {}
    for path, target in expected.items():
        given = tensors[path]
        if path.startswith("layers/"):
            parts = list(given) if not isinstance(given, CheckpointTensor) else [given]
            if len(parts) != config.num_layers:
                raise ValueError(
                    f"{checkpoint}: {len(parts)} tensors for {path}, but the config has {config.num_layers} layers"
                )
            slice_shape = target[1:]
        else:
            if not isinstance(given, CheckpointTensor):
                raise TypeError(f"{checkpoint}: {path} takes one CheckpointTensor, got {type(given).__name__}")
            parts = [given]
            slice_shape = target
        for tensor in parts:
            want = stored_shape(slice_shape, tensor.torch_layout, path)
            if tuple(tensor.shape) != want:
                raise ValueError(
                    f"{tensor.file}: tensor {tensor.name!r} has shape {tuple(tensor.shape)}, but the config "
                    f"expects {want} for {path} (checkpoint {checkpoint})"
                )
        plan[path] = (target, parts)
    return plan


def _read(tensor: CheckpointTensor) -> np.ndarray:
    array = tensor.read()
    if tuple(array.shape) != tuple(tensor.shape):  # the header promised one shape and the data gave another
        raise ValueError(
            f"{tensor.file}: tensor {tensor.name!r} read with shape {tuple(array.shape)}, "
            f"but its header says {tuple(tensor.shape)}"
        )
    return array
