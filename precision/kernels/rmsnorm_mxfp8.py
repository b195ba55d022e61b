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
