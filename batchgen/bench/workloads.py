"""The benchmark's workloads: fixed chat prompts made from templates and a seeded RNG, as token ids.

Three workloads:
- main: chat prompts of mixed lengths (a one-line question up to a few paragraphs of notes to work on), greedy,
  up to `max_new_tokens` each, stopping at the end of the assistant's turn;
- short: short chat prompts (a system line and a one-sentence question, under 64 tokens), greedy, stopping at the
  end of the assistant's turn: decode dominates, as in most chat traffic;
- variable: the same kind of prompts with per-request token budgets drawn log-uniformly from 1..max (most short,
  a few long) and no stop ids, so every output has exactly its budget; slots free up at scattered times, which
  is where continuous batching gains over static batches.

Prompts are built with `random.Random(seed)` (its sequence is stable across Python versions) and tokenized with
the model's chat template, so the same seed gives the same token ids. Every system under test gets these ids, not
the text, so no system's tokenizer changes the work.

Example:
    >>> workload = main_workload(tokenizer, prompts=64, max_new_tokens=64, stop_token_ids=(2,))
    >>> workload.prompt_lengths()[:3]  # doctest: +SKIP
    [41, 187, 66]
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

SUBJECTS = (
    "the ocean", "volcanoes", "honey bees", "the printing press", "black holes", "sourdough bread", "glaciers",
    "the Roman road network", "electric cars", "coral reefs", "the human heart", "jazz music", "solar panels",
    "migrating birds", "the stock market", "chess openings", "rainforests", "the moon landing", "vaccines",
    "compost", "lighthouses", "the Silk Road", "earthquakes", "origami", "tea ceremonies", "public libraries",
    "bicycles", "the water cycle", "desert plants", "recycling plastic", "the Great Wall", "octopuses",
)

SHORT = (
    "What is {s}?",
    "Give me one fun fact about {s}.",
    "Explain {s} in one sentence.",
    "Why do people care about {s}?",
    "Write a haiku about {s}.",
    "Name three words that describe {s}.",
)

MEDIUM = (
    "Write a short poem about {s}. Use simple words and make the last line surprising.",
    "Explain how {s} works to a ten-year-old. Keep it under five sentences and use one comparison to everyday life.",
    "List four common misconceptions about {s} and correct each one briefly.",
    "I am preparing a short talk about {s} for my class. Suggest a title and three points I should cover.",
    "Compare {s} and {t}: give two ways they are alike and two ways they differ.",
    "Write a friendly email inviting my neighbours to a small gathering where we will talk about {s}.",
)

NOTE_SENTENCES = (
    "Our group met on Tuesday to discuss {s} and agreed that the topic deserves more attention.",
    "Several members pointed out that most people know very little about {s}.",
    "One volunteer shared a book about {t} that had a chapter on {s}.",
    "We want to organise a visit to a local museum with an exhibition related to {s}.",
    "The budget for the next quarter is small, so any activity must be cheap or free.",
    "Some members asked whether the talks could be recorded for those who cannot attend.",
    "A teacher offered to explain the basics of {t} at the next meeting.",
    "There was a long debate about whether to focus on history or on recent discoveries.",
    "Attendance has grown from eight people in spring to nearly thirty this autumn.",
    "We still need someone to prepare refreshments and to book the community hall.",
    "A few newcomers said the discussions were too technical for beginners.",
    "The newsletter will be sent out two weeks before each meeting from now on.",
)

LONG_TASKS = (
    "Summarize these meeting notes in three bullet points.",
    "Turn these notes into a short, friendly announcement for our newsletter.",
    "What are the two most important decisions we still need to make? Explain briefly.",
    "Write a to-do list based on these notes, with one owner suggestion per item.",
)

SYSTEM_PROMPTS = (
    "You are a concise assistant. Answer in plain language.",
    "You are a patient teacher who explains things step by step.",
)


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One prompt of a workload: its id, chat messages, token ids and token budget."""

    request_id: str
    messages: tuple[dict[str, str], ...]
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Workload:
    """A fixed list of prompts with their budgets and the stop ids that end a sequence (empty: none)."""

    name: str
    requests: tuple[WorkloadRequest, ...]
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    seed: int

    def prompt_lengths(self) -> list[int]:
        return [len(r.prompt_ids) for r in self.requests]

    def summary(self) -> str:
        lengths = self.prompt_lengths()
        budgets = [r.max_new_tokens for r in self.requests]
        stops = f"stop at {list(self.stop_token_ids)}" if self.stop_token_ids else "no stop ids"
        return (
            f"{self.name}: {len(self.requests)} chat prompts of {min(lengths)}-{max(lengths)} tokens "
            f"(mean {sum(lengths) / len(lengths):.0f}), greedy, {min(budgets)}-{max(budgets)} new tokens, {stops}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        """Writes the workload as JSON, the form the benchmark's subprocesses (ours and the peers) read."""
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> "Workload":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        requests = tuple(
            WorkloadRequest(r["request_id"], tuple(r["messages"]), tuple(r["prompt_ids"]), r["max_new_tokens"])
            for r in data["requests"]
        )
        return cls(data["name"], requests, tuple(data["stop_token_ids"]), data["pad_token_id"], data["seed"])


def chat_prompts(count: int, seed: int) -> list[list[dict[str, str]]]:
    """`count` conversations (an optional system message and one user message) of mixed lengths.

    A third are one-line questions, a third a few sentences of instructions, a third a few paragraphs of notes
    followed by a task; one in five opens with a system message.
    """
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        s, t = rng.sample(SUBJECTS, 2)
        kind = rng.choice(("short", "medium", "long"))
        if kind == "short":
            text = rng.choice(SHORT).format(s=s)
        elif kind == "medium":
            text = rng.choice(MEDIUM).format(s=s, t=t)
        else:
            paragraphs = []
            for _ in range(rng.randint(1, 4)):
                sentences = rng.sample(NOTE_SENTENCES, rng.randint(3, 6))
                paragraphs.append(" ".join(x.format(s=s, t=t) for x in sentences))
            text = "Meeting notes:\n\n" + "\n\n".join(paragraphs) + "\n\n" + rng.choice(LONG_TASKS)
        messages = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        conversations.append(messages)
    return conversations


def _tokenize(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, ...]:
    """The prompt's ids: the chat template when the tokenizer has one, else the user text alone."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return tuple(tokenizer.tokenize_chat(messages))
    return tuple(tokenizer.tokenize("\n\n".join(m["content"] for m in messages)))


def _workload(
    name: str, tokenizer: Any, conversations: list[list[dict[str, str]]], budgets: list[int],
    stop_token_ids: tuple[int, ...], seed: int,
) -> Workload:
    requests = tuple(
        WorkloadRequest(f"{name}-{i:04d}", tuple(messages), _tokenize(tokenizer, messages), budget)
        for i, (messages, budget) in enumerate(zip(conversations, budgets))
    )
    return Workload(name, requests, tuple(int(i) for i in stop_token_ids), int(tokenizer.pad_token_id), seed)


def main_workload(
    tokenizer: Any, *, prompts: int = 64, max_new_tokens: int = 64, stop_token_ids: tuple[int, ...], seed: int = 0
) -> Workload:
    """Chat prompts of mixed lengths, each with the same budget, ending at `stop_token_ids` (end of turn)."""
    if prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"prompts and max_new_tokens must be >= 1, got {prompts}, {max_new_tokens}")
    return _workload("main", tokenizer, chat_prompts(prompts, seed), [max_new_tokens] * prompts, stop_token_ids, seed)


# Short prompts stay under this many tokens: a short prompt's prefill must cost little beside its decode.
SHORT_PROMPT_TOKENS = 64


def short_chat_prompts(count: int, seed: int) -> list[list[dict[str, str]]]:
    """`count` conversations of a system line and a one-sentence question, both picked by `random.Random(seed)`.

    The system line is always given: without one, the demo model's chat template inserts its own default.
    """
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        subject = rng.choice(SUBJECTS)
        conversations.append([
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": rng.choice(SHORT).format(s=subject)},
        ])
    return conversations


def short_workload(
    tokenizer: Any, *, prompts: int = 64, max_new_tokens: int = 64, stop_token_ids: tuple[int, ...], seed: int = 0,
    max_prompt_tokens: int = SHORT_PROMPT_TOKENS,
) -> Workload:
    """Short chat prompts (fewer than `max_prompt_tokens` tokens each), one budget, ending at `stop_token_ids`."""
    if prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"prompts and max_new_tokens must be >= 1, got {prompts}, {max_new_tokens}")
    # Seeded apart from the other workloads so that no two share their sequence of picks.
    workload = _workload(
        "short", tokenizer, short_chat_prompts(prompts, seed + 2), [max_new_tokens] * prompts, stop_token_ids, seed
    )
    for r in workload.requests:
        if len(r.prompt_ids) >= max_prompt_tokens:
            raise ValueError(
                f"short workload: {r.request_id} has {len(r.prompt_ids)} prompt tokens, not under {max_prompt_tokens} "
                f"({r.messages[-1]['content']!r}); this tokenizer cuts the short prompts too finely"
            )
    return workload


def variable_budgets(count: int, max_new_tokens: int, seed: int) -> list[int]:
    """Token budgets drawn log-uniformly from 1..max_new_tokens: many short outputs, a few long ones.

    The first two are pinned to 1 and `max_new_tokens` so that the whole range is always present.
    """
    rng = random.Random(seed)
    budgets = [max(1, min(max_new_tokens, round(math.exp(rng.uniform(0, math.log(max_new_tokens))))))
               for _ in range(count)]
    budgets[: min(2, count)] = [1, max_new_tokens][: min(2, count)]
    return budgets


def variable_workload(tokenizer: Any, *, prompts: int = 128, max_new_tokens: int = 256, seed: int = 0) -> Workload:
    """Chat prompts whose outputs are exactly 1..max_new_tokens long (log-uniform), with no stop ids."""
    if prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"prompts and max_new_tokens must be >= 1, got {prompts}, {max_new_tokens}")
    # A different seed from the main workload's, so the two do not share their prompt sequence.
    conversations = chat_prompts(prompts, seed + 1)
    return _workload(
        "variable", tokenizer, conversations, variable_budgets(prompts, max_new_tokens, seed), (), seed
    )
