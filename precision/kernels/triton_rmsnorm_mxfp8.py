"""Triton RMSNorm + MXFP8 quantization of its output in one pass (sm90; any CUDA GPU).

One program per row, optionally after the residual add (s = x + delta rounded to x's dtype, stored):
fp32 sum of squares times 1/D, rsqrt, the normalized row rounded to x's dtype and multiplied by the
weight (rounded again, as `rmsnorm_ref`), then the row's 32-element blocks are quantized in
registers with the recipe's scale rule (`_act_quant`, shared with the GEMM kernels). The statistics
are computed as `model.kernels.triton_norm` computes them (same product with 1/D, same row width and
warps), so the normed output is that kernel's, which this one replaces in front of MXFP8 GEMMs; like
it, it differs from torch's reference only by the fp32 sum order, which can move the normalized value
by one rounding step (see `rmsnorm_mxfp8.normed_candidates`).
Outputs, each optional: the normed row (for consumers that stay high precision, e.g. the router),
its e4m3 bytes + E8M0 scales (fp8-MMA GEMMs), its quantize-dequantize in x's dtype (bf16-MMA GEMMs
run it with act_mode="w8a16"). The bytes equal `precision.mxfp8.quantize` of the normed output.
Reference: `rmsnorm_mxfp8.rmsnorm_mxfp8_ref`. Legend: T tokens, D normalized dim, BD = D padded to
a power of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mxfp8 import BLOCK, MXFP8Tensor
from .pdl import pdl_args, pdl_wait
from .triton_mxfp8_gemm import _act_quant, _e8m0


@triton.jit
def _rmsnorm_mxfp8_kernel(x_ptr, dx_ptr, s_out_ptr, w_ptr, y_ptr, q_ptr, s_ptr, d_ptr, D, stride_x, stride_dx,
                          inv_d, eps, BD: tl.constexpr, FLOOR: tl.constexpr, ADD: tl.constexpr,
                          WRITE_Y: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_QDQ: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BD)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:  # the residual stream's next value, rounded once as torch adds
        dx = tl.load(dx_ptr + row * stride_dx + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + dx.to(tl.float32)).to(x.dtype)
        tl.store(s_out_ptr + row * D + offs, x, mask=mask)
    xf = x.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) * inv_d + eps)
    n = (xf * r).to(x.dtype).to(tl.float32)
    y = (tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * n).to(x.dtype)
    if WRITE_Y:
        tl.store(y_ptr + row * D + offs, y, mask=mask)
    q, byte = _act_quant(tl.reshape(y.to(tl.float32), (1, BD)), 1, BD, FLOOR)
    if WRITE_Q:
        tl.store(q_ptr + row * D + offs, tl.reshape(q, (BD,)), mask=mask)
        offs_s = tl.arange(0, BD // 32)
        tl.store(s_ptr + row * (D // 32) + offs_s, tl.reshape(byte, (BD // 32,)).to(tl.uint8), mask=offs_s < D // 32)
    if WRITE_QDQ:
        qdq = tl.reshape(q.to(tl.float32) * _e8m0(byte)[:, :, None], (BD,))
        tl.store(d_ptr + row * D + offs, qdq.to(x.dtype), mask=mask)


def rmsnorm_mxfp8_triton(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, scale_mode: str = "rceil",
                         normed: bool = True, quant: bool = True,
                         qdq: bool = False) -> tuple[torch.Tensor | None, MXFP8Tensor | None, torch.Tensor | None]:
    """(normed [T, D], MXFP8 bytes [T, D] + [T, D/32], quantize-dequantized [T, D]); the outputs not
    asked for are None. x bf16/fp16 with unit stride along D; weight [D] of x's dtype."""
    return _launch(x_TD, weight_D, eps, scale_mode, normed, quant, qdq, None, None)


def add_rmsnorm_mxfp8_triton(x_TD: torch.Tensor, delta_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
                             scale_mode: str = "rceil", normed: bool = True, quant: bool = False, qdq: bool = True):
    """(normed, MXFP8 bytes, quantize-dequantized, s) of s = x + delta rounded to x's dtype
    (`model.ops.add_rmsnorm`); the outputs not asked for are None."""
    s = torch.empty(x_TD.shape, dtype=x_TD.dtype, device=x_TD.device)
    return (*_launch(x_TD, weight_D, eps, scale_mode, normed, quant, qdq, delta_TD, s), s)


def _launch(x_TD, weight_D, eps, scale_mode, normed, quant, qdq, delta_TD, s_TD):
    if x_TD.dim() != 2 or x_TD.stride(-1) != 1:
        raise ValueError(f"rmsnorm_mxfp8: x must be [T, D] with unit stride along D, got {tuple(x_TD.shape)}")
    T, D = x_TD.shape
    if x_TD.dtype not in (torch.bfloat16, torch.float16) or weight_D.dtype != x_TD.dtype:
        raise TypeError(f"rmsnorm_mxfp8: x and weight must share a bf16/fp16 dtype, got {x_TD.dtype}, {weight_D.dtype}")
    if tuple(weight_D.shape) != (D,) or D % BLOCK:
        raise ValueError(f"rmsnorm_mxfp8: weight {tuple(weight_D.shape)} must be [D] with D={D} a multiple of {BLOCK}")
    if delta_TD is not None and (delta_TD.shape != x_TD.shape or delta_TD.dtype != x_TD.dtype
                                 or delta_TD.stride(-1) != 1):
        raise ValueError(f"rmsnorm_mxfp8: delta {tuple(delta_TD.shape)} {delta_TD.dtype} must match x with unit "
                         "stride along D")
    dev = x_TD.device
    y = torch.empty(T, D, dtype=x_TD.dtype, device=dev) if normed else None
    q = MXFP8Tensor(torch.empty(T, D, dtype=torch.float8_e4m3fn, device=dev),
                    torch.empty(T, D // BLOCK, dtype=torch.uint8, device=dev)) if quant else None
    d = torch.empty(T, D, dtype=x_TD.dtype, device=dev) if qdq else None
    if T:
        bd = triton.next_power_of_2(D)
        dummy = x_TD  # never written: its output flag is off
        dx = delta_TD if delta_TD is not None else x_TD
        _rmsnorm_mxfp8_kernel[(T,)](x_TD, dx, s_TD if delta_TD is not None else dummy, weight_D.contiguous(),
                                    y if normed else dummy, q.data if quant else dummy, q.scale if quant else dummy,
                                    d if qdq else dummy, D, x_TD.stride(0), dx.stride(0), 1.0 / D, eps, BD=bd,
                                    FLOOR=scale_mode == "floor", ADD=delta_TD is not None, WRITE_Y=normed,
                                    WRITE_Q=quant, WRITE_QDQ=qdq, num_warps=4 if D <= 2048 else 8, **pdl_args(x_TD))
    return y, q, d
