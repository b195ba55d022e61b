"""Triton sampler kernel against the torch reference (rollout.sampler.sample_ref): the same hash bit
for bit, the same tokens, logprobs within 1e-5, batch invariance. Runs on a CUDA GPU, or on CPU
tensors under the Triton interpreter (triton installed and TRITON_INTERPRET=1); skipped otherwise."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_device import kernel_device

DEV, _ = kernel_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mxroll.rollout.sampler import (Sampler, SamplingRows, filter_thresholds, gumbel_from_hash, hash32,  # noqa: E402
                                    row_keys, sample_ref, sample_seed)
from mxroll.rollout.sampling_kernel import CHUNK, _gumbel, _hash32, _row_keys, sample_triton  # noqa: E402
from mxroll.rollout.sampling_params import SamplingParams  # noqa: E402


def P(**kw):
    return SamplingParams.from_dict(kw)


@triton.jit
def _noise_kernel(seed_ptr, pos_ptr, h_ptr, g_ptr, first_token, N, BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0)
    k0, k1 = _row_keys(tl.load(seed_ptr + row), tl.load(pos_ptr + row))
    offs = tl.arange(0, BLOCK)
    h = _hash32(k0, k1, first_token + offs)
    tl.store(h_ptr + row * N + offs, h.to(tl.int64), mask=offs < N)
    tl.store(g_ptr + row * N + offs, _gumbel(h, FAST), mask=offs < N)


@pytest.mark.parametrize("first_token", [0, 163840 - 300, 2**31 - 301])
def test_hash_is_bit_identical_and_noise_matches(first_token):
    seeds = torch.tensor([0, 1, -1, -2**63, 2**63 - 1, sample_seed(5, 2, 1) >> 1, 12345], device=DEV)
    positions = torch.tensor([0, 1, 2**31 - 1, 2**32 + 3, 2**40, 999, 7], device=DEV)
    N = 300
    h = torch.empty(len(seeds), N, dtype=torch.int64, device=DEV)
    g = torch.empty(len(seeds), N, dtype=torch.float32, device=DEV)
    _noise_kernel[(len(seeds),)](seeds, positions, h, g, first_token, N, BLOCK=512, FAST=DEV == "cuda")
    k0, k1 = row_keys(seeds, positions)
    ref = hash32(k0, k1, torch.arange(first_token, first_token + N, device=DEV))
    assert torch.equal(h, ref)
    assert torch.allclose(g, gumbel_from_hash(ref), rtol=1e-6, atol=2e-6)


MIXED = [P(), P(temperature=0), P(temperature=0.6), P(temperature=1.8, raw_logprob=True), P(top_k=5),
         P(top_k=50, temperature=0.7), P(top_p=0.9), P(top_p=0.5, temperature=1.3), P(min_p=0.1),
         P(top_k=20, top_p=0.8, min_p=0.05, temperature=0.9), P(temperature=1e-30),
         P(raw_logprob=True, temperature=0.5, top_k=3)]


def mixed_batch(S, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, V, generator=g) * 4
    logits[1::5, ::3] = float("-inf")  # masked vocab in some rows
    params = [MIXED[i % len(MIXED)] for i in range(S)]
    seeds = [sample_seed(seed, i, 0) for i in range(S)]
    positions = [int(p) for p in torch.randint(0, 2**20, (S,), generator=g)]
    return logits.to(DEV), SamplingRows.build(params, seeds, positions, DEV)


@pytest.mark.parametrize("V", [1000, 2 * CHUNK + 777])
def test_kernel_matches_reference_on_mixed_rows(V):
    logits, rows = mixed_batch(24, V, seed=V)
    thr = filter_thresholds(logits, rows)
    args = (rows.temperature, rows.greedy, thr, rows.seed, rows.position, rows.logprob_temperature)
    tok, lp = sample_triton(logits, *args)
    ref_tok, ref_lp = sample_ref(logits, *args)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=0), (lp - ref_lp).abs().max()
    # no filter pass at all (threshold None) for the same rows: the unfiltered rows keep their tokens
    tok_nf, _ = sample_triton(logits, rows.temperature, rows.greedy, None, *args[3:])
    ref_nf, _ = sample_ref(logits, rows.temperature, rows.greedy, None, *args[3:])
    assert torch.equal(tok_nf, ref_nf)



def test_top_logprobs_share_the_kernels_logsumexp():
    """With top_logprobs_num, the kernel also writes each row's logsumexp; the top entries are x - that lse, so a
    sampled token among them carries its logprob bit for bit; the lse is the reference's to fp32 noise."""
    logits, _ = mixed_batch(12, 2 * CHUNK + 777, seed=3)
    rows = SamplingRows.build([MIXED[i] for i in range(12)], [sample_seed(3, i, 0) for i in range(12)],
                              list(range(12)), DEV, top_logprobs_num=[5] * 12)
    out = Sampler(DEV, "triton")(logits, rows)
    hits = 0
    for r in range(12):
        for h in (out.top_ids[r] == out.tokens[r]).nonzero()[:, 0].tolist():
            assert out.top_logprobs[r, h].item() == out.logprobs[r].item()
            hits += 1
    assert hits >= 6  # the greedy and low-temperature rows at least
    lse = torch.empty(12, dtype=torch.float32, device=DEV)
    sample_triton(logits, rows.temperature, rows.greedy, filter_thresholds(logits, rows), rows.seed, rows.position,
                  rows.logprob_temperature, lse_out=lse)
    ref = torch.logsumexp(logits / rows.logprob_temperature[:, None], -1)
    assert torch.allclose(lse, ref, atol=1e-5, rtol=0)


def test_sampler_backends_agree_with_top_logprobs():
    logits, rows = mixed_batch(12, 3000, seed=1)
    rows.top_logprobs_num = 4
    a, b = Sampler(DEV, backend="triton")(logits, rows), Sampler(DEV, backend="torch")(logits, rows)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.top_logprobs, b.top_logprobs)


def test_kernel_is_batch_invariant():
    logits, rows = mixed_batch(6, 5000, seed=2)
    one = SamplingRows.build([P(top_p=0.9, temperature=0.8)], [77], [1234], DEV)
    out1 = Sampler(DEV, backend="triton")(logits[3:4].contiguous(), one)
    params = [MIXED[i] for i in range(6)]
    params[3] = P(top_p=0.9, temperature=0.8)
    seeds = [sample_seed(9, i, 0) for i in range(6)]
    seeds[3] = 77
    many = SamplingRows.build(params, seeds, [1234 + i - 3 for i in range(6)], DEV)
    out6 = Sampler(DEV, backend="triton")(logits, many)
    assert out6.tokens[3] == out1.tokens[0]
    assert out6.logprobs[3] == out1.logprobs[0]


def test_greedy_ties_and_fully_masked_rows():
    V = CHUNK + 500
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    logits[0] = 0.0  # all tied: id 0
    logits[1, 17] = logits[1, CHUNK + 3] = 100.0  # tie across chunks: the lower id
    logits[2] = float("-inf")
    logits[2, V - 1] = 0.0  # one token left, in the last, partial block
    logits[3, :] = float("-inf")
    logits[3, CHUNK + 1] = 5.0
    logits = logits.to(DEV)
    rows = SamplingRows.build([P(temperature=0), P(temperature=0), P(), P(top_p=0.5)], [1, 2, 3, 4], [0, 0, 0, 0], DEV)
    out = Sampler(DEV, backend="triton")(logits, rows)
    assert out.tokens.tolist() == [0, 17, V - 1, CHUNK + 1]
    assert torch.isfinite(out.logprobs).all() and out.logprobs[2:].tolist() == [0.0, 0.0]


def test_wrapper_rejects_bad_inputs():
    logits, rows = mixed_batch(4, 64, seed=4)
    args = (rows.temperature, rows.greedy, None, rows.seed, rows.position, rows.logprob_temperature)
    with pytest.raises(AssertionError):
        sample_triton(logits[:, ::2], *args)
    with pytest.raises(AssertionError):
        sample_triton(logits.double(), *args)
    with pytest.raises(AssertionError):
        sample_triton(logits, rows.temperature.double(), *args[1:])
