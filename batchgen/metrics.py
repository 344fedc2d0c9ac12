"""Evaluation metrics: one value per output row, summed per shard, aggregated per (model, configuration).

A shard's manifest entry keeps, for each (model, configuration), the metric's running sums (`sum`, `count`),
so that the job's figure is exact over every committed shard, whichever run committed it, and a resumed job
adds only its new shards. The figure is `sum / count`, except perplexity: exp(-sum / count), where `sum` is the
log-likelihood and `count` the tokens scored.

- exact_match (generate): the completion equals the reference after normalisation (`normalize`);
- accuracy (score): the continuation of highest log-likelihood is the reference (its index, or its text);
- mean_loglikelihood (score, perplexity): log-likelihood per scored token, over all continuations;
- perplexity (score, perplexity): exp of minus that.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's answer normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(completion: str | None, reference: Any) -> float | None:
    """1.0 / 0.0; None when there is nothing to compare (an error row, a null reference). A list of references
    matches when any does."""
    if completion is None or reference is None:
        return None
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    return float(any(normalize(completion) == normalize(str(r)) for r in references if r is not None))


def choice_index(reference: Any, continuations: Sequence[str]) -> int | None:
    """The index of the reference continuation: an integer index, or the continuation's text."""
    if reference is None or isinstance(reference, bool):
        return None
    if isinstance(reference, int):
        return reference if 0 <= reference < len(continuations) else None
    if isinstance(reference, str):
        return continuations.index(reference) if reference in continuations else None
    return None


def accuracy(logprobs: Sequence[float] | None, reference: Any, continuations: Sequence[str]) -> float | None:
    """1.0 when the highest log-likelihood continuation is the reference; None when either is missing."""
    index = choice_index(reference, continuations)
    if not logprobs or index is None:
        return None
    return float(max(range(len(logprobs)), key=lambda i: logprobs[i]) == index)


class MetricSums:
    """Running (sum, count) per key; `to_dict` / `merge` carry them through manifest entries."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, value: float, count: float = 1.0) -> None:
        entry = self.sums.setdefault(key, [0.0, 0.0])
        entry[0] += value
        entry[1] += count

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {key: {"metric": self.metric, "sum": s, "count": c} for key, (s, c) in self.sums.items()}


def merge(shard_metrics: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The job's metrics from its shards' (`ShardResult.metrics`): {key: {metric, value, count}}, keys in
    first-seen order."""
    total: dict[str, dict[str, Any]] = {}
    for metrics in shard_metrics:
        for key, part in (metrics or {}).items():
            into = total.setdefault(key, {"metric": part["metric"], "sum": 0.0, "count": 0.0})
            into["sum"] += part["sum"]
            into["count"] += part["count"]
    return {key: {"metric": m["metric"], "value": value(m["metric"], m["sum"], m["count"]), "count": m["count"]}
            for key, m in total.items()}  # fmt: skip


def value(metric: str, total: float, count: float) -> float | None:
    if not count:
        return None
    if metric == "perplexity":
        return math.exp(-total / count)
    return total / count


def metric_key(model: str, config: str) -> str:
    """The key of a (model, configuration) pair in `_summary.json`'s metrics."""
    return f"{model}/{config}"


def render(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Lines of the summary table: one per (model, configuration)."""
    lines = []
    for key, m in metrics.items():
        shown = "n/a" if m["value"] is None else f"{m['value']:.4f}"
        unit = "tokens" if m["metric"] in ("mean_loglikelihood", "perplexity") else "rows"
        lines.append(f"  {m['metric']:<11} {key}: {shown} (over {int(m['count'])} {unit})")
    return lines
