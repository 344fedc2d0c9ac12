"""BytePairTokenizer on a tiny Llama-3-style vocabulary: transformers' ids (golden), and its three constructions."""

from __future__ import annotations

import json
import pathlib

import fsspec
import pytest

from model.tokenizers import BytePairTokenizer, tokenizer_from_gguf_metadata, tokenizer_from_huggingface

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tokenizers" / "tiny_llama3"
GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "tokenizer_tiny_llama3.json").read_text())
TEXTS = [case["text"] for case in GOLDEN["cases"]]
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


@pytest.fixture(scope="module")
def tokenizer() -> BytePairTokenizer:
    return BytePairTokenizer.from_huggingface(FIXTURE)


def gguf_metadata_of(tokenizer: BytePairTokenizer) -> dict:
    """The tokenizer.* metadata llama.cpp's converter would write for the tiny Llama 3 tokenizer."""
    saved = json.loads(tokenizer.to_tokenizer_json())
    vocabulary = dict(saved["model"]["vocab"])
    for added in saved["added_tokens"]:
        vocabulary[added["content"]] = added["id"]
    tokens = sorted(vocabulary, key=vocabulary.__getitem__)
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if token in SPECIAL_TOKENS else 1 for token in tokens],
        "tokenizer.ggml.merges": [" ".join(merge) for merge in saved["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": vocabulary["<|begin_of_text|>"],
        "tokenizer.ggml.eos_token_id": vocabulary["<|eot_id|>"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": tokenizer.chat_template.source,
    }


def test_reads_special_tokens_start_token_and_template(tokenizer: BytePairTokenizer) -> None:
    assert tokenizer.id_to_token(tokenizer.start_token_id) == GOLDEN["bos_token"] == "<|begin_of_text|>"
    assert tokenizer.id_to_token(tokenizer.end_token_id) == GOLDEN["eos_token"] == "<|eot_id|>"
    # add_bos_token is not in the config: it comes from tokenizer.json's post-processor, as in Llama 3.
    assert tokenizer.add_start_token is True
    assert sorted(tokenizer.special_tokens) == sorted(SPECIAL_TOKENS)
    assert tokenizer.stop_token_ids == (tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|eom_id|>"))
    assert tokenizer.pre_tokenizer_name == "llama-bpe"
    assert tokenizer.chat_template is not None


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda case: repr(case["text"][:24]))
def test_ids_and_decodes_equal_transformers(tokenizer: BytePairTokenizer, case: dict) -> None:
    assert tokenizer.tokenize(case["text"]) == case["ids"]
    assert tokenizer.detokenize(case["ids"]) == case["decoded"]
    assert tokenizer.detokenize(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


def test_special_tokens_are_never_split(tokenizer: BytePairTokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert tokenizer.tokenize(f"a{token}b")[1:] == [
            *tokenizer.tokenize("a")[1:], tokenizer.token_to_id(token), *tokenizer.tokenize("b")[1:]
        ]
    assert tokenizer.token_to_id("<|eot_id|>") not in tokenizer.tokenize("<|eot_id")


def test_chat_template_renders_and_tokenizes_like_transformers(tokenizer: BytePairTokenizer) -> None:
    for chat in GOLDEN["chats"]:
        text = tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert text == chat["text"]
        ids = tokenizer.tokenize_chat(chat["messages"], chat["add_generation_prompt"])
        assert ids == chat["ids"]
        assert ids.count(tokenizer.start_token_id) == 1


def test_keras_hub_vocabulary_and_merges_give_the_same_ids(tokenizer: BytePairTokenizer) -> None:
    keras_hub = FIXTURE / "keras_hub"
    from_assets = BytePairTokenizer.from_vocabulary_and_merges(
        keras_hub / "vocabulary.json",
        keras_hub / "merges.txt",
        pre_tokenizer="llama-bpe",
        start_token="<|begin_of_text|>",
        end_token="<|eot_id|>",
        add_start_token=True,
    )
    # Special tokens were inferred: exactly the entries no merge produces.
    assert sorted(from_assets.special_tokens) == sorted(SPECIAL_TOKENS)
    assert from_assets(TEXTS) == tokenizer(TEXTS) == [case["ids"] for case in GOLDEN["cases"]]


def test_gguf_metadata_gives_the_same_ids(tokenizer: BytePairTokenizer) -> None:
    from_gguf = tokenizer_from_gguf_metadata(gguf_metadata_of(tokenizer))
    assert isinstance(from_gguf, BytePairTokenizer)
    assert from_gguf(TEXTS) == [case["ids"] for case in GOLDEN["cases"]]
    assert from_gguf.stop_token_ids == tokenizer.stop_token_ids
    chat = GOLDEN["chats"][0]
    assert from_gguf.tokenize_chat(chat["messages"]) == chat["ids"]


def test_gguf_add_bos_defaults_as_llama_cpp_does(tokenizer: BytePairTokenizer) -> None:
    metadata = gguf_metadata_of(tokenizer)
    del metadata["tokenizer.ggml.add_bos_token"]
    assert BytePairTokenizer.from_gguf_metadata(metadata).add_start_token is True  # llama-bpe
    metadata["tokenizer.ggml.add_bos_token"] = False
    assert BytePairTokenizer.from_gguf_metadata(metadata).tokenize("Hi") == tokenizer.tokenize("Hi")[1:]


def test_gguf_control_tokens_outside_the_byte_alphabet_are_respelled_not_special(
    tokenizer: BytePairTokenizer,
) -> None:
    metadata = gguf_metadata_of(tokenizer)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    index = tokens.index("<|reserved_special_token_2|>")
    tokens[index] = "<|Ωnused|>"  # "Ω" is not a byte-alphabet symbol: llama.cpp mislabels such tokens
    metadata["tokenizer.ggml.tokens"] = tokens
    from_gguf = BytePairTokenizer.from_gguf_metadata(metadata)
    assert "<|Ωnused|>" not in from_gguf.special_tokens and len(from_gguf.special_tokens) == len(SPECIAL_TOKENS) - 1
    assert from_gguf.id_to_token(index) == "<|Î©nused|>"  # its UTF-8 bytes, spelled in the byte alphabet
    assert from_gguf(TEXTS[:5]) == tokenizer(TEXTS[:5])


def test_save_round_trips_through_tokenizer_json(tokenizer: BytePairTokenizer, tmp_path: pathlib.Path) -> None:
    for built in (tokenizer, tokenizer_from_gguf_metadata(gguf_metadata_of(tokenizer))):
        built.save(tmp_path)
        reloaded = tokenizer_from_huggingface(tmp_path)
        assert isinstance(reloaded, BytePairTokenizer)
        assert reloaded(TEXTS) == tokenizer(TEXTS)
        assert (reloaded.start_token_id, reloaded.end_token_id, reloaded.add_start_token) == (
            tokenizer.start_token_id, tokenizer.end_token_id, True
        )
        assert reloaded.chat_template == tokenizer.chat_template
        assert reloaded.pre_tokenizer_name == "llama-bpe"


def test_reads_fsspec_urls_and_json_text(tokenizer: BytePairTokenizer) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with fsspec.open(f"memory://bpe/{name}", "wb") as file:
            file.write((FIXTURE / name).read_bytes())
    assert BytePairTokenizer.from_huggingface("memory://bpe")(TEXTS) == tokenizer(TEXTS)
    # tokenizer.json alone: the start token still comes from the post-processor; the end token is unknown, so
    # generation stops on the end-of-turn tokens only.
    alone = BytePairTokenizer.from_tokenizer_json((FIXTURE / "tokenizer.json").read_text())
    assert alone.tokenize("Hi") == tokenizer.tokenize("Hi")
    assert alone.end_token_id is None
    assert alone.stop_token_ids == (tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|eom_id|>"))


def test_bad_input_is_named(tokenizer: BytePairTokenizer, tmp_path: pathlib.Path) -> None:
    metadata = gguf_metadata_of(tokenizer)
    with pytest.raises(ValueError, match="'t5'"):
        tokenizer_from_gguf_metadata({**metadata, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match="'llama'"):
        BytePairTokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        BytePairTokenizer.from_gguf_metadata({k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="'qwen9'"):
        BytePairTokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "qwen9"})
    with pytest.raises(ValueError, match="bos_token_id = 99999"):
        BytePairTokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.bos_token_id": 99999})
    with pytest.raises(ValueError, match="entry 1"):
        BytePairTokenizer.from_vocabulary_and_merges({"a": 0, "b": 1, "ab": 2}, ["a b", "a b c"])
    with pytest.raises(ValueError, match="merge 0"):
        BytePairTokenizer.from_vocabulary_and_merges({"a": 0, "b": 1}, ["a b"])
    with pytest.raises(ValueError, match="without gaps"):
        BytePairTokenizer.from_vocabulary_and_merges({"a": 0, "b": 2}, [])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        BytePairTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BytePairTokenizer.from_tokenizer_json(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(ValueError, match="99999"):
        tokenizer.detokenize([1, 99999])
    with pytest.raises(KeyError, match="no-such-token"):
        tokenizer.token_to_id("no-such-token")
    with pytest.raises(FileNotFoundError, match="neither"):
        tokenizer_from_huggingface(tmp_path / "empty")


def test_pickles_for_ray_workers(tokenizer: BytePairTokenizer) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy(TEXTS) == tokenizer(TEXTS)
    assert (copy.stop_token_ids, copy.special_tokens) == (tokenizer.stop_token_ids, tokenizer.special_tokens)
    chat = GOLDEN["chats"][0]
    assert copy.apply_chat_template(chat["messages"]) == chat["text"]
