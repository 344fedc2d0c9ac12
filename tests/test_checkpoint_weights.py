"""assign_weights: layouts, stacking, dtype casts, and the checks that run before any data is read."""

from __future__ import annotations

import numpy as np
import pytest

from model.backbone import LlamaBackbone, weight_shapes
from model.checkpoints.weights import CheckpointTensor, assign_weights, stored_shape
from model.config import LlamaConfig

# Tiny: L=2, M=8, H=4, K=2, D=2, F=16, V=32.
CONFIG = LlamaConfig(
    vocabulary_size=32, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=8, intermediate_dim=16
)
M, H, K, D, F, V, L = 8, 4, 2, 2, 16, 32, 2


def torch_checkpoint(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights named and shaped as a Hugging Face Llama stores them (nn.Linear: [out, in])."""
    rng = np.random.default_rng(seed)
    c = config
    q, kv = c.num_query_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"embed": (c.vocabulary_size, c.hidden_dim), "norm": (c.hidden_dim,), "lm_head": (c.vocabulary_size, c.hidden_dim)}
    for i in range(c.num_layers):
        shapes |= {
            f"{i}.attn_norm": (c.hidden_dim,), f"{i}.q": (q, c.hidden_dim), f"{i}.k": (kv, c.hidden_dim),
            f"{i}.v": (kv, c.hidden_dim), f"{i}.o": (c.hidden_dim, q), f"{i}.mlp_norm": (c.hidden_dim,),
            f"{i}.gate": (c.intermediate_dim, c.hidden_dim), f"{i}.up": (c.intermediate_dim, c.hidden_dim),
            f"{i}.down": (c.hidden_dim, c.intermediate_dim),
        }  # fmt: skip
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


_LAYER_KEYS = {
    "layers/attention_norm": ("attn_norm", False),
    "layers/query": ("q", True),
    "layers/key": ("k", True),
    "layers/value": ("v", True),
    "layers/attention_output": ("o", True),
    "layers/mlp_norm": ("mlp_norm", False),
    "layers/gate": ("gate", True),
    "layers/up": ("up", True),
    "layers/down": ("down", True),
}


def as_tensors(stored: dict[str, np.ndarray], config: LlamaConfig, reads: list[str] | None = None) -> dict:
    def tensor(name: str, torch_layout: bool) -> CheckpointTensor:
        array = stored[name]

        def read() -> np.ndarray:
            if reads is not None:
                reads.append(name)
            return array

        return CheckpointTensor("ckpt.safetensors", name, array.shape, read, torch_layout=torch_layout)

    tensors = {"token_embedding": tensor("embed", False), "final_norm": tensor("norm", False)}
    if not config.tie_word_embeddings:
        tensors["lm_head"] = tensor("lm_head", True)
    for path, (key, torch_layout) in _LAYER_KEYS.items():
        tensors[path] = [tensor(f"{i}.{key}", torch_layout) for i in range(config.num_layers)]
    return tensors


def value(backbone: LlamaBackbone, path: str) -> np.ndarray:
    return np.asarray(backbone.weight(path).value, np.float32)


def test_torch_layout_means_the_same_linear_maps():
    """Each kernel computes what the torch nn.Linear computed: y = W x, split into heads where the model splits."""
    stored = torch_checkpoint(CONFIG)
    backbone = LlamaBackbone(CONFIG)
    assign_weights(backbone, as_tensors(stored, CONFIG), checkpoint="ckpt")
    x = np.random.default_rng(1).normal(size=M).astype(np.float32)
    for layer in range(L):
        np.testing.assert_allclose(
            np.einsum("m,mhd->hd", x, value(backbone, "layers/query")[layer]),
            (stored[f"{layer}.q"] @ x).reshape(H, D), rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        np.testing.assert_allclose(
            np.einsum("m,mkd->kd", x, value(backbone, "layers/key")[layer]),
            (stored[f"{layer}.k"] @ x).reshape(K, D), rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        heads_out = np.random.default_rng(layer).normal(size=(H, D)).astype(np.float32)
        np.testing.assert_allclose(
            np.einsum("hd,hdm->m", heads_out, value(backbone, "layers/attention_output")[layer]),
            stored[f"{layer}.o"] @ heads_out.reshape(-1), rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        np.testing.assert_allclose(value(backbone, "layers/gate")[layer], stored[f"{layer}.gate"].T)
        np.testing.assert_allclose(value(backbone, "layers/down")[layer], stored[f"{layer}.down"].T)
        np.testing.assert_array_equal(value(backbone, "layers/mlp_norm")[layer], stored[f"{layer}.mlp_norm"])
    np.testing.assert_array_equal(value(backbone, "token_embedding"), stored["embed"])
    np.testing.assert_array_equal(value(backbone, "lm_head"), stored["lm_head"].T)


def test_backbone_layout_is_taken_as_is_and_cast_to_bfloat16():
    rng = np.random.default_rng(2)
    arrays = {path: rng.normal(size=shape).astype(np.float32) for path, shape in weight_shapes(CONFIG).items()}
    tensors = {}
    for path, array in arrays.items():
        if path.startswith("layers/"):
            tensors[path] = [CheckpointTensor.from_array(a, file="p.h5", name=f"{path}/{i}") for i, a in enumerate(array)]
        else:
            tensors[path] = CheckpointTensor.from_array(array, file="p.h5", name=path)
    backbone = LlamaBackbone(CONFIG, dtype="bfloat16")
    assign_weights(backbone, tensors, checkpoint="p")
    assert str(backbone.weight("layers/query").dtype) == "bfloat16"
    for path, array in arrays.items():
        np.testing.assert_allclose(value(backbone, path), array, rtol=1e-2, atol=1e-2)  # bf16 keeps 8 bits


def test_shape_mismatch_names_file_tensor_and_both_shapes_before_reading_anything():
    stored = torch_checkpoint(CONFIG)
    stored["1.down"] = stored["1.down"][:, :12]  # the last tensor checked is the one that is wrong
    reads: list[str] = []
    backbone = LlamaBackbone(CONFIG)
    before = value(backbone, "token_embedding")
    with pytest.raises(ValueError) as error:
        assign_weights(backbone, as_tensors(stored, CONFIG, reads), checkpoint="ckpt")
    assert str(error.value) == (
        "ckpt.safetensors: tensor '1.down' has shape (8, 12), but the config expects (8, 16) for layers/down "
        "(checkpoint ckpt)"
    )
    assert reads == []
    np.testing.assert_array_equal(value(backbone, "token_embedding"), before)


def test_missing_and_extra_weights_are_listed():
    stored = torch_checkpoint(CONFIG)
    tensors = as_tensors(stored, CONFIG)
    del tensors["layers/up"]
    with pytest.raises(ValueError, match=r"ckpt: weights do not match the config \(untied LM head\): missing \['layers/up'\]"):
        assign_weights(LlamaBackbone(CONFIG), tensors, checkpoint="ckpt")
    tied = LlamaConfig(**{**CONFIG.to_dict(), "tie_word_embeddings": True})
    with pytest.raises(ValueError, match=r"\(tied LM head\): not in this architecture \['lm_head'\]"):
        assign_weights(LlamaBackbone(tied), as_tensors(stored, CONFIG), checkpoint="ckpt")


def test_layer_count_must_match():
    tensors = as_tensors(torch_checkpoint(CONFIG), CONFIG)
    tensors["layers/gate"] = tensors["layers/gate"][:1]
    with pytest.raises(ValueError, match="ckpt: 1 tensors for layers/gate, but the config has 2 layers"):
        assign_weights(LlamaBackbone(CONFIG), tensors, checkpoint="ckpt")


def test_data_that_disagrees_with_its_header_is_refused():
    tensors = as_tensors(torch_checkpoint(CONFIG), CONFIG)
    good = tensors["final_norm"]
    tensors["final_norm"] = CheckpointTensor(good.file, good.name, good.shape, lambda: np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"tensor 'norm' read with shape \(3,\), but its header says \(8,\)"):
        assign_weights(LlamaBackbone(CONFIG), tensors, checkpoint="ckpt")


def test_quantized_backbone_is_refused():
    backbone = LlamaBackbone(CONFIG)
    backbone.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        assign_weights(backbone, as_tensors(torch_checkpoint(CONFIG), CONFIG), checkpoint="ckpt")


@pytest.mark.parametrize(
    "path, target, expected",
    [
        ("layers/query", (M, H, D), (H * D, M)),
        ("layers/attention_output", (H, D, M), (M, H * D)),
        ("layers/down", (F, M), (M, F)),
        ("lm_head", (M, V), (V, M)),
        ("final_norm", (M,), (M,)),
    ],
)
def test_stored_shape_of_torch_layout(path, target, expected):
    assert stored_shape(target, True, path) == expected
    assert stored_shape(target, False, path) == target
