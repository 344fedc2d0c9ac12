"""Makes the two tiny Hugging Face checkpoints under tests/fixtures/ and transformers' logits for them.

Rerun (offline, a few seconds) with the reference environment, from the repository root:

    /opt/goldenv/bin/python tests/golden/make_hf_fixtures.py

It writes
- tests/fixtures/hf_llama2_tiny/: Llama 2 style: a SentencePiece `tokenizer.model` trained here with
  sentencepiece's own trainer (BPE, byte fallback, as Llama 2's), untied LM head, float32, one
  `model.safetensors`, config.json in the transformers-4 layout (top-level `rope_theta`, and `rope_scaling` with
  the older `type` key: linear, factor 2);
- tests/fixtures/hf_llama31_tiny/: Llama 3.1 style: a byte-level BPE `tokenizer.json` trained here with
  `tokenizers` (vocabulary 384, Llama 3 special tokens, a chat template), tied embeddings, bfloat16 weights in
  sharded safetensors with `model.safetensors.index.json`, config.json in the transformers-5 layout
  (`rope_parameters` with rope_type llama3), generation_config.json with a list of eos ids;
- tests/golden/logits_hf_llama2_tiny.json and tests/golden/logits_hf_llama31_tiny.json: for a few prompts, the
  reference token ids and transformers' logits at every position.

Sizes: 2 layers, hidden 64, 4 query / 2 KV heads (head dim 16), MLP 128. Weights are drawn with a larger spread
than a real initialisation so that logits are O(1) and attention is far from uniform: a loader that swaps two
weights, drops the RoPE scaling or misreads a layout moves the logits by far more than the tests' tolerance.

The golden logits are from transformers loading the saved directory back (so they also prove that transformers
reads the config layout written here). The bfloat16 checkpoint's goldens are computed in float32 on the bf16
weights (`torch_dtype=float32` upcasts them exactly), so a loader that reads bf16 correctly matches to float32
rounding (1e-4); a `logits_bf16` row per prompt holds transformers running in bfloat16 too, which the tests only
compare loosely, because two bfloat16 implementations round intermediate sums differently.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import sentencepiece as spm
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "tests" / "golden"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A batch job reads prompts from a table and writes completions back.
Llamas are domesticated South American camelids; they live in herds and carry loads over the mountains.
In 1969, 3 astronauts flew 384,400 km to the Moon and came back 8 days later.
Numbers like 12345 and 3.14159 are split into digits; runs of    spaces and tabs\tare kept.
Café, naïve, façade, jalapeño, Straße and Ærø are words with accents. 東京 and 北京 are cities.
Emoji: 🙂 🚀 🦙 — and quotes “like this” or ‘this’.
def greet(name):\n    return f"Hello, {name}!"\n
Once upon a time there was a small model that learned to speak. It read every book in the library.
The ocean is deep and wide; waves roll in from far away, and the tide rises twice a day.
Write a short poem about the ocean. Summarise the text below in one sentence. Translate to French: good morning.
"""

PROMPTS_LLAMA2 = [
    "The quick brown fox",
    "Llamas carry loads over the mountains in 1969, 12345 km.",
    "Café naïve 🦙 東京\n  two spaces",
]
PROMPTS_LLAMA31 = [
    "The quick brown fox",
    "Numbers like 3.14159 and 384,400 km; Straße 🚀!",
]
CHAT_LLAMA31 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem 🙂"}]

# A shortened Llama 3.1 template: header tokens around each role, <|eot_id|> after each turn.
LLAMA31_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_config(**overrides) -> transformers.LlamaConfig:
    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with a spread that makes logits O(1); norm scales around 1 but not equal to it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            else:
                parameter.copy_(0.15 * noise)


def golden_logits(directory: pathlib.Path, token_ids: list[list[int]], dtype: torch.dtype) -> list[np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model.eval()
    rows = []
    with torch.no_grad():
        for ids in token_ids:
            out = model(torch.tensor([ids])).logits[0].float().numpy()
            rows.append(out)
    return rows


def rounded(array: np.ndarray) -> list:
    return [[float(f"{v:.7g}") for v in row] for row in np.asarray(array, np.float32)]


def make_llama2() -> None:
    directory = FIXTURES / "hf_llama2_tiny"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # Llama 2's trainer settings: BPE with byte fallback, digits split, whitespace kept as written.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab = processor.get_piece_size()
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": 256,
            },
            indent=2,
        )
    )
    config = tiny_config(
        vocab_size=vocab,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    model = transformers.LlamaForCausalLM(config)
    randomize(model, seed=2)
    model.save_pretrained(directory, safe_serialization=True)
    # Rewrite config.json in the transformers-4 layout: rope_theta and rope_scaling at the top level, with the
    # older "type" spelling; transformers 5 still reads it (the golden logits below come from this file).
    saved = json.loads((directory / "config.json").read_text())
    rope = saved.pop("rope_parameters")
    saved["rope_theta"] = rope["rope_theta"]
    saved["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
    saved["transformers_version"] = "4.46.0"
    (directory / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))

    token_ids = [[processor.bos_id(), *processor.encode(text)] for text in PROMPTS_LLAMA2]
    logits = golden_logits(directory, token_ids, torch.float32)
    write_golden(
        "logits_hf_llama2_tiny.json",
        directory,
        [{"text": t, "token_ids": ids, "logits": rounded(l)} for t, ids, l in zip(PROMPTS_LLAMA2, token_ids, logits)],
        reference="sentencepiece ids with BOS; transformers LlamaForCausalLM float32",
    )


def make_llama31() -> None:
    directory = FIXTURES / "hf_llama31_tiny"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    bpe = tokenizers.Tokenizer(models.BPE())
    # Llama 3's pre-tokenizer: its split regex, then bytes to printable characters without a second regex.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
                behavior="isolated",
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=LLAMA31_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=256
    )
    fast.chat_template = LLAMA31_CHAT_TEMPLATE
    fast.save_pretrained(directory)
    # Keep the chat template inside tokenizer_config.json, where most published checkpoints have it.
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = LLAMA31_CHAT_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (directory / "chat_template.jinja").unlink(missing_ok=True)

    vocab = bpe.get_vocab_size()
    eos_ids = [bpe.token_to_id("<|end_of_text|>"), bpe.token_to_id("<|eot_id|>")]
    config = tiny_config(
        vocab_size=vocab,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos_ids,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small, so that the tiny head dim has frequencies in all three llama3 bands (kept, ramped, slowed).
            "original_max_position_embeddings": 64,
        },
    )
    model = transformers.LlamaForCausalLM(config)
    randomize(model, seed=31)
    model = model.to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos_ids)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists(), "expected sharded weights"

    reloaded = transformers.AutoTokenizer.from_pretrained(directory)
    texts = PROMPTS_LLAMA31 + [reloaded.apply_chat_template(CHAT_LLAMA31, tokenize=False, add_generation_prompt=True)]
    token_ids = [bpe.encode(t).ids for t in PROMPTS_LLAMA31]
    token_ids.append(bpe.encode(texts[-1], add_special_tokens=False).ids)  # the template wrote the BOS itself
    for text, ids in zip(texts, token_ids):
        via_transformers = reloaded(text, add_special_tokens=text not in texts[-1:])["input_ids"]
        assert via_transformers == ids, (text, via_transformers, ids)
    logits32 = golden_logits(directory, token_ids, torch.float32)
    logits16 = golden_logits(directory, token_ids, torch.bfloat16)
    write_golden(
        "logits_hf_llama31_tiny.json",
        directory,
        [
            {"text": t, "token_ids": ids, "logits": rounded(a), "logits_bf16": rounded(b)}
            for t, ids, a, b in zip(texts, token_ids, logits32, logits16)
        ],
        reference=(
            "tokenizers ids (BOS by the post-processor; the chat prompt's BOS by the template); transformers "
            "LlamaForCausalLM on the bf16 weights: 'logits' computed in float32, 'logits_bf16' in bfloat16"
        ),
        chat={"messages": CHAT_LLAMA31, "rendered": texts[-1]},
    )


def write_golden(name: str, directory: pathlib.Path, prompts: list[dict], reference: str, **extra) -> None:
    payload = {
        "made_by": "tests/golden/make_hf_fixtures.py",
        "checkpoint": str(directory.relative_to(ROOT)),
        "reference": reference,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        **extra,
        "prompts": prompts,
    }
    (GOLDEN / name).write_text(json.dumps(payload, ensure_ascii=False) + "\n")


def main() -> None:
    torch.manual_seed(0)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    make_llama2()
    make_llama31()
    for directory in sorted(FIXTURES.glob("hf_*")):
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"{directory.relative_to(ROOT)}: {size / 1024:.0f} KiB, {sorted(p.name for p in directory.iterdir())}")


if __name__ == "__main__":
    main()
