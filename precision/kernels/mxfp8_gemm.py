"""MXFP8 GEMM: y[M, N] = act(x)[M, K] @ dequant(W)[N, K]^T, fp32 accumulate, x's dtype out.

`act` is the identity (w8a16) or an MXFP8 quantize-dequantize of x along K with the recipe's
scale rule (w8a8, what the trainer's forward does). This file holds the pure-torch reference
and the backend switch; the Triton sm90 and FlashInfer sm100 kernels live beside it.
Legend: M tokens, N out_features, K in_features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mxfp8 import BLOCK, MXFP8Tensor, dequantize, quantize


def fake_quant(x_MK: torch.Tensor, scale_mode: str) -> torch.Tensor:
    """MXFP8 quantize-dequantize along the last dim, back in x's dtype."""
    return dequantize(*quantize(x_MK, BLOCK, scale_mode), dtype=x_MK.dtype)


def mxfp8_gemm_ref(x_MK: torch.Tensor, w: MXFP8Tensor, act_mode: str, scale_mode: str) -> torch.Tensor:
    if act_mode == "w8a8":
        x_MK = fake_quant(x_MK, scale_mode)
    return F.linear(x_MK, w.dequantize(x_MK.dtype))


def check_gemm_args(x_MK: torch.Tensor, w: MXFP8Tensor) -> None:
    if w.data.dim() != 2:
        raise ValueError(f"mxfp8 gemm: weight must be [N, K], got {tuple(w.shape)}")
    if x_MK.shape[-1] != w.shape[1]:
        raise ValueError(f"mxfp8 gemm: x has K={x_MK.shape[-1]} but weight is {tuple(w.shape)}")
    if w.shape[1] % BLOCK:
        raise ValueError(f"mxfp8 gemm: K={w.shape[1]} must be a multiple of {BLOCK}")
    if x_MK.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"mxfp8 gemm: x dtype {x_MK.dtype} unsupported")
