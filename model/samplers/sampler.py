"""The sampler base classes: a sampler is a frozen dataclass whose fields are its whole config.

Streaming samplers (greedy, top-k, top-p, random, min-p) choose each token from one distribution and run in
the continuous-batching engine through `to_sampling_params()`. Search samplers (beam, contrastive) keep
several hypotheses per prompt and run `model.generation.search` over a static batch through `search()`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from model.generation.requests import Completion, SamplingParams

if TYPE_CHECKING:
    from model.generation.search import SearchModel
    from model.tokenizers import Tokenizer


class Sampler(abc.ABC):
    """How `generate()` picks tokens. Subclasses are frozen dataclasses: `get_config()` is their fields."""

    name: ClassVar[str]  # the identifier of `model.samplers.get`, as keras-hub's ("top_k", "beam", ...)
    streaming: ClassVar[bool]

    def get_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Sampler":
        return cls(**config)


class StreamingSampler(Sampler):
    """A sampler the engine runs with per-request parameters."""

    streaming: ClassVar[bool] = True

    @abc.abstractmethod
    def to_sampling_params(self) -> SamplingParams:
        """The engine's per-request form of this sampler."""


class SearchSampler(Sampler):
    """A sampler that searches over several hypotheses per prompt, outside the streaming engine."""

    streaming: ClassVar[bool] = False

    @abc.abstractmethod
    def search(
        self,
        model: "SearchModel",
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        stop_token_ids: tuple[int, ...],
        max_length: int,
        stop_strings: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
        tokenizer: "Tokenizer | None" = None,
    ) -> list[Completion]:
        """One Completion per prompt (request id = its index), generating at most `budgets[i]` tokens and
        at most `max_length` tokens in all (prompt included); its text (with a `tokenizer`) is cut where a stop
        string begins.

        `model` is the model as a callable (`model.generation.search.bind_backbone`), as keras-hub's samplers
        get a `next` function rather than the model.

        A sampler that cannot honour stop strings raises ValueError when given any, never ignores them."""


def check_temperature(temperature: float, allow_zero: bool) -> None:
    if temperature < 0 or (temperature == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"temperature must be {bound}, got {temperature}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
