"""Triton sampler: one fused pass over the vocabulary per row for CUDA.

1. chunk kernel, one program per (row, vocab chunk of CHUNK tokens): per block of BLOCK tokens,
   x = logits / temperature (IEEE division; none at T = 1), Gumbel noise from the (seed, position,
   token) hash (greedy rows skip it), the filter threshold mask, a running per-lane argmax
   (strict >, so the lowest id wins ties) and a per-lane online logsumexp of
   logits / logprob_temperature (one exp per token).
2. combine kernel, one program per row: reduces the row's chunks in order, then reads the chosen
   token's logit once for its logprob.
CHUNK and BLOCK are fixed, never derived from S, so every row is reduced in the same order whatever
the batch: tokens and logprobs are batch-invariant bit for bit.

Reference: rollout.sampler.sample_ref (the same hash bit for bit and the same fp32 formulas;
tokens agree except where two candidates' scores are within float rounding of each other).
Legend: S rows, V vocab, C chunks per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tuning knobs; `benchmarks/sampler.py --sweep` times variants (on an H100 all tried settings came within
# ~15% of these, about the run-to-run noise). CHUNK must never depend on S: it fixes each row's sums.
CHUNK = 16384
BLOCK = 1024
NUM_WARPS = 4
NUM_STAGES = 3
PREFETCH = False  # load the next block before working on this one


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _row_keys(seed, pos):
    """rollout.sampler.row_keys for one row (int64 scalars in, uint32 keys out)."""
    a = (seed & 0xFFFFFFFF).to(tl.uint32)
    b = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    q = _fmix32((pos & 0xFFFFFFFF).to(tl.uint32) ^ _fmix32(((pos >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9))
    b ^= _fmix32(a ^ q)
    a ^= _fmix32(b ^ (q + 0x9E3779B9))
    b ^= _fmix32(a ^ (q + 0x3C6EF372))
    return a, b


@triton.jit
def _hash32(k0, k1, offs):
    """rollout.sampler.hash32 for one row's token ids."""
    h = _fmix32(k0 ^ (offs.to(tl.uint32) * 0x9E3779B1))
    return _fmix32(h ^ k1)


@triton.jit
def _log(x, FAST: tl.constexpr):
    """Natural log; FAST (CUDA): lg2.approx.f32 (abs. error ~2^-22 in log2) instead of libdevice's
    logf, whose special-case branches cost about a third of the kernel."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _gumbel(h, FAST: tl.constexpr):
    """rollout.sampler.gumbel_from_hash."""
    w = tl.minimum((h.to(tl.float32) + 0.5) * 2.3283064365386963e-10, 0.99999994)
    poly = 0.16666667 + w * 0.14285715
    poly = 0.2 + w * poly
    poly = 0.25 + w * poly
    poly = 0.33333334 + w * poly
    poly = 0.5 + w * poly
    poly = 1.0 + w * poly
    e = tl.where(w < 0.0625, w * poly, -_log(1.0 - w, FAST))
    return -_log(e, FAST)


@triton.jit
def _sample_chunk_kernel(logits_ptr, stride, t_ptr, greedy_ptr, thr_ptr, seed_ptr, pos_ptr, lpt_ptr,
                         best_ptr, idx_ptr, m_ptr, s_ptr, V, C,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_THR: tl.constexpr, FAST: tl.constexpr,
                         PREFETCH: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    greedy_i8 = tl.load(greedy_ptr + row)
    greedy = greedy_i8 != 0
    sampled = greedy_i8 == 0
    t = tl.where(greedy, 1.0, tl.load(t_ptr + row))
    lpt = tl.load(lpt_ptr + row)
    thr = float("-inf")
    if HAS_THR:
        thr = tl.where(greedy, float("-inf"), tl.load(thr_ptr + row))
    k0, k1 = _row_keys(tl.load(seed_ptr + row), tl.load(pos_ptr + row))
    base = logits_ptr + row.to(tl.int64) * stride
    lo = chunk * CHUNK
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = lo + tl.arange(0, BLOCK)
    # running max starts finite so that exp(min - max) below never meets -inf - -inf
    m = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    if PREFETCH:
        nxt = tl.load(base + best_idx, mask=best_idx < V, other=float("-inf"))
    for start in range(0, CHUNK, BLOCK):  # the last chunk's tail past V is masked
        offs = lo + start + tl.arange(0, BLOCK)
        if PREFETCH:
            logit = nxt
            nxt = tl.load(base + offs + BLOCK, mask=(offs + BLOCK < V) & (start + BLOCK < CHUNK),
                          other=float("-inf"))
        else:
            logit = tl.load(base + offs, mask=offs < V, other=float("-inf"))
        x = logit
        if t != 1.0:  # uniform per program; dividing by 1 is exact, so T = 1 rows skip it
            x = tl.math.div_rn(logit, t)
        score = x
        if sampled:  # greedy rows skip the hash
            score = x + _gumbel(_hash32(k0, k1, offs), FAST)
        if HAS_THR:
            score = tl.where(x >= thr, score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, offs, best_idx)
        xl = x
        if lpt != t:  # raw_logprob rows
            xl = tl.math.div_rn(logit, lpt)
        hi = tl.maximum(m, xl)
        d = tl.exp(tl.minimum(m, xl) - hi)  # exp(-|xl - m|)
        s = tl.where(xl > m, s * d + 1.0, s + d)
        m = hi
    cbest = tl.max(best, 0)
    cidx = tl.min(tl.where(best == cbest, best_idx, 2147483647), 0)
    cm = tl.max(m, 0)
    cs = tl.sum(s * tl.exp(m - cm), 0)
    out = row * C + chunk
    tl.store(best_ptr + out, cbest)
    tl.store(idx_ptr + out, cidx)
    tl.store(m_ptr + out, cm)
    tl.store(s_ptr + out, cs)


@triton.jit
def _sample_combine_kernel(logits_ptr, stride, lpt_ptr, best_ptr, idx_ptr, m_ptr, s_ptr, tok_ptr, lp_ptr, lse_ptr, C,
                           CP: tl.constexpr, LSE: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CP)
    part = row * C + c
    best = tl.load(best_ptr + part, mask=c < C, other=float("-inf"))
    idx = tl.load(idx_ptr + part, mask=c < C, other=2147483647)
    m = tl.load(m_ptr + part, mask=c < C, other=float("-inf"))
    s = tl.load(s_ptr + part, mask=c < C, other=0.0)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(best == top, idx, 2147483647), 0)
    mm = tl.max(m, 0)
    lse = mm + tl.log(tl.sum(s * tl.exp(m - mm), 0))  # a row of -inf: mm finite, sum 0, lse -inf
    logit = tl.load(logits_ptr + row.to(tl.int64) * stride + tok)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, tl.math.div_rn(logit, tl.load(lpt_ptr + row)) - lse)
    if LSE:
        tl.store(lse_ptr + row, lse)


def sample_triton(logits_SV: torch.Tensor, temperature_S: torch.Tensor, greedy_S: torch.Tensor,
                  threshold_S: torch.Tensor | None, seed_S: torch.Tensor, position_S: torch.Tensor,
                  lp_temperature_S: torch.Tensor, lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64 [S], logprobs fp32 [S]); arguments as rollout.sampler.sample_ref (lse_out: each row's
    logsumexp of logits / lp_temperature, the one its logprob subtracts)."""
    S, V = logits_SV.shape
    assert logits_SV.dtype == torch.float32 and logits_SV.stride(1) == 1, (logits_SV.dtype, logits_SV.stride())
    assert 0 < V < 2**31 - CHUNK, V
    for name, v, dtype in (("temperature", temperature_S, torch.float32), ("greedy", greedy_S, torch.bool),
                           ("threshold", threshold_S, torch.float32), ("seed", seed_S, torch.int64),
                           ("position", position_S, torch.int64), ("lp_temperature", lp_temperature_S, torch.float32)):
        if v is not None:
            assert v.shape == (S,) and v.dtype == dtype and v.is_contiguous(), (name, v.shape, v.dtype, S)
            assert v.device == logits_SV.device, (name, v.device, logits_SV.device)
    C = triton.cdiv(V, CHUNK)
    dev = logits_SV.device
    tokens = torch.empty(S, dtype=torch.int64, device=dev)
    lps = torch.empty(S, dtype=torch.float32, device=dev)
    if S == 0:
        return tokens, lps
    part = torch.empty(3, S, C, dtype=torch.float32, device=dev)
    part_idx = torch.empty(S, C, dtype=torch.int32, device=dev)
    greedy_i8 = greedy_S.view(torch.int8)
    _sample_chunk_kernel[(S, C)](
        logits_SV, logits_SV.stride(0), temperature_S, greedy_i8,
        threshold_S if threshold_S is not None else temperature_S, seed_S, position_S, lp_temperature_S,
        part[0], part_idx, part[1], part[2], V, C,
        CHUNK=CHUNK, BLOCK=BLOCK, HAS_THR=threshold_S is not None, FAST=dev.type == "cuda", PREFETCH=PREFETCH,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if lse_out is not None:
        assert lse_out.shape == (S,) and lse_out.dtype == torch.float32 and lse_out.is_contiguous(), lse_out.shape
    _sample_combine_kernel[(S,)](logits_SV, logits_SV.stride(0), lp_temperature_S, part[0], part_idx, part[1],
                                 part[2], tokens, lps, lse_out if lse_out is not None else lps, C,
                                 CP=triton.next_power_of_2(C), LSE=lse_out is not None)
    return tokens, lps
