"""Triton MLA rope: the rotation of one layer's q_pe (all heads) and k_pe in one launch, one program per
token, bit-identical to the reference (model.rope.rotate, applied as model.ops.rope_ref does).

Same fp32 operations in the same order: x1*cos - x2*sin and x2*cos + x1*sin, each product and the
sum rounded to fp32 separately (FMA contraction is switched off for this kernel: a fused multiply-add
rounds once and would differ in the last fp32 bit), then one round-to-nearest cast to the input's
dtype. Interleaved pairs (x0, x1), (x2, x3) come out de-interleaved as [evens | odds], as in the
reference. Inputs are the strided views MLA.forward has (q_pe: a slice of the q projection viewed
[T, H, P+R]; k_pe: a slice of the kv_a projection [T, C+R]); outputs are contiguous.
Legend: T tokens, H heads, R qk_rope_head_dim, R2 = R / 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...precision.kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _rotate(x1, x2, cos, sin, RN: tl.constexpr):
    """(x1*cos - x2*sin, x2*cos + x1*sin) with every product and sum rounded to fp32 on its own. RN: through
    libdevice's _rn operations, which are never contracted into FMAs (for kernels compiled with contraction on);
    else plain operations (this kernel, compiled with it off, and the interpreter, whose numpy rounds each one)."""
    if RN:
        return (libdevice.sub_rn(libdevice.mul_rn(x1, cos), libdevice.mul_rn(x2, sin)),
                libdevice.add_rn(libdevice.mul_rn(x2, cos), libdevice.mul_rn(x1, sin)))
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate_tile(x_ptr, out_ptr, row, cos, sin, i, mask, R2, INTERLEAVE: tl.constexpr, RN: tl.constexpr):
    """Rotate the rows at x_ptr + row (unit inner stride) into contiguous rows at out_ptr."""
    if INTERLEAVE:
        x1 = tl.load(x_ptr + row + 2 * i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + row + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(x_ptr + row + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + row + i + R2, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, cos, sin, RN)
    tl.store(out_ptr + i, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + i + R2, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_token(t, q_ptr, q_st, q_sh, k_ptr, k_st, cos_ptr, sin_ptr, cs_st, qo_ptr, ko_ptr, H, R2,
                HP: tl.constexpr, RP: tl.constexpr, INTERLEAVE: tl.constexpr, RN: tl.constexpr):
    """Token t's q_pe (every head) into contiguous rows at qo_ptr + t * H * R, its k_pe into the row at ko_ptr."""
    i = tl.arange(0, RP)
    im = i < R2
    cos = tl.load(cos_ptr + t * cs_st + i, mask=im, other=0.0)
    sin = tl.load(sin_ptr + t * cs_st + i, mask=im, other=0.0)
    heads = tl.arange(0, HP)[:, None]
    _rotate_tile(q_ptr, qo_ptr + (t * H + heads) * 2 * R2, t * q_st + heads * q_sh, cos[None, :], sin[None, :],
                 i[None, :], (heads < H) & im[None, :], R2, INTERLEAVE, RN)
    _rotate_tile(k_ptr, ko_ptr, t * k_st, cos, sin, i, im, R2, INTERLEAVE, RN)


@triton.jit
def _rope_kernel(q_ptr, q_st, q_sh, k_ptr, k_st, cos_ptr, sin_ptr, cs_st, qo_ptr, ko_ptr, H, R2,
                 HP: tl.constexpr, RP: tl.constexpr, INTERLEAVE: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    _rope_token(t, q_ptr, q_st, q_sh, k_ptr, k_st, cos_ptr, sin_ptr, cs_st, qo_ptr, ko_ptr + t * 2 * R2, H, R2, HP, RP,
                INTERLEAVE, False)


def rope_triton(q_pe_THR: torch.Tensor, k_pe_TR: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                interleave: bool, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q_pe [T, H, R], rotated k_pe [T, R]), contiguous, in the inputs' dtype."""
    T, H, R = q_pe_THR.shape
    cos, sin = cos_sin
    assert k_pe_TR.shape == (T, R) and R % 2 == 0, (tuple(q_pe_THR.shape), tuple(k_pe_TR.shape))
    assert q_pe_THR.dtype == k_pe_TR.dtype and q_pe_THR.dtype in (torch.bfloat16, torch.float16, torch.float32), (
        q_pe_THR.dtype, k_pe_TR.dtype)
    assert q_pe_THR.stride(2) == 1 and k_pe_TR.stride(1) == 1, (q_pe_THR.stride(), k_pe_TR.stride())
    assert cos.shape == sin.shape == (T, R // 2) and cos.dtype == sin.dtype == torch.float32, (cos.shape, cos.dtype)
    assert cos.stride() == sin.stride() and cos.stride(1) == 1, (cos.stride(), sin.stride())
    q_out = torch.empty(T, H, R, dtype=q_pe_THR.dtype, device=q_pe_THR.device)
    k_out = torch.empty(T, R, dtype=k_pe_TR.dtype, device=k_pe_TR.device)
    if T:
        HP, RP = triton.next_power_of_2(H), triton.next_power_of_2(R // 2)
        _rope_kernel[(T,)](q_pe_THR, q_pe_THR.stride(0), q_pe_THR.stride(1), k_pe_TR, k_pe_TR.stride(0), cos, sin,
                           cos.stride(0), q_out, k_out, H, R // 2, HP=HP, RP=RP, INTERLEAVE=bool(interleave),
                           num_warps=num_warps or (1 if HP * RP <= 512 else 2),
                           enable_fp_fusion=False, **pdl_args(q_pe_THR))
    return q_out, k_out
