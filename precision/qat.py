"""The trainer's view of MXFP8: fake quantization (quantize -> dequantize) with a straight-through gradient.

A trainer keeps high-precision master weights and runs each MXFP8 GEMM of the recipe as
`fq(x) @ fq(W).T` in high precision, where `fq` is the exact MXFP8 round trip along K. Its forward
then equals the engine's (which stores the e4m3 + E8M0 bytes of `W` and quantizes `x` the same
way), and its gradient passes through the rounding unchanged (straight-through estimator).
`QATWeight` marks such a master weight, so that `precision.linear.linear` and the grouped-expert
seam send it here, the way `MXFP8Tensor` marks stored bytes.
Legend: T tokens, K in_features (the quantized dim), N out_features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.mxfp8_gemm import fake_quant
from .mxfp8 import BLOCK


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale_mode: str) -> torch.Tensor:
        return fake_quant(x, scale_mode)  # the engine reference's own round trip, so bytes cannot drift

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Identity, not clipped: with rceil no element saturates (amax maps to <= 448), so there is
        # nothing to mask; floor's rare saturation is treated the same way, as TE/torchao do.
        return grad, None


def fake_quant_mxfp8(x: torch.Tensor, scale_mode: str = "rceil", axis: int = -1) -> torch.Tensor:
    """Exact `dequantize(quantize(x))` in x's dtype, blocks of 32 along `axis`; gradient = identity."""
    if axis in (-1, x.dim() - 1):
        return _FakeQuant.apply(x, scale_mode)
    return _FakeQuant.apply(x.transpose(axis, -1), scale_mode).transpose(axis, -1)


@dataclass
class QATWeight:
    """A logical MXFP8 weight [..., N, K] held as its trainable high-precision master (for experts
    [E, N, K]); the forward fake-quantizes it along K with the GEMM's scale rule."""

    master: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.master.shape

    def __getitem__(self, idx) -> "QATWeight":
        """Index leading dims (one expert of a stacked weight); a view, so gradients reach the master."""
        return QATWeight(self.master[idx])


def qat_linear(x_TK: torch.Tensor, w: QATWeight, act_mode: str, scale_mode: str) -> torch.Tensor:
    """y = fq(x) @ fq(W).T (w8a8) or x @ fq(W).T (w8a16), in x's dtype: the engine's torch reference
    MXFP8 GEMM (`mxfp8_gemm_ref`) with the weight's bytes made on the fly, differentiably."""
    w_NK = w.master
    if w_NK.dim() != 2 or x_TK.shape[-1] != w_NK.shape[1] or w_NK.shape[1] % BLOCK:
        raise ValueError(f"qat linear: x has K={x_TK.shape[-1]}, weight is {tuple(w_NK.shape)} "
                         f"(K must match and be a multiple of {BLOCK})")
    lead = x_TK.shape[:-1]
    x2 = x_TK.reshape(-1, x_TK.shape[-1])
    if act_mode == "w8a8":
        x2 = fake_quant_mxfp8(x2, scale_mode)
    # e4m3 x 2^k is exact in bf16/fp32, so fake-quantizing in the master's dtype then casting equals
    # the engine's dequantize straight to x's dtype.
    y = F.linear(x2, fake_quant_mxfp8(w_NK, scale_mode).to(x2.dtype))
    return y.reshape(*lead, w_NK.shape[0])
