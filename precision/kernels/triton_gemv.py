"""Triton GEMV for decode (1..4 tokens) on sm90: y[M, N] = act(x)[M, K] @ W[N, K]^T, bf16 or MXFP8 W.

A program owns BN whole rows of W (all of K) and keeps them in registers: it issues every weight load first,
then waits for the previous kernel (`pdl_wait`: under programmatic dependent launch the weight stream overlaps
the kernel before it, which the weights do not depend on), then reads x and reduces. fp32 products and sums:
bf16 W x bf16 x products are exact in fp32; MXFP8 W sums each 32-wide block's products of e4m3 bytes and x, then
scales the block sum by its E8M0 power of two (exact) and sums the blocks. The sum order is the kernel's own
(fp32 tree reductions), fixed per shape: same inputs -> same bits; against the reference, fp32 summation noise.
w8a8: x is MXFP8 quantize-dequantized along K inside the kernel (each program redoes it: x is a few KB).
Reference: `torch.nn.functional.linear` (bf16 W) and `mxfp8_gemm.mxfp8_gemm_ref` (MXFP8 W).
Legend: M tokens (<= MAX_M), N out_features, K in_features; KP: K rounded up to a power of two; BN rows per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mxfp8 import BLOCK, MXFP8Tensor
from .pdl import pdl_args, pdl_wait
from .triton_mxfp8_gemm import _act_qdq, _e8m0

MAX_M = 4
# The dispatch (`precision.linear`) sends products of up to this many tokens here (0: never). gemv_20261201a.json
# (H200, per call in a CUDA graph, L2 flushed): at 1 token faster than cuBLAS bf16 on all 7 shapes (moonlight
# qkv_a 7.0 -> 5.8 us, o_proj 6.2 -> 3.6, dense gate_up 26.5 -> 24.9, down 17.2 -> 14.8, lm_head 183 -> 172;
# deepseek-v3 q_a+kv_a 14.2 -> 9.9, o_proj 70.4 -> 64.0); at 2 tokens a tie or slower for K >= 7168, at 4 tokens
# slower on 5 of 7. Time grows with the tokens (gemv_20261201c_variants.json: deepseek-v3 o_proj MXFP8 43 / 91 / 157
# us at 1 / 2 / 4), consistent with x's re-reads (every program reads all M rows of x, M x K x 2 bytes, against its
# BN x K of weight; BN = 1 at K >= 8192) bounding it; ptxas shows no spills. Tried and removed: a variant with BN
# rows over K in chunks, every token a chunk (1.3-5.9x slower at every shape and token count, same file).
SERVE_MAX_M = 1
QUANT_X_MAX_K = 8192
# weight elements a program holds (BN * KP): 64 registers a thread at 4 warps for bf16. Measured 4096 vs 8192
# (gemv_20261201a.json: 8192 faster on every K=2048 shape, e.g. MXFP8 q+kv_a 4.26 -> 3.48 us, as each program reads
# x once for BN rows). MXFP8 at 16384 (the same 16 KB a program as bf16): 3-8% faster alone on K=2048 shapes
# (gemv_20261201c_variants.json), the engine's batch-1 step unchanged (1.81 vs 1.81 ms, throughput_20261201w_*):
# 8192 kept.
TILE_ELEMS_BF16 = 8192
TILE_ELEMS_FP8 = 8192
# MXFP8 from K = 4097 (KP 8192: one row a program at 8192 elements, two at most): 32768 elements, 8 warps (64-80
# registers, no spills, ptxas sm_90a). gemv_20261202_large_k.json (H200, one token, same run, vs the 8192-element
# config): deepseek-v3 q_a + kv_a (K 7168) 7.57 -> 6.52 us, o_proj (K 16384) 46.06 -> 37.97, moonlight's dense
# down_proj (K 11264) 13.08 -> 11.02; bf16 lost at 32768 (o_proj 64.75 -> 71.44, dense down 14.81 -> 18.59).
TILE_ELEMS_FP8_LARGE_K = 32768
LARGE_KP = 8192


@triton.jit
def _load_rows(w_ptr, s_ptr, rows, mask_rows, K, KP: tl.constexpr, QUANT_W: tl.constexpr):
    """Whole rows [len(rows), KP] of a row-major [*, K] weight (columns past K read 0) and, for MXFP8, their E8M0
    bytes [len(rows), KP // 32] (127, a scale of 1, past K)."""
    kk = tl.arange(0, KP)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + kk[None, :], mask=mask_rows[:, None] & (kk < K)[None, :],
                other=0.0, eviction_policy="evict_first")
    s = w
    if QUANT_W:
        ss = tl.arange(0, KP // 32)
        s = tl.load(s_ptr + rows[:, None].to(tl.int64) * (K // 32) + ss[None, :],
                    mask=mask_rows[:, None] & (ss < K // 32)[None, :], other=127)
    return w, s


@triton.jit
def _row_dots(w, s, x, BN: tl.constexpr, KP: tl.constexpr, QUANT_W: tl.constexpr):
    """fp32 [BN] = rows of w (scales s when QUANT_W) . x [KP]: exact products, fp32 sums; MXFP8 per 32-wide block
    first, each block sum times its power-of-two scale, then over the blocks."""
    p = w.to(tl.float32) * x[None, :]
    if QUANT_W:
        return tl.sum(tl.sum(tl.reshape(p, (BN, KP // 32, 32)), axis=2) * _e8m0(s), axis=1)
    return tl.sum(p, axis=1)


@triton.jit
def _load_x(x_ptr, K, KP: tl.constexpr, QUANT_X: tl.constexpr, FLOOR: tl.constexpr):
    """fp32 [KP] row at x_ptr (0 past K), MXFP8 quantize-dequantized along K when QUANT_X."""
    kk = tl.arange(0, KP)
    x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    if QUANT_X:
        x = tl.reshape(_act_qdq(x[None, :], 1, KP, FLOOR), (KP,))
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_ym, M: tl.constexpr, BN: tl.constexpr,
                 KP: tl.constexpr, QUANT_W: tl.constexpr, QUANT_X: tl.constexpr, FLOOR: tl.constexpr,
                 PDL: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    w, s = _load_rows(w_ptr, s_ptr, rows, rows < N, K, KP, QUANT_W)
    pdl_wait(PDL)  # the weights above do not depend on the previous kernel: their loads are already in flight
    for m in tl.static_range(M):
        y = _row_dots(w, s, _load_x(x_ptr + m * stride_xm, K, KP, QUANT_X, FLOOR), BN, KP, QUANT_W)
        tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv_config(N: int, K: int, quant: bool) -> dict:
    """BN rows a program: TILE_ELEMS_* weight elements (at least one row), 4 warps (8 past K = 8192); MXFP8 from KP
    LARGE_KP: TILE_ELEMS_FP8_LARGE_K elements, 8 warps."""
    KP = triton.next_power_of_2(K)
    if quant and KP >= LARGE_KP:
        return dict(BN=max(1, TILE_ELEMS_FP8_LARGE_K // KP), num_warps=8)
    return dict(BN=max(1, (TILE_ELEMS_FP8 if quant else TILE_ELEMS_BF16) // KP), num_warps=4 if KP <= 8192 else 8)


def gemv_serves(x_MK: torch.Tensor, w_NK: torch.Tensor | MXFP8Tensor, quant_x: bool = False) -> bool:
    """Whether the dispatch sends this product here: 1..SERVE_MAX_M rows of bf16/fp16 x with unit stride along K,
    K <= 16384, a contiguous weight (MXFP8: K a multiple of 32). `quant_x` (w8a8 on an input not yet quantized):
    K <= QUANT_X_MAX_K, as every program quantizes x again (gemv_20261201b.json: deepseek-v3 o_proj, K=16384,
    70.2 us against the decode kernel's 55.5; moonlight's dense down_proj, K=11264, 20.2 against 18.1)."""
    K = x_MK.shape[-1]
    if quant_x and K > QUANT_X_MAX_K:
        return False
    w = w_NK.data if isinstance(w_NK, MXFP8Tensor) else w_NK
    return (x_MK.dim() == 2 and 1 <= x_MK.shape[0] <= min(SERVE_MAX_M, MAX_M) and x_MK.stride(-1) == 1
            and K <= 16384 and x_MK.dtype in (torch.bfloat16, torch.float16) and w.is_contiguous()
            and (not isinstance(w_NK, MXFP8Tensor) or (K % BLOCK == 0 and w_NK.scale.is_contiguous())))


def gemv_triton(x_MK: torch.Tensor, w_NK: torch.Tensor | MXFP8Tensor, out_dtype: torch.dtype | None = None,
                act_mode: str = "w8a16", scale_mode: str = "rceil", config: dict | None = None) -> torch.Tensor:
    """y = act(x) @ W^T in `out_dtype` (default x's dtype) for x of 1..MAX_M rows. act_mode "w8a8" (MXFP8 W only)
    quantize-dequantizes x along K first, as `mxfp8_gemm_ref` does."""
    M, K = x_MK.shape
    quant = isinstance(w_NK, MXFP8Tensor)
    w = w_NK.data if quant else w_NK
    N = w.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemv: x has {M} rows; this kernel takes 1..{MAX_M}")
    if tuple(w.shape) != (N, K) or not w.is_contiguous():
        raise ValueError(f"gemv: weight {tuple(w.shape)} must be a contiguous [N, {K}]")
    if quant and K % BLOCK:
        raise ValueError(f"gemv: MXFP8 weights need K ({K}) a multiple of {BLOCK}")
    if act_mode == "w8a8" and not quant:
        raise ValueError("gemv: w8a8 quantizes x for MXFP8 weights only")
    if x_MK.stride(1) != 1:
        raise ValueError("gemv: x must have unit stride along K")
    cfg = dict(config or gemv_config(N, K, quant))
    BN = cfg.pop("BN")
    y = torch.empty(M, N, dtype=out_dtype or x_MK.dtype, device=x_MK.device)
    s = w_NK.scale if quant else w
    flags = dict(QUANT_W=quant, QUANT_X=act_mode == "w8a8", FLOOR=scale_mode == "floor", **cfg, **pdl_args(x_MK))
    _gemv_kernel[(triton.cdiv(N, BN),)](x_MK, w, s, y, N, K, x_MK.stride(0), y.stride(0), M=M, BN=BN,
                                        KP=triton.next_power_of_2(K), **flags)
    return y
