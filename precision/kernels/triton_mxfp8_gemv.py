"""Triton MXFP8 GEMM for decode-sized M (1..16, usable to 64): y = act(x) @ dequant(W)^T, bandwidth-bound.

At decode the weight is read once and every byte counts: one launch, enough programs to fill every
SM (K split over programs when the N tiles alone cannot), each program's whole K range issued as a
few wide tile loads, no work per weight element beyond its conversion and the multiply-add.
The E8M0 scales are powers of two, so they are applied to 32-element block sums instead of to
every element: y[m, n] = sum_b sx[m, b] * sw[n, b] * sum_{k in b} xq[m, k] * wq[n, k], where wq is
the raw e4m3 value (exact in fp16/bf16/fp32) and xq the activation's e4m3 value (w8a8) or the
activation itself with sx = 1 (w8a16). The products and their fp32 sums are the reference's GEMM
up to fp32 summation order.
Two inner products, chosen per M by `gemv_config` (its table):
- "fma" (M <= 4): the [BN, BK / 32, 32] weight tile is converted to fp32 and multiplied with each
  token row on the CUDA cores; block sums reduce in registers.
- "dot" (M up to 64): one tensor-core MMA per 32-wide K block; fp16 operands for w8a8 (e4m3 values
  are exact in fp16), x's dtype for w8a16; each block's fp32 result is scaled and accumulated.
Split-K partials are summed in split order by the last program of each N tile in the same launch
(`_write_tile`): deterministic. The activation is MXFP8-quantized in registers (recomputed per N
tile: M <= 16 rows of it cost little next to the weight tile), or read pre-quantized (X_FP8) from
`act_quant_triton`'s bytes when the config says so.
Reference: `mxfp8_gemm.mxfp8_gemm_ref`. Legend: M tokens, N out_features, K in_features; BM/BN/BK
tile sizes, KB = K / 32 scale columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mxfp8 import MXFP8Tensor
from .triton_mxfp8_gemm import MAX_TILES, _act_quant, _e8m0, _num_sms, _split_locks, _write_tile, act_quant_triton


@triton.jit
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, stride_ys,
                 K_PER_SPLIT, NSPLIT, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, DOT: tl.constexpr, ACT_QUANT: tl.constexpr, X_FP8: tl.constexpr,
                 FLOOR: tl.constexpr, MMA_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KB = K // 32
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # a multiple of 32: masks below are whole blocks
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K_PER_SPLIT, BK, num_stages=NUM_STAGES):
        k = k_start + k0
        if DOT:
            for j in tl.static_range(BK // 32):
                kj = k + j * 32
                kk = kj + tl.arange(0, 32)
                live = kj < k_end
                w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=mask_n[:, None] & live, other=0.0)
                sw = _e8m0(tl.load(ws_ptr + offs_n * KB + kj // 32, mask=mask_n & live, other=0))
                if X_FP8:
                    xa = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=mask_m[:, None] & live, other=0.0)
                    sx = _e8m0(tl.load(xs_ptr + offs_m * KB + kj // 32, mask=mask_m & live, other=0))
                else:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & live,
                                other=0.0)
                    if ACT_QUANT:
                        q, byte = _act_quant(x.to(tl.float32), BM, 32, FLOOR)
                        xa = tl.reshape(q, (BM, 32))
                        sx = _e8m0(tl.reshape(byte, (BM,)))
                    else:
                        xa = x
                        sx = tl.full((BM,), 1.0, tl.float32)
                part = tl.dot(xa.to(MMA_DTYPE), tl.trans(w.to(tl.float16).to(MMA_DTYPE)))  # e4m3 -> fp16: one cvt, exact
                acc += part * sx[:, None] * sw[None, :]
        else:
            kk = k + tl.arange(0, BK)
            offs_b = k // 32 + tl.arange(0, BK // 32)
            live_b = offs_b < k_end // 32
            w3 = tl.load(w_ptr + offs_n[:, None, None] * K + offs_b[None, :, None] * 32
                         + tl.arange(0, 32)[None, None, :],
                         mask=mask_n[:, None, None] & live_b[None, :, None], other=0.0).to(tl.float32)
            sw = _e8m0(tl.load(ws_ptr + offs_n[:, None] * KB + offs_b[None, :],
                               mask=mask_n[:, None] & live_b[None, :], other=0))
            for m in tl.static_range(BM):
                x = tl.load(x_ptr + m * stride_xm + kk[None, :], mask=(kk[None, :] < k_end) & (m < M), other=0.0)
                if ACT_QUANT:
                    q, byte = _act_quant(x.to(tl.float32), 1, BK, FLOOR)  # [1, BK/32, 32], [1, BK/32]
                    xb = tl.reshape(q.to(tl.float32), (BK // 32, 32))
                    sx = _e8m0(tl.reshape(byte, (BK // 32,)))
                else:
                    xb = tl.reshape(x.to(tl.float32), (BK // 32, 32))
                    sx = tl.full((BK // 32,), 1.0, tl.float32)
                blk = tl.sum(w3 * xb[None, :, :], axis=2)  # [BN, BK/32] block sums, unscaled
                c = tl.sum(blk * sx[None, :] * sw, axis=1)
                acc += tl.where(offs_m[:, None] == m, c[None, :], 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m[:, None] * stride_ym + offs_n[None, :]
    _write_tile(acc, y_ptr + offs, p_ptr + offs, mask, lock_ptr, pid_n, pid_k, stride_ys, NSPLIT)


FMA_MAX_M = 4  # token rows the CUDA-core product takes; above, one tensor-core MMA per K block


def gemv_config(M: int, N: int, K: int, inner: str | None = None, **over) -> dict:
    """Tiles of the decode kernel (UNMEASURED first picks; benchmarks/mxfp8_gemv_check.py times the
    alternatives per shape and M, and this table is to follow its winners).

    | M     | inner | tile                       | why                                            |
    |-------|-------|----------------------------|------------------------------------------------|
    | 1..4  | fma   | BN 32, BK 256, 4 warps     | fp32 FMAs per weight byte <= M: CUDA cores keep |
    |       |       |                            | up with HBM, no 16-row MMA padding              |
    | 5..64 | dot   | BM pow2 >= 16, BN 64, BK 128, | one MMA per 32-K block                       |
    |       |       | 4 warps (8 at BM 64)          |                                              |
    Split-K (`gemv_split`): about WAVES programs per SM, each K range >= one BK, at most MAX_SPLIT
    splits (the last program of a tile reads that many partial tiles).
    `inner` and keyword overrides exist for the benchmark's variants.
    """
    inner = inner or ("fma" if M <= FMA_MAX_M else "dot")
    if inner == "fma":
        cfg = dict(BM=triton.next_power_of_2(M), BN=32, BK=256, num_warps=4, NUM_STAGES=2)
    else:
        bm = max(16, triton.next_power_of_2(M))
        cfg = dict(BM=bm, BN=64, BK=128, num_warps=8 if bm >= 64 else 4, NUM_STAGES=3)  # BM 64 spills at 4 warps
    return {**cfg, "PATH": "gemv", "INNER": inner, "WAVES": 4, "MAX_SPLIT": 16, "X_FP8": False, **over}


def gemv_split(N: int, K: int, cfg: dict) -> tuple[int, int]:
    """(splits, K per split): the one place the decode kernel's reduction order is chosen. Enough
    programs for cfg["WAVES"] per SM, never a split shorter than one BK nor more than MAX_SPLIT; a
    function of the shape, the config and the device's SM count only (so the same on every call)."""
    tiles = triton.cdiv(N, cfg["BN"])
    k_blocks = triton.cdiv(K, cfg["BK"])
    split = max(1, min(triton.cdiv(cfg["WAVES"] * _num_sms(), tiles), k_blocks, cfg["MAX_SPLIT"]))
    if tiles > MAX_TILES:
        split = 1
    k_per_split = triton.cdiv(k_blocks, split) * cfg["BK"]
    return triton.cdiv(K, k_per_split), k_per_split


def mxfp8_gemv(x_MK: torch.Tensor, w: MXFP8Tensor, act_mode: str = "w8a8", scale_mode: str = "rceil",
               config: dict | None = None) -> torch.Tensor:
    """y [M, N] in x's dtype. x_MK [M, K] bf16/fp16 with unit stride along K; w [N, K] linear-layout
    scales, contiguous. Arguments are checked by the caller (`mxfp8_gemm_triton`)."""
    M, K = x_MK.shape
    N = w.shape[0]
    cfg = config or gemv_config(M, N, K)
    if M > cfg["BM"]:
        raise ValueError(f"mxfp8 gemv: M={M} exceeds the config's BM={cfg['BM']}")
    dot = cfg["INNER"] == "dot"
    x_fp8 = dot and cfg["X_FP8"] and act_mode == "w8a8"
    xa, xs = x_MK, w.scale  # xs unused unless x_fp8
    if x_fp8:
        xq = act_quant_triton(x_MK, scale_mode)
        xa, xs = xq.data, xq.scale
    if act_mode == "w8a8":
        mma = tl.float16  # e4m3 values on both sides: exact in fp16
    else:
        mma = tl.float16 if x_MK.dtype == torch.float16 else tl.bfloat16
    split, k_per_split = gemv_split(N, K, cfg)
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    partial = torch.empty(split, M, N, dtype=torch.float32, device=x_MK.device) if split > 1 else y
    locks = _split_locks(x_MK.device) if split > 1 else y
    _gemv_kernel[(triton.cdiv(N, cfg["BN"]), split)](
        xa, xs, w.data, w.scale, y, partial, locks, M, N, K, xa.stride(0), N, M * N, k_per_split, split,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], DOT=dot, ACT_QUANT=act_mode == "w8a8" and not x_fp8,
        X_FP8=x_fp8, FLOOR=scale_mode == "floor", MMA_DTYPE=mma, NUM_STAGES=cfg["NUM_STAGES"],
        num_warps=cfg["num_warps"])
    return y
