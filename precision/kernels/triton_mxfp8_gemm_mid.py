"""Triton MXFP8 GEMM for Hopper at mid M (17..1024 tokens): y = act(x) @ dequant(W)^T.

The decode kernel tiles M by 16-64 rows, so at M = 64..256 every M tile re-reads and
re-dequantizes the whole weight. Here one program's token tile covers up to 256 rows (all of M up
to there), so each weight tile is read from HBM and dequantized once per launch; K is split over
programs (deterministic in-launch reduction, `_write_tile`) when the N tiles alone cannot fill the
GPU. The activation is quantized once per call by a separate pass (or arrives pre-quantized).
Two MMA variants, chosen per M by `mid_config` (the benchmark measures both side by side):
- "bf16": W e4m3 tile dequantized in registers to bf16 (exact), x the bf16 quantize-dequantize of
  the activation (exact); bf16 tensor-core MMA, fp32 accumulate. Numerically the reference's GEMM
  up to fp32 summation order.
- "fp8": e4m3 x e4m3 tensor-core MMA over one 32-wide K block per dot (the MX block), its fp32
  result scaled by both E8M0 block scales (exact powers of two) and added to the fp32
  accumulator: acc += dot(xq_j, wq_j) * sx_j * sw_j. Hopper's fp8 MMA accumulates each 32-product
  block with reduced precision, so this is close to, not equal to, fp32 accumulation: the
  benchmark reports its error against the reference. w8a8 only.
SWAP computes y^T = W x^T: the weight rows fill the MMA's 64-row M side and the tokens its N side
(8..256), which suits small M; the bf16 variant then feeds the dequantized W from registers.
Reference: `mxfp8_gemm.mxfp8_gemm_ref`. Legend: M tokens, N out_features, K in_features;
BM/BN/BK tile sizes (BM tokens, BN weight rows), KB = K / 32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mxfp8 import MXFP8Tensor
from .triton_mxfp8_gemm import (MAX_TILES, _dequant_tile, _e8m0, _split, _split_locks, _write_tile, act_qdq_triton,
                                act_quant_triton)


@triton.jit
def _mid_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, K_PER_SPLIT, NSPLIT, stride_xm,
                stride_ym, stride_ys, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP8: tl.constexpr,
                SWAP: tl.constexpr):
    # program order: the M tiles of one W panel are neighbours (read W from L2 after the first)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    KB = K // 32
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BK):
        k = k_start + k0
        kk = k + tl.arange(0, BK)
        mask_k = kk < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8:  # BK == 32: one block, one scale per row of each operand
            sx = _e8m0(tl.load(xs_ptr + offs_m * KB + k // 32, mask=mask_m & (offs_m * 0 + k < k_end), other=127))
            sw = _e8m0(tl.load(ws_ptr + offs_n * KB + k // 32, mask=mask_n & (offs_n * 0 + k < k_end), other=127))
            if SWAP:
                acc += tl.dot(w, tl.trans(x)) * sw[:, None] * sx[None, :]
            else:
                acc += tl.dot(x, tl.trans(w)) * sx[:, None] * sw[None, :]
        else:
            ss = k // 32 + tl.arange(0, BK // 32)
            s = tl.load(ws_ptr + offs_n[:, None] * KB + ss[None, :],
                        mask=mask_n[:, None] & (ss[None, :] < k_end // 32), other=127)
            wb = _dequant_tile(w, s, BN, BK).to(x.dtype)
            if SWAP:
                acc = tl.dot(wb, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(wb), acc)
    tile = pid_n * tl.num_programs(0) + pid_m
    if SWAP:
        offs = offs_m[None, :] * stride_ym + offs_n[:, None]
        mask = mask_m[None, :] & mask_n[:, None]
    else:
        offs = offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    _write_tile(acc, y_ptr + offs, p_ptr + offs, mask, lock_ptr, tile, pid_k, stride_ys, NSPLIT)


MID_BM_MAX = 256  # token rows per program; larger M takes several M tiles (W then comes from L2)


def mid_config(M: int, N: int, K: int, mma: str = "bf16", swap: bool | None = None) -> dict:
    """Tiles of the mid kernel. Defaults (bf16 MMA; SWAP up to 64 tokens) are unmeasured first picks:
    benchmarks/mxfp8_gemm.py measures every variant per M and prints the best."""
    swap = M <= 64 if swap is None else swap
    bm = min(MID_BM_MAX, max(16 if swap else 64, triton.next_power_of_2(M)))
    if swap:  # weight rows on the MMA's M side: 64 per warpgroup
        bn, warps = (64, 4) if bm <= 64 else (128, 8)
    else:  # tokens on the M side; 8 warps (two warpgroups) from 128 rows on
        bn, warps = (64, 4) if bm <= 64 else (64, 8) if bm >= 256 else (128, 8)
    bk = 32 if mma == "fp8" else (128 if bm * bn <= 64 * 64 else 64)
    stages = 6 if mma == "fp8" else 4
    return dict(PATH="mid", MMA=mma, SWAP=swap, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
                SPLIT_TARGET=1)


def mxfp8_gemm_mid(x_MK: torch.Tensor, w: MXFP8Tensor, act_mode: str = "w8a8", scale_mode: str = "rceil",
                   config: dict | None = None, x_q: MXFP8Tensor | None = None) -> torch.Tensor:
    """y [M, N] in x's dtype. x_MK [M, K] bf16/fp16 contiguous rows; w [N, K] linear-layout scales.
    `x_q`: the activation's MXFP8 bytes when its producer already made them (fp8 MMA, w8a8), which
    skips the activation pass. The bf16 variant on an already quantize-dequantized x runs with
    act_mode="w8a16" (quantize-dequantize is idempotent in value)."""
    M, K = x_MK.shape
    N = w.shape[0]
    cfg = config or mid_config(M, N, K)
    fp8 = cfg["MMA"] == "fp8"
    if fp8 and act_mode != "w8a8":
        raise ValueError("mid MXFP8 GEMM: the fp8 MMA multiplies MXFP8 by MXFP8; act_mode must be 'w8a8'")
    if fp8:
        xq = x_q if x_q is not None else act_quant_triton(x_MK, scale_mode)
        xa, xs = xq.data, xq.scale
    else:
        xa = act_qdq_triton(x_MK, scale_mode) if act_mode == "w8a8" else x_MK
        xs = w.scale  # unused
    split, k_per_split = _split(M, N, K, cfg)
    grid_m, grid_n = triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"])
    if split > 1 and grid_m * grid_n > MAX_TILES:
        split, k_per_split = 1, triton.cdiv(K, cfg["BK"]) * cfg["BK"]
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    partial = torch.empty(split, M, N, dtype=torch.float32, device=x_MK.device) if split > 1 else y
    locks = _split_locks(x_MK.device) if split > 1 else y
    _mid_kernel[(grid_m, grid_n, split)](xa, xs, w.data, w.scale, y, partial, locks, M, N, K, k_per_split, split,
                                         xa.stride(0), N, M * N, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], FP8=fp8,
                                         SWAP=cfg["SWAP"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
