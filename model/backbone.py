"""LlamaBackbone: the Keras model that owns a Llama decoder's weights.

The weights are Keras variables (so saving, dtype policies, `fit()`, `quantize("int8")` and
`keras.distribution` layouts work); the math is `model.transformer.forward`, a pure function of the
parameter tree that `params()` returns. Per-layer weights are stacked along a leading layer axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from model import parallel, transformer
from model.config import LlamaConfig
from model.weights import QUANTIZED_KERNELS, weight_shapes  # noqa: F401  (re-exported: the backbone's weight names)


def _variable_name(path: str) -> str:
    return path.replace("/", "__")  # Keras forbids '/' in variable names


@keras.saving.register_keras_serializable(package="batchgen")
class LlamaBackbone(keras.Model):
    """A Llama decoder: token embedding, N pre-norm GQA + SwiGLU blocks, final RMSNorm.

    Called on `{"token_ids": [B, T], "padding_mask": [B, T]}` it returns the final hidden states [B, T, M],
    as keras-hub's `LlamaBackbone` does.

    Example:
        >>> backbone = LlamaBackbone(vocabulary_size=64, num_layers=2, num_query_heads=4,
        ...     num_key_value_heads=2, hidden_dim=8, intermediate_dim=16)
        >>> backbone({"token_ids": np.ones((1, 3), "int32"), "padding_mask": np.ones((1, 3), bool)}).shape
        (1, 3, 8)
    """

    def __init__(
        self,
        config: LlamaConfig | None = None,
        *,
        dtype: Any = None,
        name: str | None = None,
        random_init: bool = True,
        **fields: Any,
    ):
        if config is None:
            config = LlamaConfig.from_dict(fields)
        elif fields:
            raise ValueError(f"pass either a LlamaConfig or its fields, not both (got extra {sorted(fields)})")
        super().__init__(dtype=dtype, name=name or "llama_backbone")
        self.config = config
        self.quantization: str | None = None
        self._weights_by_path: dict[str, keras.Variable] = {}
        # Checkpoint readers pass random_init=False: they overwrite every weight, and drawing 135M random
        # numbers first cost the demo model most of its load time.
        random = keras.initializers.RandomNormal(stddev=0.02) if random_init else "zeros"
        with parallel.layout_scope(config):  # in a TensorParallel scope, each weight is created split
            for path, shape in weight_shapes(config).items():
                self._weights_by_path[path] = self.add_weight(
                    shape=shape, name=_variable_name(path), initializer="ones" if path.endswith("norm") else random
                )
        self.built = True

    # Keras-hub style read-only attributes.
    @property
    def vocabulary_size(self) -> int:
        return self.config.vocabulary_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_dim

    @property
    def token_embedding_matrix(self) -> keras.Variable:
        return self._weights_by_path["token_embedding"]

    def weight(self, path: str) -> keras.Variable:
        """The variable at `path` (a `weight_shapes` name, or that name + "_scale" once quantized)."""
        return self._weights_by_path[path]

    def weight_paths(self) -> list[str]:
        return list(self._weights_by_path)

    def params(self) -> transformer.Params:
        """The current variable values as the nested tree `transformer.forward` takes."""
        tree: dict[str, Any] = {"layers": {}}
        for path, variable in self._weights_by_path.items():
            if path.startswith("layers/"):
                tree["layers"][path.split("/", 1)[1]] = variable.value
            else:
                tree[path] = variable.value
        return tree

    def call(self, inputs: dict[str, Any]) -> Any:
        token_ids = keras.ops.convert_to_tensor(inputs["token_ids"], "int32")
        padding_mask = inputs.get("padding_mask")
        padding_mask = (
            keras.ops.ones_like(token_ids, "bool")
            if padding_mask is None
            else keras.ops.cast(keras.ops.convert_to_tensor(padding_mask), "bool")
        )
        b, t = token_ids.shape
        positions = keras.ops.broadcast_to(keras.ops.arange(t, dtype="int32")[None, :], (b, t))
        hidden, _, _ = transformer.forward(
            self.params(), self.config, token_ids, positions, padding_mask, dtype=self.compute_dtype
        )
        return hidden

    def compute_output_spec(self, inputs: dict[str, Any]) -> keras.KerasTensor:
        shape = tuple(inputs["token_ids"].shape) + (self.config.hidden_dim,)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    # ---- quantization -------------------------------------------------------------------------------

    def quantize(self, mode: str | None = None, **kwargs: Any) -> None:
        """Quantizes the matmul kernels and the embedding to int8 (per output channel, symmetric).

        Activations stay in the compute dtype: the kernels are dequantized inside the jitted step, which
        keeps quality close to float while storing a quarter of the float32 bytes.
        """
        if mode != "int8":
            raise ValueError(f"LlamaBackbone supports quantize('int8') only, got mode={mode!r}")
        if self.quantization is not None:
            raise ValueError(f"{self.name} is already quantized ({self.quantization})")
        with parallel.layout_scope(self.config, parallel.devices_of(self)):  # split int8 kernels like the floats
            for path, reduce_axes in QUANTIZED_KERNELS.items():
                if path not in self._weights_by_path:
                    continue
                variable = self._weights_by_path[path]
                values, scale = quantize_int8(np.asarray(variable.value, np.float32), reduce_axes)
                self._replace_with_int8(path, values, scale)
        self.quantization = "int8"

    def _replace_with_int8(self, path: str, values: np.ndarray, scale: np.ndarray) -> None:
        old = self._weights_by_path.pop(path)
        self._untrack_variable(old)
        self._tracker.unlock()
        try:
            self._weights_by_path[path] = self.add_weight(
                shape=values.shape, name=_variable_name(path), dtype="int8", trainable=False, initializer="zeros"
            )
            self._weights_by_path[path + "_scale"] = self.add_weight(
                shape=scale.shape, name=_variable_name(path) + "_scale", dtype="float32", trainable=False,
                initializer="ones",
            )
        finally:
            self._tracker.lock()
        parallel.assign(self._weights_by_path[path], values)
        parallel.assign(self._weights_by_path[path + "_scale"], scale)

    # ---- serialization ------------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = {"name": self.name, "dtype": keras.dtype_policies.serialize(self.dtype_policy)}
        config.update(dataclasses.asdict(self.config))
        if self.quantization:
            config["quantization"] = self.quantization
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LlamaBackbone":
        config = dict(config)
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):
            dtype = keras.dtype_policies.deserialize(dtype)
        name = config.pop("name", None)
        quantization = config.pop("quantization", None)
        backbone = cls(LlamaConfig.from_dict(config), dtype=dtype, name=name)
        if quantization:
            backbone.quantize(quantization)
        return backbone


def quantize_int8(values: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: scale = absmax / 127 over `reduce_axes` (kept as size-1 axes for broadcasting)."""
    absmax = np.max(np.abs(values), axis=reduce_axes, keepdims=True)
    scale = np.where(absmax == 0, 1.0, absmax / 127.0).astype(np.float32)
    return np.clip(np.round(values / scale), -127, 127).astype(np.int8), scale
