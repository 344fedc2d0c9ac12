"""The inputs of a byte-level BPE tokenizer as plain values: tokenizer.json text, a vocabulary.json, merges.txt
(from a path, an fsspec URL or data), GPT-2's byte alphabet, and the tokens of a vocabulary no merge produces.

`BytePairTokenizer` (byte_pair_tokenizer.py) builds its `tokenizers` pipeline from these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from model.tokenizers import storage


def byte_to_symbol() -> dict[int, str]:
    """GPT-2's map of each byte to the printable character that stands for it in byte-level vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def json_text(source: str | os.PathLike[str] | Mapping[str, Any], name: str) -> tuple[str, str]:
    """(JSON text, where it came from) for a dict, JSON text, or a path/URL to a JSON file."""
    if isinstance(source, Mapping):
        return json.dumps(source), f"the given {name} dict"
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return source, f"the given {name} text"
    text = storage.read_text(source)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(source)} is not valid JSON: {e}") from e
    return text, os.fspath(source)


def post_processor_start_token(post_processor: Mapping[str, Any] | None) -> str | None:
    """The special token a tokenizer.json post-processor puts before a single text (Llama 3: <|begin_of_text|>)."""
    if not post_processor:
        return None
    if post_processor.get("type") == "Sequence":
        for inner in post_processor.get("processors", []):
            token = post_processor_start_token(inner)
            if token is not None:
                return token
        return None
    if post_processor.get("type") == "TemplateProcessing":
        single = post_processor.get("single") or []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def load_vocabulary(vocabulary: str | os.PathLike[str] | Mapping[str, int]) -> dict[str, int]:
    if isinstance(vocabulary, Mapping):
        vocab = dict(vocabulary)
        where = "the given vocabulary"
    else:
        text, where = json_text(vocabulary, "vocabulary.json")
        vocab = json.loads(text)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{where} must map each token to an integer id")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{where} ids must be 0..{len(ids) - 1} without gaps or repeats")
    return vocab


def load_merges(merges: str | os.PathLike[str] | Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    """Merge pairs from merges.txt (path/URL) or data: "a b" strings or (a, b) pairs; "#version" lines skipped."""
    where = "merges"
    if isinstance(merges, (str, os.PathLike)):
        where = os.fspath(merges)
        merges = storage.read_text(merges).split("\n")
    pairs: list[tuple[str, str]] = []
    for index, merge in enumerate(merges):
        if isinstance(merge, str):
            if merge.startswith("#version") or not merge.strip():
                continue
            parts = merge.split(" ")
        else:
            parts = list(merge)
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{where} entry {index} must be two tokens separated by one space, got {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def unmerged_tokens(vocabulary: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> list[str]:
    """Vocabulary entries that are neither one byte symbol nor the product of a merge: the added tokens."""
    produced = {left + right for left, right in merges}
    alphabet = set(byte_to_symbol().values())
    return sorted(
        (token for token in vocabulary if token not in produced and not (len(token) == 1 and token in alphabet)),
        key=vocabulary.__getitem__,
    )
