"""keras-hub preset directories: batchgen reads keras-hub's presets as keras-hub computes them, and writes them.

The fixtures and keras-hub's outputs come from tests/golden/make_keras_hub_fixture.py (keras-hub 0.32); that
script also checked that keras-hub loads what `save_keras_hub_preset` writes (recorded in each golden.json).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import fsspec
import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from model import transformer
from model.backbone import LlamaBackbone
from model.checkpoints.keras_hub import load_keras_hub_preset, save_keras_hub_preset
from model.checkpoints.loaded_preset import LoadedPreset
from model.config import RopeScaling
from model.tokenizers.byte_pair_tokenizer import BytePairTokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LLAMA2 = FIXTURES / "keras_hub_llama2_tiny"
LLAMA3 = FIXTURES / "keras_hub_llama3_tiny"
INT8 = FIXTURES / "keras_hub_llama2_int8_tiny"
LOCAL = fsspec.filesystem("file")


def golden(directory: pathlib.Path) -> dict:
    return json.loads((directory / "golden.json").read_text())


def load(directory: pathlib.Path | str, **kwargs) -> LoadedPreset:
    return load_keras_hub_preset(LOCAL, str(directory), **kwargs)


def outputs(loaded: LoadedPreset, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states [B, T, M] and float32 logits [B, T, V] for keras-hub style inputs."""
    backbone = loaded.backbone
    token_ids = np.asarray(inputs["token_ids"], np.int32)
    mask = np.asarray(inputs["padding_mask"]).astype(bool)
    positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
    hidden, _, _ = transformer.forward(
        backbone.params(), backbone.config, jnp.asarray(token_ids), jnp.asarray(positions), jnp.asarray(mask)
    )
    return np.asarray(hidden), np.asarray(transformer.logits(backbone.params(), hidden))


@pytest.fixture(scope="module")
def llama2() -> LoadedPreset:
    return load(LLAMA2)


@pytest.fixture(scope="module")
def llama3() -> LoadedPreset:
    return load(LLAMA3)


@pytest.fixture(scope="module")
def llama2_bfloat16() -> LoadedPreset:
    return load(LLAMA2, dtype="bfloat16")


# ---- keras-hub's presets, read by batchgen --------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_outputs_equal_keras_hub(name: str, request: pytest.FixtureRequest) -> None:
    loaded = request.getfixturevalue(name)
    expected = golden(LLAMA2 if name == "llama2" else LLAMA3)
    hidden, logits = outputs(loaded, expected["inputs"])
    np.testing.assert_allclose(hidden, np.asarray(expected["hidden_states"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, np.asarray(expected["logits"]), rtol=1e-5, atol=1e-5)
    # The Keras call path (padding mask included) computes the same hidden states.
    called = np.asarray(loaded.backbone({key: np.asarray(value) for key, value in expected["inputs"].items()}))
    np.testing.assert_allclose(called, np.asarray(expected["hidden_states"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_tokenizer_ids_equal_keras_hub(name: str, request: pytest.FixtureRequest) -> None:
    loaded = request.getfixturevalue(name)
    expected = golden(LLAMA2 if name == "llama2" else LLAMA3)
    assert loaded.tokenizer.start_token_id == expected["start_token_id"]
    assert loaded.tokenizer.end_token_id == expected["end_token_id"]
    for text, ids in zip(expected["texts"], expected["tokenizer_ids"], strict=True):
        # keras-hub's preprocessor puts the start token in front (add_start_token in preprocessor.json).
        assert loaded.tokenizer.tokenize(text) == [expected["start_token_id"], *ids], text


def test_llama2_config_and_preset_fields(llama2: LoadedPreset) -> None:
    config = llama2.backbone.config
    assert (config.vocabulary_size, config.num_layers, config.hidden_dim, config.intermediate_dim) == (400, 2, 64, 128)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.layer_norm_epsilon == 1e-5
    assert not config.tie_word_embeddings and config.rope_scaling is None
    assert llama2.sequence_length == 32
    assert llama2.stop_token_ids == (2,)  # </s>
    assert llama2.backbone.dtype_policy.name == "float32"


def test_llama3_config_tie_read_from_weights_and_rope_scaling(llama3: LoadedPreset) -> None:
    # keras-hub 0.32 leaves tie_word_embeddings out of config.json; the weights file has no reverse embedding.
    assert "tie_word_embeddings" not in json.loads((LLAMA3 / "config.json").read_text())["config"]
    config = llama3.backbone.config
    assert config.tie_word_embeddings
    assert "lm_head" not in llama3.backbone.weight_paths()
    assert config.rope_max_wavelength == 500000
    assert config.rope_scaling == RopeScaling(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    )
    assert llama3.sequence_length == 48
    vocabulary = json.loads((LLAMA3 / "assets" / "tokenizer" / "vocabulary.json").read_text())
    assert llama3.stop_token_ids == (vocabulary["<|end_of_text|>"], vocabulary["<|eot_id|>"])


def test_int8_preset_loads_quantized_with_keras_hub_weights() -> None:
    loaded = load(INT8)
    assert loaded.backbone.quantization == "int8"
    assert loaded.tokenizer is None and loaded.sequence_length is None
    expected = golden(INT8)
    hidden, _ = outputs(loaded, expected["inputs"])
    # keras-hub's float model on its stored int8 / scale: the reference for a dequantizing loader.
    np.testing.assert_allclose(hidden, np.asarray(expected["dequantized_hidden_states"]), rtol=1e-5, atol=1e-5)
    # The int8 values themselves are keras-hub's, bit for bit.
    with h5py.File(INT8 / "model.weights.h5") as file:
        stored = file["layers/llama_transformer_decoder_1/_self_attention_layer/_query_dense/vars/0"][()]
    np.testing.assert_array_equal(np.asarray(loaded.backbone.weight("layers/query").value)[1], stored)


def test_load_weights_false_keeps_architecture_and_tokenizer() -> None:
    loaded = load(LLAMA2, load_weights=False)
    reference = golden(LLAMA2)
    assert loaded.backbone.config.num_layers == 2 and loaded.tokenizer is not None
    _, logits = outputs(loaded, reference["inputs"])
    assert np.abs(logits - np.asarray(reference["logits"])).max() > 1e-2  # fresh weights, not the preset's


def test_dtype_argument_overrides_saved_dtype(llama2_bfloat16: LoadedPreset) -> None:
    assert llama2_bfloat16.backbone.weight("layers/query").dtype == "bfloat16"
    assert llama2_bfloat16.backbone.compute_dtype == "bfloat16"


def test_loads_from_memory_filesystem(llama3: LoadedPreset) -> None:
    memory = fsspec.filesystem("memory")
    for file in LLAMA3.rglob("*"):
        if file.is_file():
            memory.pipe_file(f"/presets/llama3/{file.relative_to(LLAMA3).as_posix()}", file.read_bytes())
    loaded = load_keras_hub_preset(memory, "/presets/llama3")
    assert loaded.source == "memory:///presets/llama3"
    expected = golden(LLAMA3)
    np.testing.assert_array_equal(outputs(loaded, expected["inputs"])[1], outputs(llama3, expected["inputs"])[1])
    assert loaded.tokenizer.tokenize(expected["texts"][-1]) == llama3.tokenizer.tokenize(expected["texts"][-1])


# ---- batchgen's writer ----------------------------------------------------------------------------------


def assert_same_weights(a: LlamaBackbone, b: LlamaBackbone) -> None:
    assert a.weight_paths() == b.weight_paths()
    for path in a.weight_paths():
        left, right = np.asarray(a.weight(path).value), np.asarray(b.weight(path).value)
        assert left.dtype == right.dtype, path
        np.testing.assert_array_equal(left, right, err_msg=path)


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_save_then_load_is_exact(name: str, request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> None:
    loaded = request.getfixturevalue(name)
    # A tiny shard limit makes the Llama 3 preset sharded, as keras-hub sharded the fixture.
    save_keras_hub_preset(
        loaded.backbone, loaded.tokenizer, tmp_path, sequence_length=loaded.sequence_length,
        max_shard_size=0.0002 if name == "llama3" else 10.0,
    )
    assert (tmp_path / ("model.weights.json" if name == "llama3" else "model.weights.h5")).exists()
    again = load(tmp_path)
    assert again.backbone.config == loaded.backbone.config
    assert_same_weights(again.backbone, loaded.backbone)
    assert again.sequence_length == loaded.sequence_length
    assert again.stop_token_ids == loaded.stop_token_ids
    texts = golden(LLAMA2 if name == "llama2" else LLAMA3)["texts"]
    assert again.tokenizer(texts) == loaded.tokenizer(texts)


def test_int8_save_then_load_keeps_int8_values(tmp_path: pathlib.Path) -> None:
    loaded = load(INT8)
    save_keras_hub_preset(loaded.backbone, None, tmp_path)
    again = load(tmp_path)
    assert again.backbone.quantization == "int8"
    for path in loaded.backbone.weight_paths():
        left, right = np.asarray(again.backbone.weight(path).value), np.asarray(loaded.backbone.weight(path).value)
        if left.dtype == np.int8:
            np.testing.assert_array_equal(left, right, err_msg=path)
        else:  # scales pass through keras' reciprocal convention and back
            np.testing.assert_allclose(left, right, rtol=1e-6, err_msg=path)


def test_bfloat16_round_trip(llama2_bfloat16: LoadedPreset, tmp_path: pathlib.Path) -> None:
    save_keras_hub_preset(llama2_bfloat16.backbone, llama2_bfloat16.tokenizer, tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as file:
        assert file["layers/reversible_embedding/vars/0"].attrs["dtype"] == "bfloat16"  # as Keras marks it
    again = load(tmp_path)
    assert again.backbone.dtype_policy.name == "bfloat16"
    assert_same_weights(again.backbone, llama2_bfloat16.backbone)


def test_context_length_round_trips_through_metadata(llama2: LoadedPreset, tmp_path: pathlib.Path) -> None:
    # keras-hub configs have no context length; batchgen keeps it in metadata.json. Same shapes as llama2, so
    # building this backbone reuses the compiled initializers.
    config = dataclasses.replace(llama2.backbone.config, max_sequence_length=640)
    save_keras_hub_preset(LlamaBackbone(config), None, tmp_path)
    assert load(tmp_path).backbone.config == config


def test_save_to_memory_url_and_load_back(llama2: LoadedPreset) -> None:
    save_keras_hub_preset(llama2.backbone, llama2.tokenizer, "memory://saved/llama2", sequence_length=32)
    memory = fsspec.filesystem("memory")
    assert memory.isfile("/saved/llama2/assets/tokenizer/vocabulary.spm")
    again = load_keras_hub_preset(memory, "/saved/llama2")
    assert_same_weights(again.backbone, llama2.backbone)


def test_bpe_split_and_chat_template_kept_in_metadata(llama3: LoadedPreset, tmp_path: pathlib.Path) -> None:
    # keras-hub's assets record neither the split a BPE vocabulary was trained with nor a chat template.
    assets = LLAMA3 / "assets" / "tokenizer"
    tokenizer = BytePairTokenizer.from_vocabulary_and_merges(
        json.loads((assets / "vocabulary.json").read_text()),
        (assets / "merges.txt").read_text().split("\n"),
        pre_tokenizer="smollm",  # digits one by one, where Llama 3 groups three
        start_token="<|begin_of_text|>",
        end_token="<|end_of_text|>",
        add_start_token=True,
        chat_template="{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}",
    )
    with pytest.warns(UserWarning, match="pre-tokenizer 'smollm'"):
        save_keras_hub_preset(llama3.backbone, tokenizer, tmp_path)
    again = load(tmp_path).tokenizer
    text = "Numbers: 12345 and 7."
    assert again.tokenize(text) == tokenizer.tokenize(text) != llama3.tokenizer.tokenize(text)
    assert again.chat_template.source == tokenizer.chat_template.source


def h5_layout(directory: pathlib.Path) -> dict[str, tuple]:
    """Every group and dataset of a preset's weights, over all shard files: path -> (shape, dtype, attrs)."""
    files = sorted(directory.glob("*.weights.h5"))
    layout: dict[str, tuple] = {}
    for path in files:
        with h5py.File(path) as file:

            def visit(name: str, item: h5py.Group | h5py.Dataset) -> None:
                attrs = {k: str(v) for k, v in item.attrs.items()}
                # The helper layers' Keras names count instances in the process (dropout_4, ...): not format.
                if attrs.get("name", "").startswith(("dropout", "llama_rotary_embedding")):
                    attrs["name"] = attrs["name"].rstrip("_0123456789")
                entry = (tuple(item.shape), str(item.dtype), attrs) if isinstance(item, h5py.Dataset) else attrs
                layout.setdefault(name, entry)

            file.visititems(visit)
    return layout


def json_without(path: pathlib.Path, *drop: str) -> dict:
    value = json.loads(path.read_text())

    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return sorted(clean(v) for v in node) if all(isinstance(v, str) for v in node) else [clean(v) for v in node]
        return node

    return clean(value)


@pytest.mark.parametrize(
    "name, directory, max_shard_size",
    [("llama2", LLAMA2, 10.0), ("llama3", LLAMA3, 0.0002), ("int8", INT8, 10.0)],
)
def test_writer_produces_keras_hub_layout(
    name: str, directory: pathlib.Path, max_shard_size: float, request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> None:
    loaded = load(INT8) if name == "int8" else request.getfixturevalue(name)
    save_keras_hub_preset(
        loaded.backbone, loaded.tokenizer, tmp_path, sequence_length=loaded.sequence_length,
        max_shard_size=max_shard_size,
    )
    assert h5_layout(tmp_path) == h5_layout(directory)
    if name == "llama3":  # same shard files, and each group in the same one, as keras-hub's sharding
        assert json.loads((tmp_path / "model.weights.json").read_text()) == json.loads(
            (directory / "model.weights.json").read_text()
        )
    # JSON files equal keras-hub's, but for the tie_word_embeddings batchgen adds (keras-hub 0.32 drops it).
    ours_config = json.loads((tmp_path / "config.json").read_text())
    assert ours_config["config"]["tie_word_embeddings"] == loaded.backbone.config.tie_word_embeddings
    dtype_keys = ("default_policy", "source_name") if name == "int8" else ()  # keras-hub writes null for these
    for file in ("config.json", "tokenizer.json", "preprocessor.json", "task.json"):
        if (directory / file).exists() or (tmp_path / file).exists():
            assert json_without(tmp_path / file, "tie_word_embeddings", *dtype_keys) == json_without(
                directory / file, *dtype_keys
            ), file
    def assets(root: pathlib.Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.parent.name == "tokenizer")

    assert assets(tmp_path) == assets(directory)


# ---- errors -----------------------------------------------------------------------------------------------


def copy_fixture(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def edit_config(directory: pathlib.Path, edit) -> None:
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))


def test_missing_weights_file_is_named(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    (directory / "model.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.weights\.h5"):
        load(directory)


def test_missing_weights_shard_is_named(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA3, tmp_path)
    (directory / "model_00001.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_00001\.weights\.h5"):
        load(directory)


def test_non_llama_backbone_class_is_refused(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    edit_config(directory, lambda c: c.update(class_name="GemmaBackbone", registered_name="keras_hub>GemmaBackbone"))
    with pytest.raises(ValueError, match=r"config\.json.*keras_hub>GemmaBackbone.*not a Llama backbone"):
        load(directory)


def test_weight_with_wrong_shape_is_named(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    key = "layers/llama_transformer_decoder_1/_feedforward_gate_dense/vars/0"
    with h5py.File(directory / "model.weights.h5", "a") as file:
        del file[key]
        file[key] = np.zeros((64, 96), np.float32)
    expected = r"model\.weights\.h5.*_feedforward_gate_dense/vars/0.*\(64, 96\).*\(64, 128\)"
    with pytest.raises(ValueError, match=expected):
        load(directory)


def test_unknown_architecture_key_is_named(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    edit_config(directory, lambda c: c["config"].update(sliding_window=256))
    with pytest.raises(ValueError, match=r"config\.json.*'sliding_window'"):
        load(directory)


def test_position_scaling_factor_is_refused(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    edit_config(directory, lambda c: c["config"].update(rope_position_scaling_factor=2.0))
    with pytest.raises(ValueError, match="rope_position_scaling_factor=2.0"):
        load(directory)


def test_tie_flag_contradicting_weights_is_refused(tmp_path: pathlib.Path) -> None:
    directory = copy_fixture(LLAMA2, tmp_path)
    edit_config(directory, lambda c: c["config"].update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tie_word_embeddings=True.*separate LM head"):
        load(directory)


def test_linear_rope_scaling_cannot_be_saved(llama2: LoadedPreset, tmp_path: pathlib.Path) -> None:
    config = dataclasses.replace(llama2.backbone.config, rope_scaling=RopeScaling(kind="linear", factor=2.0))
    with pytest.raises(ValueError, match="linear rope scaling"):
        save_keras_hub_preset(LlamaBackbone(config), None, tmp_path)
