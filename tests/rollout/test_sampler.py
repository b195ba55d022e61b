"""Sampler (torch path): filters and logprobs against hand-computed distributions, batch invariance,
empirical distributions of seeded draws, stream seeds and edge cases."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from mxroll.rollout.sampler import (Sampler, SamplingRows, filtered_probs, hash32, logprobs, row_keys, sample,
                                    sample_seed, threshold_rows)
from mxroll.rollout.sampling_params import GREEDY_EPS, SamplingParams, per_prompt

LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


def P(**kw):
    return SamplingParams.from_dict(kw)


def run(logits, params, seeds=None, positions=None, top_logprobs_num=None):
    """Sample one token per row of logits [S, V] with the torch sampler."""
    S = logits.shape[0]
    params = params if isinstance(params, list) else [params] * S
    rows = SamplingRows.build(params, seeds if seeds is not None else [7] * S,
                              positions if positions is not None else list(range(S)), "cpu", top_logprobs_num)
    return Sampler("cpu")(logits, rows)


# ---------------------------------------------------------------- single-sequence functions (runner)

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


def test_filters_compose_in_order():
    # top_k=3 keeps .4 .3 .15 (mass .85); top_p=0.5 of that (.425) keeps .4 .3; min_p=0.5 drops nothing more
    p = filtered_probs(LOGITS, P(top_k=3, top_p=0.5, min_p=0.5))
    assert torch.allclose(p, torch.tensor([[0.4, 0.3, 0, 0, 0]]) / 0.7)


def test_exact_ties_at_a_cut_are_all_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert (filtered_probs(logits, P(top_k=2))[0] > 0).tolist() == [True, True, True, False]
    probs = torch.softmax(logits[0], -1)
    # top_p reached inside the tie at 1.0: both tied tokens stay
    p = filtered_probs(logits, P(top_p=float(probs[0] + probs[1] / 2)))
    assert (p[0] > 0).tolist() == [True, True, True, False]


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


# ---------------------------------------------------------------- stream seeds and the hash

def test_sample_seed_streams_are_disjoint_and_stable():
    step0 = {sample_seed(0, 0, j) for j in range(4)}
    step1 = {sample_seed(1, 0, j) for j in range(4)}
    assert len(step0) == 4 and len(step1) == 4 and not step0 & step1
    grid = {sample_seed(s, i, j) for s in range(8) for i in range(16) for j in range(8)}
    assert len(grid) == 8 * 16 * 8  # prompts, samples and seeds all separate
    assert sample_seed(0, 0, 0) == 0x238275BC38FCBE91
    assert sample_seed(1, 0, 0) == 0xB18A02F46D8D86C3
    assert sample_seed(2**64 - 1, 3, 5) == 0x11CB707151D49088
    assert all(0 <= v < 2**64 for v in grid)
    for bad in [(-1, 0, 0), (2**64, 0, 0), (0, -1, 0), (0, 0, 1.0), (True, 0, 0)]:
        with pytest.raises(ValueError):
            sample_seed(*bad)


def _fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B & 0xFFFFFFFF
    h ^= h >> 13
    h = h * 0xC2B2AE35 & 0xFFFFFFFF
    return h ^ (h >> 16)


def _hash_py(seed, pos, token):
    """The hash in plain Python integers (seed in [0, 2^64))."""
    a, b = seed & 0xFFFFFFFF, seed >> 32
    q = _fmix32((pos & 0xFFFFFFFF) ^ _fmix32((pos >> 32) ^ 0x9E3779B9))
    b ^= _fmix32(a ^ q)
    a ^= _fmix32(b ^ ((q + 0x9E3779B9) & 0xFFFFFFFF))
    b ^= _fmix32(a ^ ((q + 2 * 0x9E3779B9) & 0xFFFFFFFF))
    return _fmix32(_fmix32(a ^ (token * 0x9E3779B1 & 0xFFFFFFFF)) ^ b)


def test_hash_matches_plain_integers():
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, sample_seed(3, 1, 2)]
    positions = [0, 1, 2**31 - 1, 2**32 + 5, 77, 123456]
    tokens = torch.tensor([0, 1, 2, 1000, 163839, 2**31 - 1])
    k0, k1 = row_keys(torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds]), torch.tensor(positions))
    h = hash32(k0, k1, tokens)
    assert h.min() >= 0 and h.max() < 2**32
    assert h.tolist() == [[_hash_py(s, p, t) for t in tokens.tolist()] for s, p in zip(seeds, positions)]


def test_one_position_never_shares_keys_between_seeds():
    seeds = torch.arange(-5000, 5000)
    k0, k1 = row_keys(seeds, torch.full_like(seeds, 42))
    assert len(set(zip(k0.tolist(), k1.tolist()))) == len(seeds)


# ---------------------------------------------------------------- rows

def test_rows_build():
    params = [P(temperature=0, top_k=5), P(top_k=3, raw_logprob=True, temperature=0.5), P(top_p=0.9), P(min_p=0.1),
              P(temperature=1e-30)]
    rows = SamplingRows.build(params, [0, 2**64 - 1, 2**63, 5, 6], [10, 11, 12, 13, 14], "cpu", [0, 2, 0, 5, 0])
    assert rows.greedy.tolist() == [True, False, False, False, True] and rows.greedy.dtype == torch.bool
    assert rows.seed.tolist() == [0, -1, -2**63, 5, 6] and rows.seed.dtype == torch.int64
    assert rows.top_k.tolist() == [5, 3, 0, 0, 0] and rows.position.tolist() == [10, 11, 12, 13, 14]
    assert rows.logprob_temperature.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert rows.temperature.dtype == torch.float32 and rows.temperature[1] == 0.5
    assert rows.needs_filter and rows.filter_plan.rows.tolist() == [1, 2, 3]  # greedy rows never filter
    assert rows.filter_plan.k_max == 3 and rows.filter_plan.any_top_p
    assert rows.top_logprobs_num == 5 and rows.top_logprobs_rows.tolist() == [1, 3]
    assert all(t.is_contiguous() for t in (rows.temperature, rows.top_p, rows.min_p, rows.seed, rows.position))
    plain = SamplingRows.build([P(), P(temperature=0, top_p=0.5)], [1, 2], [3, 4], "cpu")
    assert not plain.needs_filter and plain.top_logprobs_num == 0 and plain.filter_plan is None


def _rows_fields(rows: SamplingRows) -> dict:
    plan = rows.filter_plan
    return {"tensors": [t.tolist() for t in (rows.temperature, rows.greedy, rows.top_k, rows.top_p, rows.min_p,
                                            rows.seed, rows.position, rows.logprob_temperature)],
            "contiguous": all(t.is_contiguous() for t in (rows.temperature, rows.top_p, rows.min_p, rows.seed,
                                                          rows.position, rows.logprob_temperature, rows.top_k)),
            "top": (rows.top_logprobs_num, None if rows.top_logprobs_rows is None else rows.top_logprobs_rows.tolist()),
            "filter": (rows.needs_filter, None if plan is None else (plan.rows.tolist(), plan.k_max, plan.any_top_p))}


@pytest.mark.parametrize("src", [[0, 1, 2, 3, 4, 5], [1, 3, 4], [5], [0, 2]])
def test_rows_advance_equals_a_fresh_build(src):
    """A steady decode step's rows come from the last step's host arrays (`advance`): equal to building them from
    the params, seeds and positions again, whichever rows remain."""
    params = [P(temperature=0, top_k=5), P(top_k=3, raw_logprob=True, temperature=0.5), P(top_p=0.9), P(min_p=0.1),
              P(temperature=1e-30), P(temperature=0.7)]
    seeds, pos, tops = [0, 2**64 - 1, 2**63, 5, 6, 7], [10, 11, 12, 13, 14, 15], [0, 2, 0, 5, 0, 1]
    rows = SamplingRows.build(params, seeds, pos, "cpu", tops)
    nxt = rows.advance(src, [pos[i] + 1 for i in src], "cpu")
    ref = SamplingRows.build([params[i] for i in src], [seeds[i] for i in src], [pos[i] + 1 for i in src], "cpu",
                             [tops[i] for i in src])
    assert _rows_fields(nxt) == _rows_fields(ref) and _rows_fields(nxt)["contiguous"]
    again = nxt.advance(list(range(len(src))), [pos[i] + 2 for i in src], "cpu")  # and from an advanced step
    assert again.position.tolist() == [pos[i] + 2 for i in src] and again.seed.tolist() == ref.seed.tolist()


# ---------------------------------------------------------------- batch invariance

def test_token_depends_only_on_row_seed_and_position():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(300, generator=g) * 2
    mine = P(top_p=0.95, temperature=0.8)
    alone = run(row[None], [mine], seeds=[123], positions=[40])
    for S, slot in [(8, 5), (33, 17), (3, 0)]:
        logits = torch.randn(S, 300, generator=g) * 3
        logits[slot] = row
        others = [P(), P(temperature=0), P(top_k=3), P(min_p=0.2, raw_logprob=True), P(temperature=2.0)]
        params = [others[i % len(others)] for i in range(S)]
        params[slot] = mine
        seeds = [sample_seed(i, 0, 0) for i in range(S)]
        seeds[slot] = 123
        positions = [40 + 3 * i for i in range(S)]
        positions[slot] = 40
        out = run(logits, params, seeds, positions)
        assert out.tokens[slot] == alone.tokens[0]
        assert out.logprobs[slot] == alone.logprobs[0]
    # without any filtering row in the batch (needs_filter False) an unfiltered row is unchanged too
    plain = run(row[None], [P()], seeds=[9], positions=[3])
    mixed = run(torch.stack([torch.randn(300, generator=g), row]), [P(top_k=2), P()], seeds=[1, 9], positions=[0, 3])
    assert mixed.tokens[1] == plain.tokens[0]


def test_seed_and_position_change_the_draw_and_repeat_exactly():
    flat = torch.zeros(100, 1000)
    by_pos = run(flat, P(), seeds=[5] * 100, positions=list(range(100))).tokens
    by_seed = run(flat, P(), seeds=[sample_seed(s, 0, 0) for s in range(100)], positions=[7] * 100).tokens
    assert len(set(by_pos.tolist())) > 85 and len(set(by_seed.tolist())) > 85  # ~95 expected of 1000 tokens
    again = run(flat, P(), seeds=[5] * 100, positions=list(range(100)))
    assert torch.equal(again.tokens, by_pos)
    n4 = [sample_seed(s, 0, j) for s in (0, 1) for j in range(4)]
    draws = run(torch.zeros(8, 2**20 // 64), P(), seeds=n4, positions=[0] * 8).tokens
    assert len(set(draws.tolist())) == 8


# ---------------------------------------------------------------- distributions

N_DRAWS = 20000


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5}, {"temperature": 1.7}, {"top_k": 2}, {"top_p": 0.8},
                                {"min_p": 0.3}, {"top_k": 4, "top_p": 0.9, "temperature": 1.5},
                                {"top_p": 0.3}])
def test_draws_follow_the_filtered_distribution(kw):
    params = P(**kw)
    out = run(LOGITS.expand(N_DRAWS, -1).contiguous(), params, seeds=[11] * N_DRAWS, positions=list(range(N_DRAWS)))
    freq = torch.bincount(out.tokens, minlength=5).double() / N_DRAWS
    target = filtered_probs(LOGITS, params)[0].double()
    assert (freq[target == 0] == 0).all()
    assert (freq - target).abs().max() < 0.012, (freq, target)  # std <= 0.0035


def test_draws_follow_softmax_over_a_larger_vocab():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, generator=g) * 2
    seeds = [sample_seed(s, 0, 0) for s in range(N_DRAWS)]
    out = run(logits.expand(N_DRAWS, -1).contiguous(), P(), seeds=seeds, positions=[100] * N_DRAWS)
    freq = torch.bincount(out.tokens, minlength=64).double() / N_DRAWS
    target = torch.softmax(logits.double(), -1)
    chi2 = float(((freq - target) ** 2 / target).sum() * N_DRAWS)
    assert chi2 < 110, chi2  # 63 degrees of freedom: p ~ 2e-4 above 110


# ---------------------------------------------------------------- logprobs

def test_logprobs_full_vocab_before_filtering_at_the_right_temperature():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [P(temperature=0.5, top_k=1), P(temperature=0), P(temperature=0.7, raw_logprob=True),
              P(temperature=1.3, top_p=0.5), P(), P(min_p=0.5, temperature=0.9)]
    out = run(logits, params, top_logprobs_num=[3, 3, 3, 3, 3, 3])
    temps = torch.tensor([0.5, 1.0, 1.0, 1.3, 1.0, 0.9])
    lsm = torch.log_softmax(logits / temps[:, None], -1)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[1] == logits[1].argmax()
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, lsm.gather(1, out.tokens[:, None])[:, 0], atol=1e-6, rtol=0)
    vals, ids = lsm.topk(3, -1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs, vals, atol=1e-6, rtol=0)
    for r in range(6):  # a sampled token among its row's top entries carries its logprob bit for bit
        hit = (out.top_ids[r] == out.tokens[r]).nonzero()[:, 0]
        assert r > 1 or len(hit) == 1  # the greedy rows' tokens are their top ones
        assert all(out.top_logprobs[r, h].item() == out.logprobs[r].item() for h in hit)


def test_top_logprobs_only_for_rows_that_ask():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    out = run(logits, [P(), P(temperature=2.0), P()], top_logprobs_num=[0, 4, 2])
    assert out.top_ids.shape == (3, 4) and out.top_logprobs.dtype == torch.float32
    vals, ids = torch.log_softmax(logits[1] / 2.0, -1).topk(4)
    assert torch.equal(out.top_ids[1], ids) and torch.allclose(out.top_logprobs[1], vals, atol=1e-6)
    assert (out.top_ids[0] == -1).all() and (out.top_logprobs[0] == float("-inf")).all()
    assert run(logits, P()).top_ids is None


# ---------------------------------------------------------------- edge cases

def test_tiny_and_huge_temperatures():
    assert P(temperature=1e-30).greedy and P(temperature=GREEDY_EPS / 2).greedy and not P(temperature=GREEDY_EPS).greedy
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(4)) * 5
    out = run(logits, [P(temperature=1e-30), P(temperature=GREEDY_EPS), P(temperature=1e30), SamplingParams(temperature=math.inf)])  # inf: rejected by validation, robust anyway
    assert torch.isfinite(out.logprobs).all()
    assert out.tokens[0] == logits[0].argmax() and out.tokens[1] == logits[1].argmax()
    assert math.isclose(float(out.logprobs[0]), float(torch.log_softmax(logits[0], -1).max()), rel_tol=1e-6)
    assert float(out.logprobs[1]) == 0.0  # log_softmax(logits / 1e-5) at the argmax
    assert math.isclose(float(out.logprobs[2]), -math.log(100), rel_tol=1e-6)  # flat
    flat = run(logits[2:3].expand(4000, -1).contiguous(), P(temperature=1e30), positions=list(range(4000)))
    assert len(set(flat.tokens.tolist())) > 95  # ~uniform over 100


def test_masked_vocab_is_never_sampled():
    logits = torch.zeros(4000, 10)
    logits[:, ::2] = float("-inf")
    for params in (P(), P(top_k=8), P(top_p=0.9), P(min_p=0.5), P(temperature=0)):
        out = run(logits, params, positions=list(range(4000)))
        assert (out.tokens % 2 == 1).all()
        assert torch.allclose(out.logprobs, torch.full((4000,), -math.log(5)))
    assert len(set(run(logits, P(), positions=list(range(4000))).tokens.tolist())) == 5


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 0.01}, {"min_p": 0.9}, {"top_k": 1, "top_p": 0.5}])
def test_filter_leaving_one_token(kw):
    logits = torch.randn(500, 30, generator=torch.Generator().manual_seed(5))
    logits[torch.arange(500), logits.argmax(-1)] += 1.0  # min_p=0.9 needs a gap above -log(0.9)
    out = run(logits, P(**kw), positions=list(range(500)))
    assert torch.equal(out.tokens, logits.argmax(-1))


def test_threshold_rows_match_definitions():
    logits = torch.log(PROBS)[None].repeat(4, 1)
    t = torch.ones(4)
    thr = threshold_rows(logits, t, torch.tensor([2, 0, 0, 3]), torch.tensor([1.0, 0.8, 1.0, 0.5]),
                         torch.tensor([0.0, 0.0, 0.3, 0.0]), k_max=3, any_top_p=True)
    assert torch.allclose(thr, torch.log(torch.tensor([0.3, 0.15, 0.12, 0.3])))
    # top_k alone goes through topk instead of a sort, same thresholds
    thr_k = threshold_rows(logits, t, torch.tensor([2, 0, 5, 1]), torch.ones(4), torch.zeros(4), k_max=5,
                           any_top_p=False)
    assert thr_k.tolist()[0] == float(logits[0, 1]) and thr_k[1] == float("-inf") and thr_k[2] == float("-inf")
    assert thr_k[3] == float(logits[0, 0])


def test_top_p_cut_beyond_the_candidates_falls_back_to_a_sort(monkeypatch):
    from mxroll.rollout import sampler
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 300, generator=g) * torch.tensor([0.3, 3.0, 0.3, 1.0, 3.0, 1.0])[:, None]
    t = torch.tensor([1.0, 0.5, 1.3, 1.0, 1.0, 0.8])
    top_k = torch.tensor([0, 0, 3, 0, 0, 2])
    top_p = torch.tensor([0.9, 0.05, 0.7, 0.6, 1.0, 0.95])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.01])
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 10**6)
    whole = threshold_rows(logits, t, top_k, top_p, min_p, k_max=3, any_top_p=True)
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 4)
    few = threshold_rows(logits, t, top_k, top_p, min_p, k_max=3, any_top_p=True)
    assert torch.equal(few, whole)
    x = logits / t[:, None]  # by definition: the top_k survivors, then the shortest prefix reaching top_p
    beyond = 0
    for r in range(6):
        xs = x[r].sort(descending=True).values
        k = int(top_k[r]) or 300
        p = torch.softmax(xs, -1)[:k]
        keep = int(((p.cumsum(0) - p) < top_p[r] * p.sum()).sum())
        beyond += top_p[r] < 1 and keep > 4
        expect = max(float(xs[keep - 1]), float(xs[0]) + math.log(float(min_p[r])) if min_p[r] > 0 else -math.inf)
        assert math.isclose(float(whole[r]), expect, rel_tol=1e-6), r
    assert beyond >= 2  # rows 0 and 3 took the sort


def test_sampler_backend_choice(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="mxroll.rollout.sampler"):
        assert Sampler("cpu").backend == "torch"
    assert "torch path on cpu" in caplog.text
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        Sampler("cpu", backend="triton")
    with pytest.raises(ValueError, match="backend"):
        Sampler("cpu", backend="flashinfer")
