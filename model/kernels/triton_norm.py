"""Triton RMSNorm with the reference's roundings (model.ops.rmsnorm_ref), optionally after the
residual add: one program per row, the row in registers.

s = x + delta rounded to x's dtype (stored: the residual stream), then in fp32
y = round(s * rsqrt(mean(s^2) + eps)) and out = round(y * w). Only the order of the fp32 sum of
squares differs from torch's (fixed per row width, so results do not depend on the batch).
Legend: T rows, D width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...precision.kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _normed_row(x, w_ptr, offs, mask, inv_d, eps, OUT: tl.constexpr):
    """One row's rmsnorm_ref in registers (x: the loaded row, 1-D, zeros past D), in dtype OUT. Shared by every
    kernel whose normed values must be this file's (model.kernels.triton_latent), launched with the same
    BLOCK and warps so that the sum of squares reduces in the same order."""
    xf = x.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, 0) * inv_d + eps)
    y = (xf * r).to(OUT)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    return (y.to(tl.float32) * w.to(tl.float32)).to(OUT)


@triton.jit
def _rmsnorm_kernel(x_ptr, x_stride, d_ptr, d_stride, w_ptr, out_ptr, sum_ptr, D, inv_d, eps,
                    BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    if ADD:
        d = tl.load(d_ptr + row * d_stride + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * D + offs, x, mask=mask)
    tl.store(out_ptr + row * D + offs, _normed_row(x, w_ptr, offs, mask, inv_d, eps, out_ptr.dtype.element_ty),
             mask=mask)


def num_warps_for(D: int) -> int:
    return 4 if D <= 2048 else 8


def _check(x_TD: torch.Tensor, w_D: torch.Tensor) -> tuple[int, int]:
    assert x_TD.dim() == 2 and x_TD.stride(1) == 1, (tuple(x_TD.shape), x_TD.stride())
    T, D = x_TD.shape
    assert w_D.shape == (D,) and w_D.dtype == x_TD.dtype and w_D.is_contiguous(), (tuple(w_D.shape), w_D.dtype)
    assert x_TD.dtype in (torch.bfloat16, torch.float16, torch.float32), x_TD.dtype
    return T, D


def rmsnorm_triton(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_ref(x, w, eps) for rows with unit inner stride (e.g. a split view of a projection)."""
    T, D = _check(x_TD, w_D)
    out = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    if T:
        _rmsnorm_kernel[(T,)](x_TD, x_TD.stride(0), x_TD, x_TD.stride(0), w_D, out, out, D, 1.0 / D, eps,
                              BLOCK=triton.next_power_of_2(D), ADD=False, num_warps=num_warps_for(D), **pdl_args(x_TD))
    return out


def add_rmsnorm_triton(x_TD: torch.Tensor, delta_TD: torch.Tensor, w_D: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm_ref(s, w, eps), s) with s = x + delta in x's dtype."""
    T, D = _check(x_TD, w_D)
    assert delta_TD.shape == x_TD.shape and delta_TD.dtype == x_TD.dtype and delta_TD.stride(1) == 1, (
        tuple(delta_TD.shape), delta_TD.dtype)
    out = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    s = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    if T:
        _rmsnorm_kernel[(T,)](x_TD, x_TD.stride(0), delta_TD, delta_TD.stride(0), w_D, out, s, D, 1.0 / D, eps,
                              BLOCK=triton.next_power_of_2(D), ADD=True, num_warps=num_warps_for(D), **pdl_args(x_TD))
    return out, s
