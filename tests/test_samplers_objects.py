"""Sampler objects: names, configs, keras-hub compatibility, conversion to engine parameters, and search()."""

from __future__ import annotations

import pytest

from model import samplers
from model.generation import search
from model.generation.requests import SamplingParams


@pytest.mark.parametrize(
    "name, cls, defaults",
    [
        ("greedy", samplers.GreedySampler, {}),
        ("top_k", samplers.TopKSampler, {"k": 5, "seed": None, "temperature": 1.0}),
        ("top_p", samplers.TopPSampler, {"p": 0.1, "k": None, "seed": None}),
        ("random", samplers.RandomSampler, {"seed": None, "temperature": 1.0}),
        ("min_p", samplers.MinPSampler, {"p": 0.05}),
        ("beam", samplers.BeamSampler, {"num_beams": 5, "return_all_beams": False}),
        ("contrastive", samplers.ContrastiveSampler, {"k": 5, "alpha": 0.6}),
    ],
)
def test_get_by_name_gives_keras_hub_defaults(name, cls, defaults):
    sampler = samplers.get(name)
    assert type(sampler) is cls and sampler.name == name
    config = sampler.get_config()
    assert {key: config[key] for key in defaults} == defaults


def test_get_passes_objects_through_and_rejects_unknown_names():
    sampler = samplers.TopK(k=3)
    assert samplers.get(sampler) is sampler
    assert samplers.get(None) is None
    with pytest.raises(ValueError, match="'nucleus'"):
        samplers.get("nucleus")
    with pytest.raises(ValueError, match="42"):
        samplers.get(42)


@pytest.mark.parametrize(
    "sampler",
    [
        samplers.Greedy(),
        samplers.TopK(k=7, seed=3, temperature=0.5),
        samplers.TopP(p=0.8, seed=1, temperature=0.9),
        samplers.Random(seed=9, temperature=1.5),
        samplers.MinP(p=0.1, temperature=0.7),
        samplers.Beam(num_beams=3, return_all_beams=True, temperature=0.8),
        samplers.Contrastive(k=4, alpha=0.3),
    ],
)
def test_configs_round_trip(sampler):
    assert samplers.deserialize(samplers.serialize(sampler)) == sampler
    assert type(sampler).from_config(sampler.get_config()) == sampler
    assert samplers.get(samplers.serialize(sampler)) == sampler


def test_keras_hub_serialized_samplers_are_read():
    config = {
        "module": "keras_hub.src.samplers.top_k_sampler",
        "class_name": "TopKSampler",
        "config": {"k": 9, "seed": None, "temperature": 0.6},
        "registered_name": "keras_hub>TopKSampler",
    }
    assert samplers.get(config) == samplers.TopK(k=9, temperature=0.6)
    with pytest.raises(ValueError, match="SpeculativeSampler"):
        samplers.deserialize({"class_name": "SpeculativeSampler", "config": {}})


def test_streaming_samplers_convert_to_engine_parameters():
    assert samplers.Greedy().to_sampling_params() == SamplingParams("greedy")
    assert samplers.TopK(k=7, temperature=0.5).to_sampling_params() == SamplingParams("top_k", 0.5, top_k=7)
    assert samplers.TopP(p=0.8).to_sampling_params() == SamplingParams("top_p", top_p=0.8)
    assert samplers.Random(temperature=2.0).to_sampling_params() == SamplingParams("random", 2.0)
    assert samplers.MinP(p=0.2).to_sampling_params() == SamplingParams("min_p", min_p=0.2)
    assert samplers.TopK(temperature=0.0).to_sampling_params().is_greedy
    assert all(s.streaming for s in (samplers.Greedy(), samplers.TopK(), samplers.MinP()))
    assert not samplers.Beam().streaming and not samplers.Contrastive().streaming
    with pytest.raises(ValueError, match="k=20"):
        samplers.TopP(p=0.9, k=20).to_sampling_params()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: samplers.TopK(k=0), "k must be"),
        (lambda: samplers.TopK(k=2.5), "k must be"),
        (lambda: samplers.TopP(p=0.0), "p must be"),
        (lambda: samplers.MinP(p=1.0), "p must be"),
        (lambda: samplers.Random(temperature=-1.0), "temperature"),
        (lambda: samplers.Beam(num_beams=0), "num_beams"),
        (lambda: samplers.Beam(temperature=0.0), "temperature must be > 0"),
        (lambda: samplers.Contrastive(alpha=1.5), "alpha"),
    ],
)
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_search_samplers_give_one_completion_per_prompt(tiny_backbone):
    model = search.bind_backbone(tiny_backbone)  # no tokenizer: texts are None
    prompts = [[5, 9, 11], [], [3] * 20, [40, 2]]
    budgets = [4, 4, 4, 3]
    beam = samplers.Beam(num_beams=1).search(model, prompts, budgets, (), 20)
    contrastive = samplers.Contrastive(k=3, alpha=0.0).search(model, prompts, budgets, (), 20)
    assert [c.request_id for c in beam] == [0, 1, 2, 3]
    assert [c.finish_reason for c in beam] == ["length", "error", "error", "length"]
    assert "empty" in beam[1].error and "max_length=20" in beam[2].error
    assert [len(c.token_ids) for c in beam] == [4, 0, 0, 3]
    assert beam[0].prompt_tokens == 3 and beam[0].completion_tokens == 4 and beam[0].text is None
    # One beam and alpha 0 are both greedy.
    assert [c.token_ids for c in beam] == [c.token_ids for c in contrastive]
    # A stop token ends the completion and is not part of it. Stopping on the most likely first token is the
    # best beam: any continuation only lowers the score.
    first = beam[0].token_ids[0]
    stopped = samplers.Beam(num_beams=2).search(model, prompts[:1], budgets[:1], (first,), 20)[0]
    assert stopped.finish_reason == "stop" and stopped.stop_token_id == first
    assert stopped.token_ids == () and stopped.completion_tokens == 1
