"""Samplers by name or config: `get`, `serialize` and `deserialize`, as `keras_hub.samplers` has them."""

from __future__ import annotations

from typing import Any

from model.samplers.beam import BeamSampler
from model.samplers.contrastive import ContrastiveSampler
from model.samplers.sampler import Sampler
from model.samplers.streaming import GreedySampler, MinPSampler, RandomSampler, TopKSampler, TopPSampler

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (GreedySampler, TopKSampler, TopPSampler, RandomSampler, MinPSampler, BeamSampler, ContrastiveSampler)
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in SAMPLERS.values()}


def serialize(sampler: Sampler) -> dict[str, Any]:
    """{"class_name": ..., "config": ...}; keras-hub's serialized samplers read back with `deserialize` too."""
    return {"class_name": type(sampler).__name__, "config": sampler.get_config()}


def deserialize(config: dict[str, Any]) -> Sampler:
    """A sampler from `serialize`'s output or keras-hub's (`"registered_name": "keras_hub>TopKSampler"` etc.)."""
    class_name = str(config.get("class_name", "")).split(">")[-1]
    cls = _BY_CLASS_NAME.get(class_name) or SAMPLERS.get(class_name)
    if cls is None:
        raise ValueError(f"unknown sampler class {config.get('class_name')!r}; known: {sorted(_BY_CLASS_NAME)}")
    return cls.from_config(dict(config.get("config", {})))


def get(identifier: str | dict[str, Any] | Sampler | None) -> Sampler | None:
    """A sampler from a name ("greedy", "top_k", "top_p", "random", "min_p", "beam", "contrastive", with
    default arguments), a serialized config, or a sampler object (returned as is).

    Example:
        >>> get("top_k")
        TopKSampler(k=5, seed=None, temperature=1.0)
    """
    if identifier is None or isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        if identifier not in SAMPLERS:
            raise ValueError(f"unknown sampler {identifier!r}; known: {sorted(SAMPLERS)}")
        return SAMPLERS[identifier]()
    raise ValueError(f"a sampler must be a name, a config dict or a Sampler object, got {identifier!r}")
