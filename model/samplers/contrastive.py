"""Contrastive search as a sampler: keras-hub's ContrastiveSampler, run by
`model.generation.search.contrastive_search`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from model.generation import search
from model.generation.requests import Completion
from model.samplers.sampler import SearchSampler, check_positive_int, check_temperature

if TYPE_CHECKING:
    from model.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class ContrastiveSampler(SearchSampler):
    """Of the `k` most likely next tokens, the one that best trades probability (weight 1 - alpha) against
    similarity to what came before (weight alpha); alpha 0 is greedy.

    Example:
        >>> lm.compile(sampler=ContrastiveSampler(k=4, alpha=0.6))  # doctest: +SKIP
    """

    name = "contrastive"
    k: int = 5
    alpha: float = 0.6
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        check_temperature(self.temperature, allow_zero=False)

    def search(
        self,
        model: search.SearchModel,
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        stop_token_ids: tuple[int, ...],
        max_length: int,
        stop_strings: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
        tokenizer: "Tokenizer | None" = None,
    ) -> list[Completion]:
        # Stop strings are exact here: the one sequence's tokens never depend on later ones, so cutting the
        # searched sequence where a stop string begins gives what stopping there would have given.
        def contrastive(*args, **kwargs):
            return search.contrastive_search(*args, k=self.k, alpha=self.alpha, temperature=self.temperature, **kwargs)

        return search.search_completions(
            model, prompts, budgets, stop_token_ids, max_length, contrastive, stop_strings, skip_special_tokens,
            tokenizer,
        )
