"""Beam search as a sampler: keras-hub's BeamSampler, run by `model.generation.search.beam_search`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from model.generation import search
from model.generation.requests import Completion
from model.samplers.sampler import SearchSampler, check_positive_int, check_temperature

if TYPE_CHECKING:
    from model.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class BeamSampler(SearchSampler):
    """Keeps the `num_beams` most likely sequences at every step and returns the most likely one.

    `return_all_beams` is kept in the config for keras-hub compatibility; `generate()` returns the best beam
    either way, and `model.generation.search.beam_search` gives every beam with its log-probability.

    Example:
        >>> lm.compile(sampler=BeamSampler(num_beams=4))  # doctest: +SKIP
    """

    name = "beam"
    num_beams: int = 5
    return_all_beams: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("num_beams", self.num_beams)
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
        if stop_strings:
            # A stop string would have to finish a hypothesis inside the search, where the beams compete on
            # their whole score; cutting the best beam afterwards could return a beam the search would not
            # have chosen. Refused rather than silently approximated.
            raise ValueError(
                f"BeamSampler does not support stop strings (got {list(stop_strings)!r}): use stop_token_ids, or "
                "a streaming sampler (greedy, top_k, top_p, random, min_p) or ContrastiveSampler with `stop`"
            )

        def best_beam(*args, **kwargs):
            out = search.beam_search(*args, num_beams=self.num_beams, temperature=self.temperature, **kwargs)
            return out.token_ids[:, 0], out.lengths[:, 0], out.stopped[:, 0]

        return search.search_completions(
            model, prompts, budgets, stop_token_ids, max_length, best_beam, (), skip_special_tokens, tokenizer
        )
