"""The samplers that the continuous-batching engine runs: greedy, top-k, top-p, random and min-p.

Arguments and defaults follow keras-hub's samplers (min-p, which keras-hub lacks, follows the same shape).
`seed` None draws a fresh seed per `generate()` call; an int makes every row's text a function of
(seed, row index) alone. `temperature` 0 makes any of them greedy.

Example:
    >>> TopKSampler(k=10, temperature=0.7).to_sampling_params()
    SamplingParams(sampler='top_k', temperature=0.7, top_k=10, top_p=0.9, min_p=0.05)
"""

from __future__ import annotations

import dataclasses

from model.generation.requests import SamplingParams
from model.samplers.sampler import StreamingSampler, check_positive_int, check_temperature


@dataclasses.dataclass(frozen=True)
class GreedySampler(StreamingSampler):
    """The most likely token, always."""

    name = "greedy"
    temperature: float = 1.0  # accepted as keras-hub's is; it cannot change the most likely token

    def __post_init__(self) -> None:
        check_temperature(self.temperature, allow_zero=True)

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams("greedy")


@dataclasses.dataclass(frozen=True)
class TopKSampler(StreamingSampler):
    """A token drawn from the k most likely ones, in proportion to their (tempered) probabilities."""

    name = "top_k"
    k: int = 5
    seed: int | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)
        check_temperature(self.temperature, allow_zero=True)

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams("top_k", temperature=self.temperature, top_k=self.k)


@dataclasses.dataclass(frozen=True)
class TopPSampler(StreamingSampler):
    """A token drawn from the nucleus: the fewest most likely tokens whose probabilities sum to >= p.

    `k` is keras-hub's optional cap on the candidates before the nucleus; the engine's per-request
    parameters cannot carry it yet, so a TopPSampler with `k` set is refused when generating.
    """

    name = "top_p"
    p: float = 0.1
    k: int | None = None
    seed: int | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ValueError(f"p must be in (0, 1], got {self.p}")
        if self.k is not None:
            check_positive_int("k", self.k)
        check_temperature(self.temperature, allow_zero=True)

    def to_sampling_params(self) -> SamplingParams:
        if self.k is not None:
            raise ValueError(
                f"TopPSampler(k={self.k}): a top-k cap before the nucleus is not supported by the engine; "
                "use TopPSampler(p=...) (its nucleus is exact over the whole vocabulary) or TopKSampler(k=...)"
            )
        return SamplingParams("top_p", temperature=self.temperature, top_p=self.p)


@dataclasses.dataclass(frozen=True)
class RandomSampler(StreamingSampler):
    """A token drawn from the whole (tempered) distribution."""

    name = "random"
    seed: int | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature, allow_zero=True)

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams("random", temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class MinPSampler(StreamingSampler):
    """A token drawn from those at least `p` times as likely as the most likely one (Nguyen et al. 2024)."""

    name = "min_p"
    p: float = 0.05
    seed: int | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise ValueError(f"p must be in [0, 1), got {self.p}")
        check_temperature(self.temperature, allow_zero=True)

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams("min_p", temperature=self.temperature, min_p=self.p)
