"""Triton split-KV MLA decode over the paged latent cache (absorbed formulation), for small decode batches.

At batch 1..32 FlashInfer's sm90 MLA kernel takes 12-27 us per layer on the moonlight shapes while it
reads 0.3-10 us worth of latents (mla_backend.json, H200): too few CTAs share the work when a batch has
a handful of rows. Here every row's context is split into `splits` contiguous chunks, one program per
(row, chunk, head group); each attends its chunk with an online softmax (fp32 scores and sums, the
probabilities rounded to the cache dtype for the probability x latent MMA, as FlashInfer does) and writes
its normalized partial output and log-sum-exp; a second kernel merges the chunks of each (row, head).
With one split the first kernel writes the output directly. Given W_UV, the merge also applies it
(`_mla_merge_unabsorb_kernel`: MLA.unabsorb's product on the merged latent, rounded to the cache dtype first as
the separate merge stores it; each program takes a block of latent columns and the last to arrive sums the
[V] partials in block order, `_split_last` of the split-K GEMMs), so a decode step's attention ends in per-head
values without another launch.
Measured (mla_triton_small.json, H200, 16 heads, page 16): 1.0-1.7x as fast as FlashInfer's fa3 kernel
at 1..4 rows (batch 1: 8.9-11.1 us vs 10.1-18.4 us over contexts 256..4096), 0.8-1.1x at 8 and 16 rows,
slower above (the chunk loop's MMAs are 16-row mma.sync over latents gathered through registers;
FlashInfer's wgmma pipeline wins once the batch fills the SMs), hence its use for small decode batches only.

The page table is read on the GPU (CSR int32: kv_indptr, kv_indices, kv_lens), so a captured CUDA graph
stays valid when only those buffers change; the split count is fixed per batch size (`decode_splits`),
so a row's bits depend on its batch's size, not on the other rows' contents.
`mla_decode_ref` (fp32 torch) is the reference.
Legend: B rows (one query token each), H heads, C kv_lora_rank, R qk_rope_head_dim, P pages, G page size,
S splits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...precision.kernels.pdl import pdl_args, pdl_wait
from ...precision.kernels.triton_mxfp8_gemm import MAX_TILES, _split_last, _split_locks, _split_sum

MAX_SPLITS = 64


def decode_splits(rows: int, heads: int, sms: int, block_h: int = 16) -> int:
    """Chunks per row: one to two programs per SM over the batch, a power of two in [1, MAX_SPLITS] (the best
    split count of every batch size in mla_triton_sweep.json, H200)."""
    groups = rows * triton.cdiv(heads, block_h)
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(sms, groups))))


@triton.jit
def _mla_decode_split_kernel(q_ptr, q_sb, q_sh, qpe_ptr, qpe_sb, qpe_sh, ckv_ptr, kpe_ptr, indptr_ptr, indices_ptr,
                             lens_ptr, part_ptr, lse_ptr, out_ptr, H, scale_log2,
                             C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    kv_len = tl.load(lens_ptr + b)
    first_page = tl.load(indptr_ptr + b)
    per = tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, kv_len)
    c = tl.arange(0, C)
    r = tl.arange(0, R)
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * q_sb + h[:, None] * q_sh + c[None, :], mask=hm[:, None], other=0.0)
    qpe = tl.load(qpe_ptr + b64 * qpe_sb + h[:, None] * qpe_sh + r[None, :], mask=hm[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, C], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < end
        page = tl.load(indices_ptr + first_page + t // PAGE, mask=tm, other=0).to(tl.int64)
        row = page * PAGE + t % PAGE
        k = tl.load(ckv_ptr + row[:, None] * C + c[None, :], mask=tm[:, None], other=0.0)
        kp = tl.load(kpe_ptr + row[:, None] * R + r[None, :], mask=tm[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k)) + tl.dot(qpe, tl.trans(kp))
        sc = tl.where(tm[None, :], sc * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m = m_new
    live = l > 0  # an empty chunk (context shorter than its start) contributes nothing
    o = acc / tl.where(live, l, 1.0)[:, None]
    if DIRECT:  # one split and no merge: the output itself
        tl.store(out_ptr + (b64 * H + h[:, None]) * C + c[None, :], o.to(out_ptr.dtype.element_ty), mask=hm[:, None])
    else:
        at = (b64 * SPLITS + s) * H + h
        tl.store(part_ptr + at[:, None] * C + c[None, :], o, mask=hm[:, None])
        tl.store(lse_ptr + at, tl.where(live, m + tl.log2(tl.where(live, l, 1.0)), float("-inf")), mask=hm)


@triton.jit
def _merged(part_ptr, lse_ptr, b, h, H, c, C: tl.constexpr, SPLITS: tl.constexpr):
    """fp32 merged latent of (row b, head h) at columns c: the splits' partials weighted by their log-sum-exps.
    Every split's slice is loaded at once: a loop over the splits would wait out one load latency per split."""
    s = tl.arange(0, SPLITS)
    lse = tl.load(lse_ptr + (b * SPLITS + s) * H + h)
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    part = tl.load(part_ptr + ((b * SPLITS + s[:, None]) * H + h) * C + c[None, :])
    return tl.sum(part * w[:, None], 0)


@triton.jit
def _mla_decode_merge_kernel(part_ptr, lse_ptr, out_ptr, H, C: tl.constexpr, SPLITS: tl.constexpr,
                             BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    o = _merged(part_ptr, lse_ptr, b, h, H, c, C, SPLITS)
    tl.store(out_ptr + (b * H + h) * C + c, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _mla_merge_unabsorb_kernel(part_ptr, lse_ptr, w_ptr, w_sh, out_ptr, pv_ptr, lock_ptr, H, V, C: tl.constexpr,
                               SPLITS: tl.constexpr, VP: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr):
    """Program (b, h, c-block): the merged latent of (b, h) over one C-block (rounded to the output dtype, as the
    separate merge stores it) times W_UV[h][:, c-block], an fp32 [V] partial. With several C-blocks the last
    program of (b, h) to arrive sums the partials in C-block order (deterministic) and stores the values."""
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cb = tl.program_id(2)
    NC: tl.constexpr = C // BC
    c = cb * BC + tl.arange(0, BC)
    o = _merged(part_ptr, lse_ptr, b, h, H, c, C, SPLITS).to(out_ptr.dtype.element_ty).to(tl.float32)
    v = tl.arange(0, VP)
    vm = v < V
    wuv = tl.load(w_ptr + h * w_sh + v[:, None] * C + c[None, :], mask=vm[:, None], other=0.0)
    pv = tl.sum(wuv.to(tl.float32) * o[None, :], 1)
    out_ptrs = out_ptr + (b * H + h) * V + v
    if NC == 1:
        tl.store(out_ptrs, pv.to(out_ptr.dtype.element_ty), mask=vm)
    else:
        pv_ptrs = pv_ptr + ((b * H + h) * NC) * VP + v
        tl.store(pv_ptrs + cb * VP, pv)
        if _split_last(lock_ptr, b * H + h, NC):
            tl.store(out_ptrs, _split_sum(pv_ptrs, vm, VP, NC).to(out_ptr.dtype.element_ty), mask=vm)


def mla_decode_triton(q_BHC: torch.Tensor, qpe_BHR: torch.Tensor, ckv_PGC: torch.Tensor, kpe_PGR: torch.Tensor,
                      kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_lens: torch.Tensor, sm_scale: float,
                      splits: int, out: torch.Tensor, block_n: int = 32, num_warps: int = 4,
                      num_stages: int = 2, w_uv_HVC: torch.Tensor | None = None, block_c: int = 128) -> torch.Tensor:
    """out[b, h] = softmax(sm_scale * (q . ckv + qpe . kpe)) @ ckv over row b's first kv_lens[b] cached tokens.
    q / qpe: [B, H, *] with unit inner stride (any row / head strides); caches contiguous [P, G, *]; the page
    table int32 on the GPU, every kv_lens[b] >= 1; out [B, H, C] contiguous, the cache dtype.
    w_uv_HVC: MLA's W_UV [H, V, C] (row stride C), applied in the merge: out is then [B, H, V], the per-head values
    (the splits' partials are merged even for one split; each merge program takes `block_c` latent columns)."""
    B, H, C = q_BHC.shape
    P, G, R = kpe_PGR.shape
    assert ckv_PGC.shape == (P, G, C) and qpe_BHR.shape == (B, H, R), (tuple(ckv_PGC.shape), tuple(qpe_BHR.shape))
    assert q_BHC.stride(2) == 1 and qpe_BHR.stride(2) == 1, (q_BHC.stride(), qpe_BHR.stride())
    V = C if w_uv_HVC is None else w_uv_HVC.shape[1]
    assert ckv_PGC.is_contiguous() and kpe_PGR.is_contiguous() and out.is_contiguous() and out.shape == (B, H, V)
    if w_uv_HVC is not None:
        assert w_uv_HVC.shape == (H, V, C) and w_uv_HVC.stride(1) == C and w_uv_HVC.stride(2) == 1, (
            tuple(w_uv_HVC.shape), w_uv_HVC.stride())
        assert w_uv_HVC.dtype == ckv_PGC.dtype, (w_uv_HVC.dtype, ckv_PGC.dtype)
    dt = ckv_PGC.dtype
    assert q_BHC.dtype == qpe_BHR.dtype == kpe_PGR.dtype == out.dtype == dt, (q_BHC.dtype, qpe_BHR.dtype, dt)
    assert C & (C - 1) == 0 and R & (R - 1) == 0, (C, R)
    assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS, splits
    i32 = torch.int32
    assert kv_indptr.dtype == kv_indices.dtype == kv_lens.dtype == i32 and kv_lens.shape == (B,), (
        kv_indptr.dtype, kv_indices.dtype, kv_lens.dtype, tuple(kv_lens.shape))
    if B == 0:
        return out
    block_h = 16
    if splits == 1 and w_uv_HVC is None:
        part = lse = out  # unused
    else:
        part = torch.empty(B, splits, H, C, dtype=torch.float32, device=out.device)
        lse = torch.empty(B, splits, H, dtype=torch.float32, device=out.device)
    grid = (B, splits, triton.cdiv(H, block_h))
    _mla_decode_split_kernel[grid](q_BHC, q_BHC.stride(0), q_BHC.stride(1), qpe_BHR, qpe_BHR.stride(0),
                                   qpe_BHR.stride(1), ckv_PGC, kpe_PGR, kv_indptr, kv_indices, kv_lens, part, lse, out,
                                   H, sm_scale * math.log2(math.e), C=C, R=R, PAGE=G, SPLITS=splits, BLOCK_H=block_h,
                                   BLOCK_N=block_n, DIRECT=part is out,
                                   num_warps=num_warps, num_stages=num_stages, **pdl_args(out))
    if w_uv_HVC is not None:
        block_c = min(C, block_c)
        VP = triton.next_power_of_2(V)
        pv = torch.empty(B * H, C // block_c, VP, dtype=torch.float32, device=out.device)
        assert B * H <= MAX_TILES, (B, H)
        _mla_merge_unabsorb_kernel[(B, H, C // block_c)](part, lse, w_uv_HVC, w_uv_HVC.stride(0), out, pv,
                                                         _split_locks(out.device), H, V, C=C, SPLITS=splits, VP=VP,
                                                         BC=block_c, num_warps=4, **pdl_args(out))
    elif splits > 1:
        block_c = min(C, 8192 // splits)
        _mla_decode_merge_kernel[(B, H, C // block_c)](part, lse, out, H, C=C, SPLITS=splits, BLOCK_C=block_c,
                                                         num_warps=4, **pdl_args(out))
    return out


def mla_decode_ref(q_BHC: torch.Tensor, qpe_BHR: torch.Tensor, ckv_PGC: torch.Tensor, kpe_PGR: torch.Tensor,
                   kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_lens: torch.Tensor,
                   sm_scale: float) -> torch.Tensor:
    """fp32 [B, H, C]: the same attention, one row at a time."""
    C, R = ckv_PGC.shape[-1], kpe_PGR.shape[-1]
    indptr, indices, lens = kv_indptr.tolist(), kv_indices.long(), kv_lens.tolist()
    out = []
    for b in range(q_BHC.shape[0]):
        pages = indices[indptr[b]:indptr[b + 1]]
        kv = ckv_PGC[pages].reshape(-1, C)[:lens[b]].float()
        pe = kpe_PGR[pages].reshape(-1, R)[:lens[b]].float()
        s = (q_BHC[b].float() @ kv.T + qpe_BHR[b].float() @ pe.T) * sm_scale
        out.append(torch.softmax(s, -1) @ kv)
    return torch.stack(out)
