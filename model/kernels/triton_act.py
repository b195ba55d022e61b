"""Triton SiLU-and-multiply of an MLP's gate and up projections (model.ops.silu_mul_ref: `F.silu(g) * u`), one
launch instead of torch's two, bit-identical on CUDA.

torch computes silu in fp32, g / (1 + exp(-g)) with the accurate expf and an IEEE division, rounds it to the
input dtype, then multiplies by u in fp32 and rounds again. Here: libdevice's expf, a round-to-nearest
division (`div_rn`; Triton's `/` on fp32 is approximate), the same two roundings. Contiguous inputs (GEMM
outputs), flat blocks of BLOCK elements.
Legend: T tokens, F intermediate width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(g_TF: torch.Tensor, u_TF: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u for contiguous g, u of one bf16/fp16 dtype and shape."""
    assert g_TF.shape == u_TF.shape and g_TF.dtype == u_TF.dtype, (tuple(g_TF.shape), tuple(u_TF.shape))
    assert g_TF.dtype in (torch.bfloat16, torch.float16) and g_TF.is_contiguous() and u_TF.is_contiguous(), (
        g_TF.dtype, g_TF.stride(), u_TF.stride())
    out = torch.empty_like(g_TF)
    n = g_TF.numel()
    if n:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](g_TF, u_TF, out, n, BLOCK=BLOCK, num_warps=4)
    return out
