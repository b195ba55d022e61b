"""Small building blocks: Linear (GEMM through precision.linear), RMSNorm.

Weights are preallocated once for the engine's lifetime and loaded in place. A Linear stored
MXFP8 holds `weight` (float8_e4m3fn [N, K]) and `weight_scale_inv` (uint8 E8M0 [N, K/32]), the
checkpoint convention's names, so trainer bytes land unchanged. In a trainer's model
(`model.trainable`) the same module holds a high-precision master `weight` instead, which
`precision.linear` fake-quantizes (`QATWeight`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..precision import MXFP8Tensor, Precision, QATWeight, linear
from ..precision.linear import bf16_copy
from ..precision.layout import LayoutCache
from ..precision.mxfp8 import BLOCK
from .ops import add_rmsnorm, add_rmsnorm_qdq, rmsnorm


def frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """A GEMM through `precision.linear`; storage (bf16/fp32, or MXFP8 e4m3 + E8M0) is decided by the
    storage plan and passed in as `prec` at construction."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, prec: Precision = Precision()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gemm, self.qat = prec.gemm, prec.qat
        if prec.mxfp8 and not prec.qat:
            self.weight = frozen(out_features, in_features, dtype=torch.float8_e4m3fn)
            self.weight_scale_inv = frozen(out_features, in_features // BLOCK, dtype=torch.uint8)
        else:
            self.weight = frozen(out_features, in_features, dtype=dtype)
            self.weight_scale_inv = None

    @property
    def k_dims(self) -> tuple[int, ...]:
        return (self.in_features,)

    def postprocess(self, layouts: LayoutCache) -> None:
        """Derive kernel-side layouts from the stored bytes (after load and after every update), in place."""
        if self.gemm.backend == "flashinfer" and self.weight_scale_inv is not None:
            self.weight_scale_swizzled = layouts.apply("scale_128x4", self.weight_scale_inv,
                                                       out=getattr(self, "weight_scale_swizzled", None))
        if self.weight_scale_inv is not None and not self.qat:
            self.weight_bf16 = bf16_copy(MXFP8Tensor(self.weight, self.weight_scale_inv), self.gemm,
                                         out=getattr(self, "weight_bf16", None))

    def drop_derived(self) -> None:
        """Free what `postprocess` derived (weights handed to host memory); the next postprocess rebuilds it."""
        self.weight_scale_swizzled = self.weight_bf16 = None

    @property
    def qweight(self) -> torch.Tensor | MXFP8Tensor | QATWeight:
        if self.qat:
            return QATWeight(self.weight)
        if self.weight_scale_inv is None:
            return self.weight
        return MXFP8Tensor(self.weight, self.weight_scale_inv,
                           swizzled_scale=getattr(self, "weight_scale_swizzled", None),
                           bf16_copy=getattr(self, "weight_bf16", None))

    def forward(self, x: torch.Tensor, x_qdq: bool = False) -> torch.Tensor:
        return linear(x, self.qweight, self.gemm, x_qdq=x_qdq)


def fused_norm_quant(backend: str, consumers: list[Precision]) -> str | None:
    """The one decision whether a producer kernel (a norm, or the MLP's silu*up) also MXFP8-quantizes its output
    for the GEMMs it feeds (returns the scale mode, or None): only with the producer's Triton kernel, whose
    values the fused kernel shares, when every consumer is a stored-MXFP8 w8a8 GEMM on the Triton backend.
    Those GEMMs then skip their activation pass (same values: quantize-dequantize is idempotent). Anything
    else keeps the plain output."""
    fuse = backend == "triton" and bool(consumers) and all(
        p.mxfp8 and not p.qat and p.gemm.backend == "triton" and p.gemm.act_mode == "w8a8" for p in consumers)
    return consumers[0].gemm.scale_mode if fuse else None


class RMSNorm(nn.Module):
    """backend: model.ops.rmsnorm's ("torch" reference, "triton", "flashinfer"); decided at construction.
    qdq_mode (from `fused_norm_quant`): `add_for_gemm` also emits the output's MXFP8 quantize-dequantize,
    and the plain normed output only if `keep_normed` (a high-precision consumer such as the router)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, backend: str = "torch", qdq_mode: str | None = None,
                 keep_normed: bool = True):
        super().__init__()
        self.eps, self.backend, self.qdq_mode, self.keep_normed = eps, backend, qdq_mode, keep_normed
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps, self.backend)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual add fused in front (delta None: no add)."""
        return add_rmsnorm(x, delta, self.weight, self.eps, self.backend)

    def add_for_gemm(self, x: torch.Tensor, delta: torch.Tensor | None):
        """(normed or None, its quantize-dequantize or None, x + delta); the reference path returns no qdq."""
        if self.qdq_mode is None:
            h, s = self.add(x, delta)
            return h, None, s
        return add_rmsnorm_qdq(x, delta, self.weight, self.eps, self.qdq_mode, self.keep_normed)
