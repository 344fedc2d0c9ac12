"""Samplers: how `generate()` picks tokens, as objects or names (the API of `keras_hub.samplers`).

The per-row hot path that the engine jits lives in `model.generation.sampling`; beam and contrastive search in
`model.generation.search`. `Greedy`, `TopK`, ... are short names for the keras-hub class names.
"""

from model.samplers.beam import BeamSampler
from model.samplers.contrastive import ContrastiveSampler
from model.samplers.sampler import Sampler, SearchSampler, StreamingSampler
from model.samplers.serialization import SAMPLERS, deserialize, get, serialize
from model.samplers.streaming import GreedySampler, MinPSampler, RandomSampler, TopKSampler, TopPSampler

Greedy = GreedySampler
TopK = TopKSampler
TopP = TopPSampler
Random = RandomSampler
MinP = MinPSampler
Beam = BeamSampler
Contrastive = ContrastiveSampler

__all__ = [
    "SAMPLERS", "Sampler", "StreamingSampler", "SearchSampler", "get", "serialize", "deserialize",
    "GreedySampler", "TopKSampler", "TopPSampler", "RandomSampler", "MinPSampler", "BeamSampler",
    "ContrastiveSampler", "Greedy", "TopK", "TopP", "Random", "MinP", "Beam", "Contrastive",
]
