"""Beam and contrastive search for a worker's rows: the model's search path, outside the streaming engine.

Search keeps several hypotheses per prompt, so it cannot share the engine's one-token-per-slot decode; it
runs `model.samplers.BeamSampler` / `ContrastiveSampler` (`model.generation.search`) over static batches
instead, exactly as `LlamaCausalLM.generate` does with those samplers. Requests are grouped by everything a
search call fixes (sampler settings, stop tokens and strings), and each group is cut into batches small enough
that hypotheses x rows stays within the worker's slots, which bounds the searches' KV cache like the engine's.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from batchgen.row_sampling import RowSampling


@dataclasses.dataclass(frozen=True)
class SearchRun:
    """One engine-style Request whose settings ask for beam or contrastive search."""

    request: Any  # model.generation.requests.Request
    settings: RowSampling


def search_sampler(settings: RowSampling) -> Any:
    """The model's sampler object for these settings (contrastive takes its candidates from top_k)."""
    from model.samplers import BeamSampler, ContrastiveSampler

    if settings.sampler == "beam":
        return BeamSampler(num_beams=settings.num_beams, temperature=settings.temperature)
    if settings.sampler == "contrastive":
        return ContrastiveSampler(k=settings.top_k, alpha=settings.alpha, temperature=settings.temperature)
    raise ValueError(f"{settings.sampler!r} is no search sampler")


def hypotheses(settings: RowSampling) -> int:
    """Sequences the search keeps per prompt, each with its own cache of max_length positions."""
    return settings.num_beams if settings.sampler == "beam" else settings.top_k


def run_searches(lm: Any, runs: Sequence[SearchRun], max_length: int, max_slots: int) -> Iterator[Any]:
    """Completions of `runs` (with their requests' ids), group by group, batch by batch."""
    groups: dict[tuple, list[SearchRun]] = defaultdict(list)
    for run in runs:
        request = run.request
        key = (search_sampler(run.settings), request.stop_token_ids, request.stop_strings, request.skip_special_tokens)
        groups[key].append(run)
    from model.generation.search import bind_backbone  # Keras and JAX: loaded only where a search runs

    model = bind_backbone(lm.backbone)
    tokenizer = lm.preprocessor.tokenizer if lm.preprocessor is not None else None
    for (sampler, stop_ids, stop_strings, skip_special), members in groups.items():
        batch = max(1, max_slots // hypotheses(members[0].settings))
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            prompts = [list(run.request.prompt_ids) for run in chunk]
            budgets = [run.request.max_new_tokens for run in chunk]
            completions = sampler.search(model, prompts, budgets, stop_ids, max_length, stop_strings, skip_special,
                                         tokenizer)
            for run, completion in zip(chunk, completions):
                yield dataclasses.replace(completion, request_id=run.request.request_id)
