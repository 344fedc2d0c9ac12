"""load_preset dispatch: built-in names, GGUF files and directories, keras-hub and Hugging Face directories, errors."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import fsspec
import gguf
import numpy as np
import pytest

from model.checkpoints.loader import load_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def write_tiny_gguf(path: pathlib.Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 llama GGUF: 2 layers, hidden 8, 4 query / 2 KV heads (head dim 2), MLP 16, vocabulary 32, tied."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(32)
    tensors = {"token_embd.weight": (32, 8), "output_norm.weight": (8,)}
    for i in range(2):
        tensors |= {
            f"blk.{i}.attn_norm.weight": (8,), f"blk.{i}.attn_q.weight": (8, 8), f"blk.{i}.attn_k.weight": (4, 8),
            f"blk.{i}.attn_v.weight": (4, 8), f"blk.{i}.attn_output.weight": (8, 8), f"blk.{i}.ffn_norm.weight": (8,),
            f"blk.{i}.ffn_gate.weight": (16, 8), f"blk.{i}.ffn_up.weight": (16, 8), f"blk.{i}.ffn_down.weight": (8, 16),
        }  # fmt: skip
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in tensors.items()}
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arrays


def test_gguf_file_by_path_and_a_directory_holding_one(tmp_path):
    arrays = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = load_preset(str(tmp_path / "tiny.gguf"))
    assert loaded.source == str(tmp_path / "tiny.gguf") and loaded.backbone.config.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(loaded.backbone.weight("token_embedding").value), arrays["token_embd.weight"])
    in_directory = load_preset(str(tmp_path))
    assert in_directory.source == str(tmp_path / "tiny.gguf")


def test_gguf_at_a_memory_url_is_copied_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    arrays = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    memory = fsspec.filesystem("memory")
    memory.pipe("/loader-test/tiny.gguf", (tmp_path / "tiny.gguf").read_bytes())
    try:
        loaded = load_preset("memory://loader-test/tiny.gguf", dtype="bfloat16")
    finally:
        memory.rm("/loader-test", recursive=True)
    assert loaded.source == "memory:///loader-test/tiny.gguf"
    assert str(loaded.backbone.weight("final_norm").dtype) == "bfloat16"
    np.testing.assert_allclose(
        np.asarray(loaded.backbone.weight("final_norm").value, np.float32), arrays["output_norm.weight"], rtol=1e-2
    )
    assert list((tmp_path / "cache").rglob("tiny.gguf"))


def test_huggingface_directory(tmp_path):
    loaded = load_preset(str(FIXTURES / "hf_llama2_tiny"), load_weights=False)
    assert loaded.backbone.config.vocabulary_size == 400 and loaded.stop_token_ids == (2,)


@pytest.mark.skipif(
    importlib.util.find_spec("model.checkpoints.keras_hub") is None, reason="the keras-hub reader is not here yet"
)
def test_keras_hub_preset_directory_goes_to_the_keras_hub_reader():
    loaded = load_preset(str(FIXTURES / "keras_hub_llama2_tiny"))
    assert loaded.backbone.config.num_layers == 2 and loaded.backbone.config.vocabulary_size == 400


def test_keras_hub_preset_of_another_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"registered_name": "keras_hub>GemmaBackbone", "config": {}}))
    with pytest.raises(ValueError, match="registered_name 'keras_hub>GemmaBackbone' is not a Llama backbone"):
        load_preset(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("kagglehub") is not None, reason="kagglehub is installed here")
def test_builtin_name_goes_to_its_kaggle_handle():
    with pytest.raises(ImportError, match="kaggle://keras/llama2/keras/llama2_7b_en/3 needs the kagglehub package"):
        load_preset("llama2_7b_en")


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"preset '{tmp_path}/absent': {tmp_path}/absent does not exist$"):
        load_preset(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="does not exist; built-in presets: llama2_7b_en, .*smollm2_135m_instruct"):
        load_preset("llama9_70b_en")


def test_directory_of_no_known_format_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"is not a checkpoint batchgen can read: .* it holds \['notes.txt'\]"):
        load_preset(str(tmp_path))


def test_config_of_no_known_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(ValueError, match="neither a keras-hub preset config .* nor a Hugging Face config"):
        load_preset(str(tmp_path))


def test_several_gguf_files_must_be_chosen_from(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf")
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"holds several GGUF files \['a.gguf', 'b.gguf'\]; pass the one to load"):
        load_preset(str(tmp_path))


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="is a file but not a GGUF file"):
        load_preset(str(tmp_path / "model.safetensors"))


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server, reached through the environment as a user's s3:// URLs are (no storage options)."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before this server would point elsewhere
    try:
        yield fsspec.filesystem("s3")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_huggingface_directory_and_gguf_file_on_s3(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "cache"))
    s3_endpoint.mkdir("models")
    s3_endpoint.put(str(FIXTURES / "hf_llama31_tiny"), "models/hf_llama31_tiny", recursive=True)
    arrays = write_tiny_gguf(tmp_path / "tiny.gguf", seed=5)
    s3_endpoint.put(str(tmp_path / "tiny.gguf"), "models/tiny.gguf")

    hf = load_preset("s3://models/hf_llama31_tiny")
    assert hf.source == "s3://models/hf_llama31_tiny" and hf.stop_token_ids == (1, 4)
    reference = json.loads((ROOT / "tests" / "golden" / "logits_hf_llama31_tiny.json").read_text())["prompts"][0]
    assert hf.tokenizer.tokenize(reference["text"]) == reference["token_ids"]
    from model import transformer

    params = hf.backbone.params()
    ids = np.asarray([reference["token_ids"]], np.int32)
    hidden, _, _ = transformer.forward(params, hf.backbone.config, ids, np.arange(ids.shape[1])[None])
    assert np.abs(np.asarray(transformer.logits(params, hidden))[0] - np.asarray(reference["logits"])).max() <= 1e-4

    from_gguf = load_preset("s3://models/tiny.gguf")
    np.testing.assert_array_equal(np.asarray(from_gguf.backbone.weight("final_norm").value), arrays["output_norm.weight"])


def test_llama3_keras_hub_preset_is_read_too():
    loaded = load_preset(str(FIXTURES / "keras_hub_llama3_tiny"))
    assert loaded.backbone.config.tie_word_embeddings
