"""Sampler filters and logprob semantics against hand-computed distributions."""
from __future__ import annotations

import math

import pytest
import torch

from mxroll.rollout.sampler import filtered_probs, logprobs, sample
from mxroll.rollout.sampling_params import GREEDY_EPS, SamplingParams, per_prompt

LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def P(**kw):
    return SamplingParams.from_dict(kw)


def test_top_k_keeps_k_largest():
    p = filtered_probs(LOGITS, P(top_k=2))
    assert torch.allclose(p, torch.tensor([[0.4, 0.3, 0, 0, 0]]) / 0.7)


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = filtered_probs(LOGITS, P(top_p=0.8))  # 0.4 + 0.3 < 0.8, + 0.15 reaches it
    assert torch.allclose(p, torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)
    assert torch.allclose(filtered_probs(LOGITS, P(top_p=0.3)), torch.tensor([[1.0, 0, 0, 0, 0]]))


def test_min_p_relative_to_max():
    p = filtered_probs(LOGITS, P(min_p=0.3))  # threshold 0.12
    assert torch.allclose(p, torch.tensor([[0.4, 0.3, 0.15, 0, 0]]) / 0.85)


def test_temperature_changes_distribution_and_logprobs():
    p = filtered_probs(LOGITS, P(temperature=0.5))
    ref = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]) ** 2
    assert torch.allclose(p, ref / ref.sum())
    assert torch.allclose(logprobs(LOGITS, P(temperature=0.5)), torch.log(ref / ref.sum()), atol=1e-6)
    raw = logprobs(LOGITS, P(temperature=0.5, raw_logprob=True))
    assert math.isclose(float(raw[0, 0]), math.log(0.4), rel_tol=1e-6)


def test_logprobs_are_before_filtering():
    lp = logprobs(LOGITS, P(top_k=1))
    assert math.isclose(float(lp[0, 1]), math.log(0.3), rel_tol=1e-6)


def test_greedy_and_seeded_sampling():
    assert int(sample(LOGITS, P(temperature=0), None)[0]) == 0
    draws = [int(sample(LOGITS, P(), torch.Generator().manual_seed(s))[0]) for s in range(400)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 400
    assert torch.allclose(freq, torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=0.07)
    a = [int(sample(LOGITS, P(), torch.Generator().manual_seed(7))[0]) for _ in range(5)]
    assert len(set(a)) == 1


@pytest.mark.parametrize("bad, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 1.0}, "min_p"), ({"n": 0}, "n"), ({"max_new_tokens": -2}, "max_new_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": "x"}, "seed"), ({"bogus": 1}, "bogus"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": "5"}, "stop_token_ids"),
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.nan}, "top_p"), ({"top_p": math.inf}, "top_p"), ({"min_p": math.nan}, "min_p"),
    ({"min_p": -math.inf}, "min_p"),
])
def test_invalid_sampling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(bad)


@pytest.mark.parametrize("bad", [[1, 2], "temperature=0", 5, (("n", 2),)])
def test_sampling_params_must_be_a_dict(bad):
    with pytest.raises(ValueError, match="sampling_params must be a dict"):
        SamplingParams.from_dict(bad)
    with pytest.raises(ValueError, match="sampling_params must be a dict"):
        per_prompt(bad if isinstance(bad, list) else [bad], 2)


def test_per_prompt():
    assert per_prompt(None, 2) == [SamplingParams()] * 2
    assert [p.n for p in per_prompt([{"n": 1}, {"n": 3}], 2)] == [1, 3]
    with pytest.raises(ValueError, match="1 sampling_params for 2 prompts"):
        per_prompt([{}], 2)


def test_seed_range_is_that_of_torch_generators():
    top = SamplingParams.from_dict({"seed": 2**64 - 1, "n": 2})
    torch.Generator().manual_seed(top.seed)


def test_temperatures_below_greedy_eps_are_greedy():
    assert GREEDY_EPS == 1e-5
    tiny = P(temperature=GREEDY_EPS / 2)
    assert tiny.greedy and not P(temperature=GREEDY_EPS).greedy
    assert int(sample(LOGITS, tiny, None)[0]) == 0
    # logprobs at temperature 1, like greedy requests (logits / 5e-6 would be inf - inf = NaN in log_softmax)
    assert torch.equal(logprobs(LOGITS, tiny), logprobs(LOGITS, P(temperature=0)))
    assert torch.isfinite(logprobs(LOGITS * 1e35, tiny)).all()
