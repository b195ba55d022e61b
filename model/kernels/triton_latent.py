"""Triton decode-cache write of MLA's latent: kv_a_layernorm of the projected latent (optionally its MXFP8
quantize-dequantize) and the store of it and of the rotated rope key at their cache slots, in one launch
(the torch path, model.ops.store_latent_ref, is a norm kernel and two index copies).

One program per token. The norm is `model.kernels.triton_norm._normed_row` with that kernel's block and
warps, so the stored latent is the bits `rmsnorm_triton` gives. The quantize-dequantize (when a trainer
quantized kv_b_proj's input) reads the stored row back after a block barrier and rounds it in place with
the GEMMs' `_act_qdq`: keeping it out of the norm's registers keeps the 2-D block layout it needs from
reaching the norm's reduction (which would change the fp32 sum order, hence bits).
`latent_absorb_triton` runs the same store in the tail programs of a launch whose first programs absorb q into
latent space (q_nope @ W_UK per head, MLA.absorb): a small decode batch's two pre-attention kernels as one. Given
q_pe and cos/sin, its tail programs also do the rope kernel's work (`triton_rope`, the same bits: each product and
sum rounded on its own through libdevice's _rn operations): three pre-attention kernels as one.
Legend: T tokens, C kv_lora_rank, R qk_rope_head_dim, N cache slots, H heads, P qk_nope_head_dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...precision.kernels.pdl import pdl_args, pdl_wait
from ...precision.kernels.triton_mxfp8_gemm import _act_qdq, _interpreting
from .triton_norm import _normed_row, num_warps_for
from .triton_rope import _rope_token


@triton.jit
def _store_latent_row(row, kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr, ckv_ptr, kpe_ptr, D, R, inv_d, eps,
                      BLOCK: tl.constexpr, RP: tl.constexpr, QDQ: tl.constexpr, FLOOR: tl.constexpr,
                      PE: tl.constexpr):
    """Token `row`'s latent normed into ckv[slot] (then rounded in place when QDQ) and, with PE, its rope key into
    kpe[slot] (the caller stores it otherwise)."""
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(kv_ptr + row * kv_stride + offs, mask=mask, other=0.0)
    tl.store(ckv_ptr + slot * D + offs, _normed_row(x, w_ptr, offs, mask, inv_d, eps, ckv_ptr.dtype.element_ty),
             mask=mask)
    if QDQ:
        tl.debug_barrier()  # the row's other threads' stores are visible to this block past the barrier
        offs2 = tl.arange(0, BLOCK)[None, :]
        y = tl.load(ckv_ptr + slot * D + offs2, mask=offs2 < D, other=0.0)
        tl.store(ckv_ptr + slot * D + offs2, _act_qdq(y.to(tl.float32), 1, BLOCK, FLOOR).to(ckv_ptr.dtype.element_ty),
                 mask=offs2 < D)
    if PE:
        r = tl.arange(0, RP)
        pe = tl.load(pe_ptr + row * pe_stride + r, mask=r < R, other=0.0)
        tl.store(kpe_ptr + slot * R + r, pe.to(kpe_ptr.dtype.element_ty), mask=r < R)


@triton.jit
def _store_latent_kernel(kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr, ckv_ptr, kpe_ptr, D, R, inv_d, eps,
                         BLOCK: tl.constexpr, RP: tl.constexpr, QDQ: tl.constexpr, FLOOR: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    _store_latent_row(tl.program_id(0).to(tl.int64), kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr, ckv_ptr,
                      kpe_ptr, D, R, inv_d, eps, BLOCK, RP, QDQ, FLOOR, True)


@triton.jit
def _latent_absorb_kernel(kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr, ckv_ptr, kpe_ptr, D, R, inv_d, eps,
                          qn_ptr, qn_st, qn_sh, wk_ptr, wk_sh, ql_ptr, T, P,
                          qpe_ptr, qpe_st, qpe_sh, cos_ptr, sin_ptr, cs_st, qpo_ptr, H,
                          BLOCK: tl.constexpr, RP: tl.constexpr, QDQ: tl.constexpr, FLOOR: tl.constexpr,
                          PP: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, ROPE: tl.constexpr,
                          INTERLEAVE: tl.constexpr, RN: tl.constexpr, HP: tl.constexpr, RH: tl.constexpr,
                          PDL: tl.constexpr):
    """Programs [0, H * D / BC): q_lat[:, h, c-block] = q_nope[:, h] @ W_UK[h][:, c-block] (bf16 MMA, fp32 sums, one
    rounding: the absorb bmm's formulation) for every token in blocks of BT; the T programs after them: one
    token's latent store each (_store_latent_row, the store kernel's bits: launched with its warps). ROPE: T more
    programs, one a token, rotate its rope key into the cache and its q_pe (every head) into qpo, as the rope kernel
    does (programs of their own: the store's chain of dependent loads does not grow)."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    nc = tl.cdiv(D, BC)
    n_absorb = tl.num_programs(0) - (2 * T if ROPE else T)
    if ROPE and pid >= n_absorb + T:
        row = (pid - n_absorb - T).to(tl.int64)  # the rope kernel's work for this token, the key into its slot
        slot = tl.load(slots_ptr + row).to(tl.int64)
        _rope_token(row, qpe_ptr, qpe_st, qpe_sh, pe_ptr, pe_stride, cos_ptr, sin_ptr, cs_st, qpo_ptr,
                    kpe_ptr + slot * R, H, R // 2, HP, RH, INTERLEAVE, RN)
    elif pid >= n_absorb:
        _store_latent_row((pid - n_absorb).to(tl.int64), kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr,
                          ckv_ptr, kpe_ptr, D, R, inv_d, eps, BLOCK, RP, QDQ, FLOOR, not ROPE)
    else:
        h = pid // nc
        c = (pid % nc) * BC + tl.arange(0, BC)
        p = tl.arange(0, PP)
        w = tl.load(wk_ptr + h * wk_sh + p[:, None] * D + c[None, :], mask=(p[:, None] < P) & (c[None, :] < D),
                    other=0.0)
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            q = tl.load(qn_ptr + t[:, None].to(tl.int64) * qn_st + h * qn_sh + p[None, :],
                        mask=(t[:, None] < T) & (p[None, :] < P), other=0.0)
            o = tl.dot(q, w)
            tl.store(ql_ptr + (t[:, None].to(tl.int64) * (n_absorb // nc) + h) * D + c[None, :],
                     o.to(ql_ptr.dtype.element_ty), mask=(t[:, None] < T) & (c[None, :] < D))


def _check_store(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, qdq_mode) -> None:
    T, C = kv_TC.shape
    R = k_pe_TR.shape[1]
    assert kv_TC.stride(1) == 1 and k_pe_TR.stride(1) == 1 and k_pe_TR.shape[0] == T, (kv_TC.stride(), k_pe_TR.shape)
    assert ckv_NC.is_contiguous() and kpe_NR.is_contiguous() and ckv_NC.shape[1] == C and kpe_NR.shape[1] == R, (
        tuple(ckv_NC.shape), tuple(kpe_NR.shape))
    dt = kv_TC.dtype
    assert dt in (torch.bfloat16, torch.float16) and ckv_NC.dtype == kpe_NR.dtype == k_pe_TR.dtype == w_C.dtype == dt, (
        dt, ckv_NC.dtype, kpe_NR.dtype, k_pe_TR.dtype, w_C.dtype)
    assert w_C.shape == (C,) and w_C.is_contiguous() and slots_T.shape == (T,), (tuple(w_C.shape), tuple(slots_T.shape))
    assert qdq_mode in (None, "rceil", "floor") and (qdq_mode is None or C % 32 == 0), (qdq_mode, C)


def store_latent_triton(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                        k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, qdq_mode: str | None) -> None:
    """ckv[slots] = rmsnorm(kv) (then its MXFP8 quantize-dequantize along C if qdq_mode), kpe[slots] = k_pe.
    kv and k_pe: rows with unit inner stride (kv a split view of the projection); caches contiguous, of kv's
    dtype; slots distinct except on a scratch slot whose content is never read."""
    T, C = kv_TC.shape
    R = k_pe_TR.shape[1]
    _check_store(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, qdq_mode)
    if T:
        _store_latent_kernel[(T,)](kv_TC, kv_TC.stride(0), k_pe_TR, k_pe_TR.stride(0), w_C, slots_T, ckv_NC, kpe_NR,
                                   C, R, 1.0 / C, eps, BLOCK=triton.next_power_of_2(C), RP=triton.next_power_of_2(R),
                                   QDQ=qdq_mode is not None, FLOOR=qdq_mode == "floor",
                                   num_warps=num_warps_for(C), **pdl_args(kv_TC))


def latent_absorb_triton(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                         k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, qdq_mode: str | None,
                         q_nope_THP: torch.Tensor, w_uk_HPC: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = None
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`store_latent_triton` (the same bits) and MLA's absorb, q_lat [T, H, C] = q_nope @ W_UK per head
    (contiguous; the bmm's values up to the fp32 sum order), in one launch: the decode step's two small
    pre-attention kernels as one. q_nope: [T, H, P] with unit inner stride; W_UK: [H, P, C] rows of kv_b_proj
    (row stride C).
    rope: (q_pe [T, H, R] with unit inner stride, cos, sin [T, R/2] fp32, interleave): k_pe is then the key before
    its rotation, and the launch also does the rope kernel's work (`rope_triton`, the same bits): the rotated key
    goes into the cache, and (q_lat, the rotated q_pe [T, H, R] contiguous in q_pe's dtype) is returned."""
    T, C = kv_TC.shape
    H, P, C2 = w_uk_HPC.shape
    R = k_pe_TR.shape[1]
    assert C2 == C and q_nope_THP.shape == (T, H, P) and q_nope_THP.stride(2) == 1, (
        tuple(w_uk_HPC.shape), tuple(q_nope_THP.shape), q_nope_THP.stride())
    assert w_uk_HPC.stride(1) == C and w_uk_HPC.stride(2) == 1, w_uk_HPC.stride()
    assert q_nope_THP.dtype == w_uk_HPC.dtype == kv_TC.dtype, (q_nope_THP.dtype, w_uk_HPC.dtype, kv_TC.dtype)
    _check_store(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, qdq_mode)
    q_lat = torch.empty(T, H, C, dtype=kv_TC.dtype, device=kv_TC.device)
    if rope is not None:
        q_pe, cos, sin, interleave = rope
        assert q_pe.shape == (T, H, R) and q_pe.stride(2) == 1 and R % 2 == 0, (tuple(q_pe.shape), q_pe.stride())
        assert cos.shape == sin.shape == (T, R // 2) and cos.dtype == sin.dtype == torch.float32, (cos.shape, cos.dtype)
        assert cos.stride() == sin.stride() and cos.stride(1) == 1, (cos.stride(), sin.stride())
        q_pe_out = torch.empty(T, H, R, dtype=q_pe.dtype, device=q_pe.device)
        rope_args = (q_pe, q_pe.stride(0), q_pe.stride(1), cos, sin, cos.stride(0), q_pe_out)
    else:
        interleave, q_pe_out = False, None
        rope_args = (kv_TC, 0, 0, kv_TC, kv_TC, 0, kv_TC)  # unused
    if T:
        BC = min(64, max(16, triton.next_power_of_2(C)))
        _latent_absorb_kernel[(H * triton.cdiv(C, BC) + (2 * T if rope is not None else T),)](
            kv_TC, kv_TC.stride(0), k_pe_TR, k_pe_TR.stride(0), w_C, slots_T, ckv_NC, kpe_NR, C, R,
            1.0 / C, eps, q_nope_THP, q_nope_THP.stride(0), q_nope_THP.stride(1), w_uk_HPC, w_uk_HPC.stride(0), q_lat,
            T, P, *rope_args, H, BLOCK=triton.next_power_of_2(C), RP=triton.next_power_of_2(R),
            QDQ=qdq_mode is not None, FLOOR=qdq_mode == "floor", PP=max(16, triton.next_power_of_2(P)), BC=BC, BT=16,
            ROPE=rope is not None, INTERLEAVE=bool(interleave), RN=not _interpreting(),
            HP=triton.next_power_of_2(H), RH=triton.next_power_of_2(max(1, R // 2)),
            num_warps=num_warps_for(C), **pdl_args(kv_TC))
    return q_lat if rope is None else (q_lat, q_pe_out)
