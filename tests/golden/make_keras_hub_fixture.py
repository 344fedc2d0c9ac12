"""Makes the tiny keras-hub preset fixtures and their golden outputs with keras-hub itself, then checks that
keras-hub loads what batchgen's writer saves.

Rerun from the repository root (needs /opt/goldenv with keras-hub 0.32; writes only under tests/fixtures/):

    /opt/goldenv/bin/python tests/golden/make_keras_hub_fixture.py

What it writes:
- tests/fixtures/keras_hub_llama2_tiny/: `LlamaCausalLM.save_to_preset` of a random 2-layer `LlamaBackbone`
  (hidden 64, 4 query / 2 KV heads, untied LM head, RMSNorm epsilon 1e-5) with a `LlamaTokenizer` on a
  SentencePiece model trained here on a small corpus; one model.weights.h5.
- tests/fixtures/keras_hub_llama3_tiny/: the same for a `Llama3Backbone` with a tied LM head, Llama 3.1 rope
  scaling and rope_max_wavelength 500000, with a `Llama3Tokenizer` on a byte-level BPE (vocabulary.json +
  merges.txt) trained here; weights sharded (model.weights.json + model_0000N.weights.h5). keras-hub 0.32
  leaves `tie_word_embeddings` out of config.json, so keras-hub cannot load this preset back itself; batchgen
  reads the tie from the weights file.
- tests/fixtures/keras_hub_llama2_int8_tiny/: the Llama 2 backbone after keras-hub's `quantize("int8")`,
  saved with `Backbone.save_to_preset` (int8 kernels with per-channel `kernel_scale`).
- golden.json in each: the token ids fed in, keras-hub's hidden states and logits for them, keras-hub's
  tokenizer ids for a few texts (without the start token), and, after the second step, what keras-hub
  computed from the preset that batchgen's `save_keras_hub_preset` wrote (`batchgen_preset_in_keras_hub`).

The second step runs batchgen's loader and writer in the project venv (/work/main/.venv, same keras and jax
versions), in a subprocess: load each fixture, save it again with `save_keras_hub_preset` to a temporary
directory, and record batchgen's logits; then keras-hub's `LlamaCausalLM.from_preset` (or
`Backbone.from_preset` for int8) loads that directory here and its outputs are compared with the originals.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Llamas eat grass in the high mountains of Peru.",
    "Numbers like 12345, 2024 and 3.14159 appear in the text.",
    "Unicode: café, naïve, Zürich, 東京, and an emoji 🦙 or two 🎉.",
    "Tabs\tand  double  spaces,\nnew lines\n\nand paragraphs.",
    "She said: 'it's the model's turn', and they'll see what we've done.",
    "A batch job runs prompts through a language model and writes the completions back.",
]
TEXTS = [
    "The quick brown llama.",
    "Hello  world!\n\nNumbers: 12345 and 7.",
    "café 東京 🦙 naïve",
    "  leading spaces and trailing  ",
]
LLAMA3_TEXTS = TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"]
# The Llama 3 pre-tokenizer pattern (as in Meta's tiktoken setup and keras-hub's BytePairTokenizer).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

ARCH = dict(num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)


def sentencepiece_proto() -> bytes:
    """A Llama-2-style SentencePiece BPE model (byte fallback, digits split, identity normalization)."""
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buffer,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def byte_level_bpe() -> tuple[dict[str, int], list[str]]:
    """A Llama-3-style byte-level BPE: 256 byte symbols, learned merges, the special tokens last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=315, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocabulary = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    for token in LLAMA3_SPECIAL:
        vocabulary[token] = len(vocabulary)
    return vocabulary, merges


def randomize(backbone: keras.Model, seed: int) -> None:
    """Replaces keras-hub's initial weights (norm scales are all ones) so that every weight matters."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("scale"):
            values = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            values = 0.2 * rng.standard_normal(shape)
        variable.assign(values.astype("float32"))


def dequantized_backbone(quantized: keras.Model, like: keras.Model) -> keras.Model:
    """A float copy of `like` holding the weights that keras-hub's int8 `quantized` stores (int8 / scale)."""
    dequantized = keras_hub.models.LlamaBackbone.from_config(like.get_config())
    stored = {variable.path: np.asarray(variable) for variable in quantized.weights}
    for variable in dequantized.weights:
        path = variable.path
        if path.endswith("/embeddings"):
            values = stored[path] / stored[path + "_scale"][:, None]  # one scale per token row
        elif path.endswith("/reverse_embeddings"):
            values = stored[path] / stored[path + "_scale"]
        elif path.endswith("/kernel"):
            scale = stored[path + "_scale"]
            values = stored[path] / scale.reshape(scale.shape[scale.ndim - stored[path].ndim :])
        else:
            values = stored[path]
        variable.assign(values.astype("float32"))
    return dequantized


def model_inputs(vocabulary_size: int, seed: int) -> dict[str, np.ndarray]:
    """Two rows of 10 tokens; the second is right-padded (its last 3 positions masked)."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocabulary_size, (2, 10)).astype("int32")
    padding_mask = np.ones((2, 10), "int32")
    padding_mask[1, 7:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def tokenizer_ids(tokenizer: keras.layers.Layer, texts: list[str]) -> list[list[int]]:
    return [np.asarray(tokenizer(text)).astype(int).tolist() for text in texts]


def write_golden(directory: pathlib.Path, golden: dict) -> None:
    (directory / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


def float_list(array: np.ndarray) -> list:
    return np.asarray(array, np.float32).tolist()


def make_llama2() -> dict:
    directory = FIXTURES / "keras_hub_llama2_tiny"
    tokenizer = keras_hub.models.LlamaTokenizer(proto=sentencepiece_proto())
    vocabulary_size = tokenizer.vocabulary_size()
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size, layer_norm_epsilon=1e-5, dtype="float32", **ARCH
    )
    randomize(backbone, seed=1)
    preprocessor = keras_hub.models.LlamaCausalLMPreprocessor(tokenizer, sequence_length=32)
    causal_lm = keras_hub.models.LlamaCausalLM(backbone, preprocessor)
    shutil.rmtree(directory, ignore_errors=True)
    causal_lm.save_to_preset(str(directory))
    inputs = model_inputs(vocabulary_size, seed=2)
    golden = {
        "keras_hub_version": keras_hub.__version__,
        "inputs": {key: value.tolist() for key, value in inputs.items()},
        "hidden_states": float_list(backbone(inputs)),
        "logits": float_list(causal_lm(inputs)),
        "texts": TEXTS,
        "tokenizer_ids": tokenizer_ids(tokenizer, TEXTS),
        "start_token_id": int(tokenizer.start_token_id),
        "end_token_id": int(tokenizer.end_token_id),
        "sequence_length": 32,
    }
    write_golden(directory, golden)

    # The same backbone quantized by keras-hub: int8 kernels and embeddings with per-channel scales.
    int8_directory = FIXTURES / "keras_hub_llama2_int8_tiny"
    quantized = keras_hub.models.LlamaBackbone.from_config(backbone.get_config())
    quantized.set_weights(backbone.get_weights())
    quantized.quantize("int8")
    shutil.rmtree(int8_directory, ignore_errors=True)
    quantized.save_to_preset(str(int8_directory))
    int8_golden = {
        "keras_hub_version": keras_hub.__version__,
        "inputs": golden["inputs"],
        # keras-hub's int8 layers also quantize activations, which batchgen does not: loosely comparable only.
        "int8_hidden_states": float_list(quantized(inputs)),
        # The exact reference for a loader that dequantizes: keras-hub's float model on int8 / scale.
        "dequantized_hidden_states": float_list(dequantized_backbone(quantized, backbone)(inputs)),
    }
    write_golden(int8_directory, int8_golden)
    return golden


def make_llama3() -> dict:
    directory = FIXTURES / "keras_hub_llama3_tiny"
    vocabulary, merges = byte_level_bpe()
    tokenizer = keras_hub.models.Llama3Tokenizer(
        vocabulary=vocabulary, merges=merges, misc_special_tokens={"<|start_header_id|>", "<|end_header_id|>"}
    )
    vocabulary_size = tokenizer.vocabulary_size()
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=vocabulary_size,
        tie_word_embeddings=True,
        rope_max_wavelength=500000,
        rope_frequency_adjustment_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        # Short enough that the tiny model's 8 rotary frequencies fall in all three bands of the scaling.
        rope_pretraining_sequence_length=32,
        layer_norm_epsilon=1e-5,
        dtype="float32",
        **ARCH,
    )
    randomize(backbone, seed=3)
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(tokenizer, sequence_length=48)
    causal_lm = keras_hub.models.Llama3CausalLM(backbone, preprocessor)
    shutil.rmtree(directory, ignore_errors=True)
    # A max shard size of 0.2 MB splits the ~0.4 MB of weights into shard files, as big presets are split.
    causal_lm.save_to_preset(str(directory), max_shard_size=0.0002)
    inputs = model_inputs(vocabulary_size, seed=4)
    golden = {
        "keras_hub_version": keras_hub.__version__,
        "inputs": {key: value.tolist() for key, value in inputs.items()},
        "hidden_states": float_list(backbone(inputs)),
        "logits": float_list(causal_lm(inputs)),
        "texts": LLAMA3_TEXTS,
        "tokenizer_ids": tokenizer_ids(tokenizer, LLAMA3_TEXTS),
        "start_token_id": int(tokenizer.start_token_id),
        "end_token_id": int(tokenizer.end_token_id),
        "sequence_length": 48,
    }
    write_golden(directory, golden)
    return golden


# Runs in the project venv: batchgen loads a fixture and saves it again with its own writer.
RESAVE = """
import sys, fsspec
from model.checkpoints.keras_hub import load_keras_hub_preset, save_keras_hub_preset
fixture, out, max_shard_size = sys.argv[1], sys.argv[2], float(sys.argv[3])
loaded = load_keras_hub_preset(fsspec.filesystem("file"), fixture)
save_keras_hub_preset(loaded.backbone, loaded.tokenizer, out, sequence_length=loaded.sequence_length,
                      max_shard_size=max_shard_size)
"""


def resaved_by_batchgen(name: str, scratch: pathlib.Path, max_shard_size: float = 10.0) -> pathlib.Path:
    out = scratch / name
    subprocess.run(
        [str(PROJECT_PYTHON), "-c", RESAVE, str(FIXTURES / name), str(out), str(max_shard_size)],
        cwd=REPO,
        check=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    return out


def check_in_keras_hub(name: str, preset: pathlib.Path) -> dict:
    """keras-hub loads batchgen's preset; how far its outputs are from keras-hub's on the original model."""
    golden = json.loads((FIXTURES / name / "golden.json").read_text())
    inputs = {key: np.asarray(value, "int32") for key, value in golden["inputs"].items()}
    if "logits" not in golden:  # int8: backbone only
        # keras-hub 0.32's from_preset replaces the saved dtype policy with its `dtype` argument (None), so it
        # builds float layers and cannot load any int8 preset, its own included; this is its loader minus that.
        backbone = keras.saving.deserialize_keras_object(json.loads((preset / "config.json").read_text()))
        backbone.load_weights(str(preset / "model.weights.h5"))
        diff = np.abs(np.asarray(backbone(inputs)) - np.asarray(golden["int8_hidden_states"])).max()
        return {
            "loaded_as": type(backbone).__name__,
            "loaded_with": "keras deserialize_keras_object(config.json) + load_weights",
            "quantization_mode": backbone.token_embedding.quantization_mode,
            "max_abs_diff_int8_hidden_states": float(diff),
        }
    causal_lm = keras_hub.models.LlamaCausalLM.from_preset(str(preset))
    logits_diff = np.abs(np.asarray(causal_lm(inputs)) - np.asarray(golden["logits"])).max()
    hidden_diff = np.abs(np.asarray(causal_lm.backbone(inputs)) - np.asarray(golden["hidden_states"])).max()
    ids = tokenizer_ids(causal_lm.preprocessor.tokenizer, golden["texts"])
    return {
        "loaded_as": type(causal_lm).__name__,
        "max_abs_diff_logits": float(logits_diff),
        "max_abs_diff_hidden_states": float(hidden_diff),
        "tokenizer_ids_equal": ids == golden["tokenizer_ids"],
        "sequence_length": int(causal_lm.preprocessor.sequence_length),
    }


def main() -> None:
    keras.utils.set_random_seed(0)
    make_llama2()
    make_llama3()
    with tempfile.TemporaryDirectory() as scratch:
        for name, max_shard_size in (
            ("keras_hub_llama2_tiny", 10.0),
            ("keras_hub_llama3_tiny", 0.0002),  # sharded, as keras-hub sharded the original
            ("keras_hub_llama2_int8_tiny", 10.0),
        ):
            preset = resaved_by_batchgen(name, pathlib.Path(scratch), max_shard_size)
            result = check_in_keras_hub(name, preset)
            print(name, result)
            golden_file = FIXTURES / name / "golden.json"
            golden = json.loads(golden_file.read_text())
            golden["batchgen_preset_in_keras_hub"] = result
            write_golden(FIXTURES / name, golden)


if __name__ == "__main__":
    main()
