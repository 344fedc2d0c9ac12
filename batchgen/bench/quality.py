"""How closely two systems' greedy outputs agree, prompt by prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(outputs: Mapping[str, Sequence[int]], reference: Mapping[str, Sequence[int]]) -> tuple[float, float]:
    """(share of prompts whose output equals the reference's, mean matching-prefix length in tokens).

    Every prompt of `reference` counts; one missing from `outputs` counts as differing from the first token.
    """
    if not reference:
        raise ValueError("agreement needs at least one reference output")
    same = 0
    prefix = 0
    for request_id, expected in reference.items():
        got = outputs.get(request_id)
        if got is None:
            continue
        same += list(got) == list(expected)
        prefix += matching_prefix(got, expected)
    return same / len(reference), prefix / len(reference)
