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


class StoredWeight:
    """What a module holding a stored weight (`weight`, `weight_scale_inv` or None, `gemm`, `qat`) derives from it
    for the kernels, and the weight it hands `precision.linear` (Linear and FusedLinear)."""

    def _derive(self, layouts: LayoutCache) -> None:
        """The MXFP8 weight's kernel-side layouts, rebuilt in place at the same addresses."""
        if self.weight_scale_inv is None:
            return
        if self.gemm.backend == "flashinfer":
            self.weight_scale_swizzled = layouts.apply("scale_128x4", self.weight_scale_inv,
                                                       out=getattr(self, "weight_scale_swizzled", None))
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


def stack_rows(tensors: list[torch.Tensor], buf: torch.Tensor | None, extra: int = 0) -> torch.Tensor:
    """A buffer holding `tensors` back to back along dim 0, then `extra` more rows, with each tensor (a Parameter)
    pointed at its row range: `buf` itself when they already are, else a new one with their values copied in.
    In-place writes into the Parameters (loading, weight updates) then land in the buffer."""
    sizes = [t.shape[0] for t in tensors] + [extra]
    if (buf is not None and buf.shape[0] == sum(sizes) and buf.shape[1:] == tensors[0].shape[1:]
            and all(t.data_ptr() == v.data_ptr() for t, v in zip(tensors, buf.split(sizes)))):
        return buf
    buf = torch.empty((sum(sizes), *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=tensors[0].device)
    for t, view in zip(tensors, buf.split(sizes)):
        view.copy_(t.detach())
        t.data = view
    return buf


class Linear(StoredWeight, nn.Module):
    """A GEMM through `precision.linear`; storage (bf16/fp32, or MXFP8 e4m3 + E8M0) is decided by the
    storage plan and passed in as `prec` at construction."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, prec: Precision = Precision()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gemm, self.qat = prec.gemm, prec.qat
        self.fused = False  # set by FusedLinear: the storage is a row range of its buffer
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
        """Derive kernel-side layouts from the stored bytes (after load and after every update), in place.
        A part of a `FusedLinear` derives nothing: the fused module does, once, for all its parts."""
        if not self.fused:
            self._derive(layouts)

    def forward(self, x: torch.Tensor, x_qdq: bool = False) -> torch.Tensor:
        return linear(x, self.qweight, self.gemm, x_qdq=x_qdq)


class FusedLinear(StoredWeight, nn.Module):
    """Projections that read the same input, run as one GEMM over their weights stacked along N (sglang's
    fused_qkv_a_proj_with_mqa and gate_up_proj): one launch instead of several, and a narrow projection
    (kv_a_proj's N=576) no longer runs a poorly parallel GEMM of its own (fusion_check.json). The parts keep
    their names and Parameters, so loading, weight updates and get_weights_by_name write them in place as
    before; `postprocess` points their storage at row ranges of one buffer (once; again after the weights
    went to host memory and back) and derives the kernel layouts of the whole. Holds no Parameter itself.
    Use `fuse_linears`, which leaves parts of different storage unfused."""

    def __init__(self, parts: list[Linear]):
        super().__init__()
        self.parts = tuple(parts)  # a tuple: not registered as children, whose names stay the checkpoint's
        self.sizes = [p.out_features for p in parts]
        self.gemm, self.qat = parts[0].gemm, False
        self.weight = self.weight_scale_inv = None
        for p in parts:
            p.fused = True

    def postprocess(self, layouts: LayoutCache) -> None:
        self.weight = stack_rows([p.weight for p in self.parts], self.weight)
        if self.parts[0].weight_scale_inv is not None:
            self.weight_scale_inv = stack_rows([p.weight_scale_inv for p in self.parts], self.weight_scale_inv)
        self._derive(layouts)

    def drop_derived(self) -> None:
        """Forget the buffer too (the parts' views keep their values; the next postprocess stacks them again)."""
        super().drop_derived()
        self.weight = self.weight_scale_inv = None

    def forward(self, x: torch.Tensor, x_qdq: bool = False) -> tuple[torch.Tensor, ...]:
        """Each part's output, as column views of one GEMM's [T, sum N] result; before the first postprocess
        (a model used straight after loading) the parts run one by one."""
        if self.weight is None:
            return tuple(p(x, x_qdq) for p in self.parts)
        return linear(x, self.qweight, self.gemm, x_qdq=x_qdq).split(self.sizes, dim=-1)


def fuse_linears(parts: list[Linear]) -> FusedLinear | None:
    """A FusedLinear over `parts`, or None where they cannot share a GEMM: different storage or GEMM settings,
    different inputs, or a trainer's fake-quantized master weights (which keep their own GEMMs)."""
    keys = {(p.weight.dtype, p.weight_scale_inv is None, p.gemm, p.in_features, p.qat) for p in parts}
    if len(keys) != 1 or parts[0].qat:
        return None
    return FusedLinear(parts)


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
