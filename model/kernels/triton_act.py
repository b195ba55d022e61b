"""Triton SiLU-and-multiply of an MLP's gate and up projections (model.ops.silu_mul_ref: `F.silu(g) * u`), one
launch instead of torch's two, bit-identical on CUDA.

torch computes silu in fp32, g / (1 + exp(-g)) with the accurate expf and an IEEE division, rounds it to the
input dtype, then multiplies by u in fp32 and rounds again. Here: libdevice's expf, a round-to-nearest
division (`div_rn`; Triton's `/` on fp32 is approximate), the same two roundings. Inputs are rows with unit
inner stride (the two halves of a fused gate_up GEMM's output, or contiguous GEMM outputs); the output is
contiguous, walked in flat blocks of BLOCK elements.
Optional `qdq_mode` (an MXFP8 w8a8 down projection consumes the output): the product also goes through the
GEMMs' MXFP8 quantize-dequantize (`_act_qdq`, 32-element blocks along F; F a multiple of 32, so every block of
a flat BLOCK lies in one row) before the store: the bits of `act_qdq_triton(silu_mul(g, u))` in one launch.
Legend: T tokens, F intermediate width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...precision.kernels.pdl import pdl_args, pdl_wait
from ...precision.kernels.triton_mxfp8_gemm import _act_qdq

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, F, stride_g, stride_u, BLOCK: tl.constexpr, QDQ: tl.constexpr,
                     FLOOR: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // F
    col = offs - row * F
    g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g)).to(out_ptr.dtype.element_ty)
    h = (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty)
    if QDQ:  # one row of BLOCK // 32 blocks: the masked tail reads zeros, blocks of its own
        h = tl.reshape(_act_qdq(tl.reshape(h.to(tl.float32), (1, BLOCK)), 1, BLOCK, FLOOR), (BLOCK,))
        h = h.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, h, mask=mask)


def silu_mul_triton(g_TF: torch.Tensor, u_TF: torch.Tensor, qdq_mode: str | None = None) -> torch.Tensor:
    """F.silu(g) * u (contiguous) for [T, F] rows g, u of one bf16/fp16 dtype with unit inner stride; with
    `qdq_mode` ("rceil" / "floor") also MXFP8 quantize-dequantized along the last dim (a multiple of 32)."""
    assert g_TF.shape == u_TF.shape and g_TF.dtype == u_TF.dtype and g_TF.dim() == 2, (tuple(g_TF.shape),
                                                                                        tuple(u_TF.shape))
    assert g_TF.dtype in (torch.bfloat16, torch.float16) and g_TF.stride(1) == 1 and u_TF.stride(1) == 1, (
        g_TF.dtype, g_TF.stride(), u_TF.stride())
    assert qdq_mode in (None, "rceil", "floor") and (qdq_mode is None or g_TF.shape[-1] % 32 == 0), (
        qdq_mode, tuple(g_TF.shape))
    T, F = g_TF.shape
    out = torch.empty(T, F, dtype=g_TF.dtype, device=g_TF.device)
    n = T * F
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g_TF, u_TF, out, n, F, g_TF.stride(0), u_TF.stride(0), BLOCK=BLOCK,
                                                    QDQ=qdq_mode is not None, FLOOR=qdq_mode == "floor", num_warps=4,
                                                    **pdl_args(out))
    return out
