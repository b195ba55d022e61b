"""RMSNorm whose output is also MXFP8-quantized along D for the MXFP8 GEMM(s) that consume it.

w8a8 GEMMs quantize their activation along K; when the activation is a norm's output, the norm
kernel can emit the quantization too and the GEMM skips its activation pass. This file holds the
pure-torch reference (the model's RMSNorm, then `precision.mxfp8.quantize`); the Triton kernel is
beside it. Quantize-dequantize is idempotent in value, so a w8a8 GEMM on the already
quantize-dequantized activation equals a w8a16 GEMM on it (tests/precision/test_rmsnorm_mxfp8.py).
Legend: T tokens, D normalized (= the GEMM's K) dim.
"""
from __future__ import annotations

import torch

from ..mxfp8 import MXFP8Tensor


def rmsnorm_ref(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """`model.layers.RMSNorm`: fp32 statistics, the normalized value rounded to x's dtype, times the weight."""
    xf = x_TD.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * xf.to(x_TD.dtype)


def rmsnorm_mxfp8_ref(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
                      scale_mode: str = "rceil") -> tuple[torch.Tensor, MXFP8Tensor]:
    """(normed [T, D] in x's dtype, its MXFP8 bytes: e4m3 [T, D] + E8M0 [T, D/32])."""
    y = rmsnorm_ref(x_TD, weight_D, eps)
    return y, MXFP8Tensor.quantize(y, scale_mode)


def normed_candidates(x_TD: torch.Tensor, weight_D: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs an RMSNorm with another fp32 sum order may give: (weight * n-, the reference, weight * n+),
    n the reference's normalized value and n-/n+ its neighbours in x's dtype. A different order moves the
    statistic by a few fp32 ulps, which flips the rounding of a few normalized values by one step; the
    weight can stretch that step to two steps of the output (n at the bottom of its binade, weight * n at
    the top of its own), so "within one ulp of the reference" is not a bound such a kernel can meet."""
    xf = x_TD.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x_TD.dtype)
    inf = torch.full_like(n, float("inf"))
    return weight_D * torch.nextafter(n, -inf), weight_D * n, weight_D * torch.nextafter(n, inf)


def normed_step_mismatch(y_TD: torch.Tensor, x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """Mask of the normed outputs that no neighbour of the reference's normalized value explains (want: none)."""
    lo, ref, hi = normed_candidates(x_TD, weight_D, eps)
    return (y_TD != ref) & (y_TD != lo) & (y_TD != hi)
