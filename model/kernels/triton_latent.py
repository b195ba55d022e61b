"""Triton decode-cache write of MLA's latent: kv_a_layernorm of the projected latent (optionally its MXFP8
quantize-dequantize) and the store of it and of the rotated rope key at their cache slots, in one launch
(the torch path, model.ops.store_latent_ref, is a norm kernel and two index copies).

One program per token. The norm is `model.kernels.triton_norm._normed_row` with that kernel's block and
warps, so the stored latent is the bits `rmsnorm_triton` gives. The quantize-dequantize (when a trainer
quantized kv_b_proj's input) reads the stored row back after a block barrier and rounds it in place with
the GEMMs' `_act_qdq`: keeping it out of the norm's registers keeps the 2-D block layout it needs from
reaching the norm's reduction (which would change the fp32 sum order, hence bits).
Legend: T tokens, C kv_lora_rank, R qk_rope_head_dim, N cache slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...precision.kernels.triton_mxfp8_gemm import _act_qdq
from .triton_norm import _normed_row, num_warps_for


@triton.jit
def _store_latent_kernel(kv_ptr, kv_stride, pe_ptr, pe_stride, w_ptr, slots_ptr, ckv_ptr, kpe_ptr, D, R, inv_d, eps,
                         BLOCK: tl.constexpr, RP: tl.constexpr, QDQ: tl.constexpr, FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
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
    r = tl.arange(0, RP)
    pe = tl.load(pe_ptr + row * pe_stride + r, mask=r < R, other=0.0)
    tl.store(kpe_ptr + slot * R + r, pe.to(kpe_ptr.dtype.element_ty), mask=r < R)


def store_latent_triton(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                        k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, qdq_mode: str | None) -> None:
    """ckv[slots] = rmsnorm(kv) (then its MXFP8 quantize-dequantize along C if qdq_mode), kpe[slots] = k_pe.
    kv and k_pe: rows with unit inner stride (kv a split view of the projection); caches contiguous, of kv's
    dtype; slots distinct except on a scratch slot whose content is never read."""
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
    if T:
        _store_latent_kernel[(T,)](kv_TC, kv_TC.stride(0), k_pe_TR, k_pe_TR.stride(0), w_C, slots_T, ckv_NC, kpe_NR,
                                   C, R, 1.0 / C, eps, BLOCK=triton.next_power_of_2(C), RP=triton.next_power_of_2(R),
                                   QDQ=qdq_mode is not None, FLOOR=qdq_mode == "floor", num_warps=num_warps_for(C))
