"""The numpy reference of penalties and logit bias, and SamplingParams' new fields, on hand-computed logits."""

from __future__ import annotations

import numpy as np
import pytest

from model.generation.penalties_reference import apply_penalties
from model.generation.requests import Request, SamplingParams


def test_defaults_change_nothing():
    logits = np.random.default_rng(0).normal(size=(3, 11)).astype(np.float32)
    counts = np.random.default_rng(1).integers(0, 3, size=(3, 11))
    out = apply_penalties(logits, counts, [{0, 1}, {2}, set()], SamplingParams())
    np.testing.assert_array_equal(out, logits)
    assert not SamplingParams().has_penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = np.array([4.0, -2.0, 3.0, -1.0, 1.0])
    counts = np.array([0, 1, 2, 0, 0])  # tokens 1 and 2 were generated
    out = apply_penalties(logits, counts, {0}, SamplingParams(repetition_penalty=2.0))  # token 0 is in the prompt
    np.testing.assert_allclose(out, [2.0, -4.0, 1.5, -1.0, 1.0])


def test_frequency_counts_generations_and_presence_counts_once_and_the_prompt_is_not_counted():
    logits = np.zeros(4)
    counts = np.array([0, 1, 3, 0])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, counts, {0, 3}, params)
    np.testing.assert_allclose(out, [0.0, -0.75, -1.75, 0.0])


def test_logit_bias_is_added_after_the_penalties():
    logits = np.array([[2.0, 2.0, 2.0]])
    counts = np.array([[1, 0, 0]])
    params = SamplingParams(repetition_penalty=2.0, logit_bias={0: 1.0, 2: -100})
    out = apply_penalties(logits, counts, [set()], params)
    # Token 0: 2 / 2 = 1, then + 1 (a bias before the penalty would give (2 + 1) / 2 = 1.5).
    np.testing.assert_allclose(out, [[2.0, 2.0, -98.0]])


def test_each_row_uses_its_own_params_and_prompt():
    logits = np.ones((2, 3))
    counts = np.zeros((2, 3), int)
    mask = np.array([[True, False, False], [False, False, True]])
    params = [SamplingParams(repetition_penalty=4.0), SamplingParams()]
    out = apply_penalties(logits, counts, mask, params)
    np.testing.assert_allclose(out, [[0.25, 1, 1], [1, 1, 1]])


def test_bad_shapes_and_ids_are_refused():
    with pytest.raises(ValueError, match="shape"):
        apply_penalties(np.zeros((2, 3)), np.zeros((2, 4)), [set(), set()], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        apply_penalties(np.zeros(3), np.zeros(3), {5}, SamplingParams(repetition_penalty=1.5))
    with pytest.raises(ValueError, match="token 9"):
        apply_penalties(np.zeros(3), np.zeros(3), set(), SamplingParams(logit_bias={9: 1.0}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\] \(0 = off\), got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {-1: 1.0}}, "token ids"),
        ({"logit_bias": {3: 101}}, r"logit_bias\[3\] must be a number in \[-100, 100\], got 101"),
        ({"logit_bias": {3: float("nan")}}, r"logit_bias\[3\]"),
        ({"logit_bias": [(3, 1.0), (3, 2.0)]}, "twice"),
    ],
)
def test_sampling_params_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_is_normalized_so_equal_settings_are_equal_and_hashable():
    a = SamplingParams(logit_bias={7: -100, 3: 2})
    b = SamplingParams(logit_bias=[(3, 2.0), (7, -100.0)])
    assert a == b and hash(a) == hash(b) and a.logit_bias == ((3, 2.0), (7, -100.0)) and a.has_penalties
    assert Request("r", [1], 4, a, response_format='{"type":"json_object"}').response_format is not None
