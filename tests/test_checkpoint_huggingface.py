"""Hugging Face directories: both config.json layouts, sharded bf16 safetensors, tokenizers, stop ids, errors.

The fixtures and goldens come from tests/golden/make_hf_fixtures.py (transformers 5, float32 logits).
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import fsspec
import numpy as np
import pytest

from model import transformer
from model.checkpoints.huggingface import llama_config_from_huggingface, load_huggingface_checkpoint
from model.checkpoints.loader import load_preset
from model.config import LlamaConfig, RopeScaling
from model.tokenizers import BytePairTokenizer, LlamaTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "tests" / "golden"
LOCAL = fsspec.filesystem("file")

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
}


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"logits_{name}.json").read_text())


def logits_of(loaded, token_ids: list[int]) -> np.ndarray:
    params = loaded.backbone.params()
    ids = np.asarray([token_ids], np.int32)
    hidden, _, _ = transformer.forward(params, loaded.backbone.config, ids, np.arange(ids.shape[1])[None])
    return np.asarray(transformer.logits(params, hidden))[0]


def max_diff(loaded, name: str, key: str = "logits") -> float:
    return max(float(np.abs(logits_of(loaded, p["token_ids"]) - np.asarray(p[key])).max()) for p in golden(name)["prompts"])


def copy_fixture(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# ---- config.json --------------------------------------------------------------------------------------------


def test_defaults_of_a_minimal_config():
    config = llama_config_from_huggingface(BASE)
    assert config == LlamaConfig(
        vocabulary_size=128, num_layers=3, num_query_heads=8, num_key_value_heads=8, hidden_dim=64,
        intermediate_dim=96, head_dim=8, rope_max_wavelength=10000.0, rope_scaling=None, layer_norm_epsilon=1e-6,
        tie_word_embeddings=False, max_sequence_length=2048,
    )  # fmt: skip


def test_every_field_of_a_transformers_4_config():
    config = llama_config_from_huggingface(
        {
            **BASE,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
        }
    )  # fmt: skip
    assert config == LlamaConfig(
        vocabulary_size=128, num_layers=3, num_query_heads=8, num_key_value_heads=2, hidden_dim=64,
        intermediate_dim=96, head_dim=16, rope_max_wavelength=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, max_sequence_length=131072,
    )  # fmt: skip


def test_transformers_5_rope_parameters():
    config = llama_config_from_huggingface(
        {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}}
    )
    assert config.rope_max_wavelength == 20000.0
    assert config.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    plain = llama_config_from_huggingface({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert (plain.rope_max_wavelength, plain.rope_scaling) == (7.0, None)


def test_older_type_key_and_null_scaling():
    config = llama_config_from_huggingface({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)
    assert llama_config_from_huggingface({**BASE, "rope_scaling": None}).rope_scaling is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architecture MistralForCausalLM is not a Llama causal LM"),
        ({"architectures": [], "model_type": "gpt2"}, "model_type 'gpt2' is not a Llama causal LM"),
        ({"attention_bias": True}, "attention_bias=true, but Llama layers here have no biases"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"intermediate_size": None}, "int\\(\\) argument must be"),
    ],
)
def test_config_errors_name_the_file(change, message):
    with pytest.raises(ValueError, match=f"^/m/config.json: .*{message}"):
        llama_config_from_huggingface({**BASE, **change}, source="/m/config.json")


def test_missing_config_key_is_named():
    config = dict(BASE)
    del config["num_hidden_layers"]
    with pytest.raises(ValueError, match="c.json: missing key 'num_hidden_layers'"):
        llama_config_from_huggingface(config, source="c.json")


# ---- the fixtures against transformers ---------------------------------------------------------------------


def test_llama2_style_float32_untied_sentencepiece():
    loaded = load_huggingface_checkpoint(LOCAL, str(FIXTURES / "hf_llama2_tiny"))
    config = loaded.backbone.config
    assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)  # transformers-4 layout, "type" key
    assert not config.tie_word_embeddings and config.layer_norm_epsilon == 1e-5
    assert max_diff(loaded, "hf_llama2_tiny") <= 1e-4
    assert isinstance(loaded.tokenizer, LlamaTokenizer)
    for prompt in golden("hf_llama2_tiny")["prompts"]:
        assert loaded.tokenizer.tokenize(prompt["text"]) == prompt["token_ids"]
    assert loaded.stop_token_ids == (2,)


def test_llama31_style_bf16_sharded_tied_bpe():
    directory = FIXTURES / "hf_llama31_tiny"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    header = (directory / "model-00001-of-00006.safetensors").read_bytes()[8:2000]
    assert b'"BF16"' in header
    loaded = load_huggingface_checkpoint(LOCAL, str(directory))
    config = loaded.backbone.config
    assert config.tie_word_embeddings and config.rope_scaling.kind == "llama3"
    assert config.rope_scaling.original_max_position_embeddings == 64
    # float32 backbone on bf16 weights: the upcast is exact, so transformers' float32 logits apply at 1e-4.
    assert max_diff(loaded, "hf_llama31_tiny") <= 1e-4
    tokenizer = loaded.tokenizer
    assert isinstance(tokenizer, BytePairTokenizer)
    reference = golden("hf_llama31_tiny")
    for prompt in reference["prompts"][:-1]:
        assert tokenizer.tokenize(prompt["text"]) == prompt["token_ids"]
    assert tokenizer.apply_chat_template(reference["chat"]["messages"]) == reference["chat"]["rendered"]
    # generation_config.json's eos list first (<|end_of_text|>, <|eot_id|>), then the tokenizer's.
    assert loaded.stop_token_ids == (1, 4)
    assert tokenizer.id_to_token(4) == "<|eot_id|>"


def test_llama31_in_bfloat16_is_as_close_to_float32_as_transformers_own_bfloat16():
    """Two bf16 implementations round intermediate sums differently, so compare error sizes, not values."""
    loaded = load_huggingface_checkpoint(LOCAL, str(FIXTURES / "hf_llama31_tiny"), dtype="bfloat16")
    assert str(loaded.backbone.weight("layers/query").dtype) == "bfloat16"
    ours = max_diff(loaded, "hf_llama31_tiny", "logits")
    theirs = max(
        float(np.abs(np.asarray(p["logits_bf16"]) - np.asarray(p["logits"])).max())
        for p in golden("hf_llama31_tiny")["prompts"]
    )
    assert 0 < ours <= 2 * theirs


def test_rope_scaling_is_what_makes_the_llama31_fixture_match(tmp_path):
    """The fixture is sensitive to the llama3 frequency scaling: dropping it moves the logits well past 1e-4."""
    directory = copy_fixture("hf_llama31_tiny", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (directory / "config.json").write_text(json.dumps(config))
    assert max_diff(load_huggingface_checkpoint(LOCAL, str(directory)), "hf_llama31_tiny") > 1e-2


def test_memory_and_file_urls_load_the_same_checkpoint():
    memory = fsspec.filesystem("memory")
    for file in (FIXTURES / "hf_llama31_tiny").iterdir():
        memory.pipe(f"/fixtures/hf_llama31_tiny/{file.name}", file.read_bytes())
    try:
        from_memory = load_preset("memory://fixtures/hf_llama31_tiny")
        assert from_memory.source == "memory:///fixtures/hf_llama31_tiny"
        assert max_diff(from_memory, "hf_llama31_tiny") <= 1e-4
        assert from_memory.tokenizer.tokenize("The quick brown fox") == golden("hf_llama31_tiny")["prompts"][0]["token_ids"]
    finally:
        memory.rm("/fixtures", recursive=True)
    from_file = load_preset((FIXTURES / "hf_llama2_tiny").as_uri())
    assert max_diff(from_file, "hf_llama2_tiny") <= 1e-4


def test_load_weights_false_reads_config_and_tokenizer_but_no_weights(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    (directory / "model.safetensors").unlink()
    loaded = load_huggingface_checkpoint(LOCAL, str(directory), load_weights=False)
    assert loaded.backbone.config.vocabulary_size == 400
    assert loaded.tokenizer is not None


# ---- errors ---------------------------------------------------------------------------------------------------


class _Marker:
    """Unpickling this writes a file: proof that something unpickled the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(ValueError, match="holds only pickled weights \\(pytorch_model.bin\\); batchgen never unpickles"):
        load_huggingface_checkpoint(LOCAL, str(directory))
    assert not marker.exists()


def test_missing_weights_are_named(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="hf_llama2_tiny: no weights \\(model.safetensors"):
        load_huggingface_checkpoint(LOCAL, str(directory))


def test_missing_shard_is_named(tmp_path):
    directory = copy_fixture("hf_llama31_tiny", tmp_path)
    (directory / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shard 'model-00003-of-00006.safetensors', which is not in"):
        load_huggingface_checkpoint(LOCAL, str(directory))


def test_missing_tensor_is_named(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    del header["model.layers.1.mlp.up_proj.weight"]  # its bytes stay, unreferenced
    new_header = json.dumps(header, separators=(",", ":")).encode()
    new_header += b" " * (size - len(new_header))  # same length: the data offsets stay valid
    path.write_bytes(data[:8] + new_header + data[8 + size :])
    with pytest.raises(ValueError, match="tensor 'model.layers.1.mlp.up_proj.weight' is in none of"):
        load_huggingface_checkpoint(LOCAL, str(directory))


def test_shape_mismatch_names_file_tensor_and_shapes(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_huggingface_checkpoint(LOCAL, str(directory))
    message = str(error.value)
    assert "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape (128, 64)" in message
    assert "the config expects (96, 64) for layers/gate" in message


def test_non_llama_architecture_is_named(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: architecture Qwen2ForCausalLM is not a Llama causal LM"):
        load_preset(str(directory))


def test_not_a_safetensors_file(tmp_path):
    directory = copy_fixture("hf_llama2_tiny", tmp_path)
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        load_huggingface_checkpoint(LOCAL, str(directory))
