"""Triton MXFP8 GEMM for Hopper (sm90): y = act(x) @ dequant(W)^T.

W is read from HBM as e4m3 bytes + E8M0 scales and dequantized in registers to bf16 (exact);
the MMA is bf16 with fp32 accumulation (Hopper has no MX-scaled MMA). For w8a8 the activation
tile is MXFP8 quantize-dequantized in registers along K with the recipe's rule, bit-exact with
`precision.mxfp8.quantize` for bf16/fp16 inputs (the scale byte is computed from amax's
exponent bits, which equals torch's ceil(log2(amax / 448)) for every bf16/fp16 value).
Paths, chosen by `pick_config` (its table):
- decode / small M (<= 16): the fused kernel; K is split over several programs when the grid would
  not fill the GPU, and the last program of each tile sums the partials in split order in the same
  launch (deterministic); big weights quantize activations in a separate tiny pass first.
- mid M (17..1024): `triton_mxfp8_gemm_mid`, one token tile per weight tile (W read and dequantized
  once per launch), bf16 or fp8 block-scaled MMA.
- M > 1024 (compute-bound): W is dequantized once to bf16 (exact), activations are
  quantize-dequantized by a Triton pass, and cuBLAS runs the bf16 GEMM (fp32 accumulate).
The in-register pieces every kernel shares are the `@triton.jit` helpers below (E8M0 decode, tile
dequantize, activation quantize, split-K epilogue).
Reference: `mxfp8_gemm.mxfp8_gemm_ref`.
Legend: M tokens, N out_features, K in_features; BM/BN/BK tile sizes.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..mxfp8 import BLOCK, MXFP8Tensor
from .mxfp8_gemm import check_gemm_args


@triton.jit
def _e8m0(s):
    """E8M0 bytes -> fp32 2^(byte - 127) (byte 0 reads as 0.0: rceil blocks with byte 0 hold only zeros)."""
    return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dequant_tile(w, s, BN: tl.constexpr, BK: tl.constexpr):
    """fp32 [BN, BK] from e4m3 [BN, BK] and its E8M0 bytes [BN, BK // 32] (exact)."""
    return tl.reshape(tl.reshape(w.to(tl.float32), (BN, BK // 32, 32)) * _e8m0(s)[:, :, None], (BN, BK))


@triton.jit
def _tile_scales(ws_ptr, offs_n, stride_wsn, k, k_end, mask_n, BK: tl.constexpr):
    """E8M0 bytes [BN, BK // 32] of the weight tile of rows offs_n at k (127 from k_end on). The loops fetch them a
    step ahead of their tile: the pipeliner stages the tiles' own loads but not these, and a byte load issued beside
    its use stalls every step for a global-memory round trip."""
    ss = k // 32 + tl.arange(0, BK // 32)
    return tl.load(ws_ptr + offs_n[:, None] * stride_wsn + ss[None, :],
                   mask=mask_n[:, None] & (ss[None, :] < k_end // 32), other=127)


@triton.jit
def _act_quant(x, BM: tl.constexpr, BK: tl.constexpr, FLOOR: tl.constexpr):
    """MXFP8 quantization of an fp32 [BM, BK] tile along K, 32-element blocks (bf16/fp16-valued input):
    (e4m3 [BM, BK // 32, 32], E8M0 bytes as int32 [BM, BK // 32])."""
    xb = tl.reshape(x, (BM, BK // 32, 32))
    amax = tl.max(tl.abs(xb), axis=2)
    bits = amax.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    if FLOOR:
        byte = tl.minimum(tl.maximum(exp - 8, 0), 255)
        qmul = ((254 - tl.maximum(byte, 1)) << 23).to(tl.float32, bitcast=True)  # 1 / max(2^(b-127), 2^-126)
    else:
        byte = exp - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # ceil(log2(amax / 448))
        byte = tl.minimum(tl.maximum(byte, 0), 254)
        qmul = tl.where(byte == 0, 1.0, ((254 - byte) << 23).to(tl.float32, bitcast=True))
    q = tl.clamp(xb * qmul[:, :, None], -448.0, 448.0).to(tl.float8e4nv)
    return q, byte


@triton.jit
def _act_qdq(x, BM: tl.constexpr, BK: tl.constexpr, FLOOR: tl.constexpr):
    """MXFP8 quantize-dequantize of an fp32 [BM, BK] tile along K, 32-element blocks."""
    q, byte = _act_quant(x, BM, BK, FLOOR)
    return tl.reshape(q.to(tl.float32) * _e8m0(byte)[:, :, None], (BM, BK))


@triton.jit
def _split_last(lock_ptr, tile, NSPLIT):
    """Split-K arrival, after this program stored its fp32 partial: True for the last of the tile's NSPLIT
    programs to arrive (it then sums the partials), which also resets the counter to 0 for the next call."""
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == NSPLIT - 1
    if last:
        tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _split_sum(p_ptrs, mask, stride_ys, NSPLIT):
    """The NSPLIT fp32 partials at p_ptrs + i * stride_ys summed in split order (deterministic)."""
    total = tl.zeros(p_ptrs.shape, dtype=tl.float32)
    for i in range(NSPLIT):
        total += tl.load(p_ptrs + i * stride_ys, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _split_sum_unrolled(p_ptrs, mask, stride_ys, NSPLIT: tl.constexpr, CACHE: tl.constexpr):
    """`_split_sum` for a compile-time NSPLIT (a few partials): the same order, so the same bits, its loads issued
    together. CACHE: their cache modifier (".cg" for partials this launch's other programs wrote, "" for an
    earlier launch's)."""
    total = tl.zeros(p_ptrs.shape, dtype=tl.float32)
    for i in tl.static_range(NSPLIT):
        total += tl.load(p_ptrs + i * stride_ys, mask=mask, other=0.0, cache_modifier=CACHE)
    return total


@triton.jit
def _write_tile(acc, y_ptrs, p_ptrs, mask, lock_ptr, tile, pid_k, stride_ys, NSPLIT):
    """Store an fp32 tile; with split-K (NSPLIT > 1) without a second launch: every split writes its
    fp32 partial, the last one to arrive (per-tile counter) sums all partials in split order --
    deterministic -- and stores the sum."""
    if NSPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptrs + pid_k * stride_ys, acc, mask=mask)
        if _split_last(lock_ptr, tile, NSPLIT):
            tl.store(y_ptrs, _split_sum(p_ptrs, mask, stride_ys, NSPLIT).to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _mxfp8_gemm_kernel(x_ptr, w_ptr, w_desc, ws_ptr, y_ptr, p_ptr, lock_ptr, M, N, K, stride_xm, stride_wn, stride_wsn,
                       stride_ym, stride_ys, K_PER_SPLIT: tl.constexpr, NSPLIT: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACT_QUANT: tl.constexpr,
                       FLOOR: tl.constexpr, GROUP_M: tl.constexpr, GATHER_SCALES: tl.constexpr = False,
                       STREAM_W: tl.constexpr = False, USE_TMA: tl.constexpr = False,
                       MMA_DTYPE: tl.constexpr = tl.bfloat16):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # grouped ordering: programs sharing a W column panel run together (L2 reuse at large M)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    s_next = _tile_scales(ws_ptr, offs_n, stride_wsn, k_start, k_end, mask_n, BK)
    for k0 in range(0, K_PER_SPLIT, BK):
        k = k_start + k0
        kk = k + offs_k
        mask_k = kk < k_end
        s = s_next
        if not GATHER_SCALES:
            s_next = _tile_scales(ws_ptr, offs_n, stride_wsn, k + BK, k_end, mask_n, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        if ACT_QUANT:
            x = _act_qdq(x.to(tl.float32), BM, BK, FLOOR)
        x = x.to(MMA_DTYPE)
        if USE_TMA:  # bulk tensor copy of the fp8 tile; out-of-bounds rows/cols arrive as zeros
            w = w_desc.load([pid_n * BN, k])
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0,
                        eviction_policy="evict_first" if STREAM_W else "")
        if GATHER_SCALES:  # one scale byte per element, 32 lanes share an address (L1 broadcast)
            s = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + kk[None, :] // 32,
                        mask=mask_n[:, None] & mask_k[None, :], other=127)
            wb = (w.to(tl.float32) * _e8m0(s)).to(MMA_DTYPE)
        else:
            wb = _dequant_tile(w, s, BN, BK).to(MMA_DTYPE)
        acc = tl.dot(x, tl.trans(wb), acc)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    p_ptrs = p_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    _write_tile(acc, y_ptrs, p_ptrs, mask_mn, lock_ptr, pid, pid_k, stride_ys, NSPLIT)


@triton.jit
def _act_qdq_kernel(x_ptr, y_ptr, M, K, stride_xm, stride_ym, BM: tl.constexpr, BK: tl.constexpr,
                    FLOOR: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    y = _act_qdq(x.to(tl.float32), BM, BK, FLOOR)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BM: tl.constexpr, BK: tl.constexpr,
                      FLOOR: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    offs_s = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    q, byte = _act_quant(x.to(tl.float32), BM, BK, FLOOR)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], tl.reshape(q, (BM, BK)), mask=mask)
    tl.store(s_ptr + offs_m[:, None] * (K // 32) + offs_s[None, :], byte.to(tl.uint8),
             mask=(offs_m[:, None] < M) & (offs_s[None, :] < K // 32))


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    offs_s = tl.program_id(1) * (BK // 32) + tl.arange(0, BK // 32)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]  # stacked experts reach past 2^31 elements (deepseek-v3: 7.5e9 in w13)
    w = tl.load(w_ptr + rows * K + offs_k[None, :], mask=mask, other=0.0)
    s = tl.load(ws_ptr + rows * (K // 32) + offs_s[None, :],
                mask=(offs_n[:, None] < N) & (offs_s[None, :] < K // 32), other=127)
    y = _dequant_tile(w, s, BN, BK)
    tl.store(y_ptr + rows * K + offs_k[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def act_qdq_triton(x_MK: torch.Tensor, scale_mode: str = "rceil") -> torch.Tensor:
    """MXFP8 quantize-dequantize along K (bit-exact with precision.mxfp8 for bf16/fp16 input)."""
    M, K = x_MK.shape
    y = torch.empty_like(x_MK)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 256))
    _act_qdq_kernel[grid](x_MK, y, M, K, x_MK.stride(0), y.stride(0), BM=32, BK=256, FLOOR=scale_mode == "floor",
                          num_warps=8)
    return y


def act_quant_triton(x_MK: torch.Tensor, scale_mode: str = "rceil") -> MXFP8Tensor:
    """MXFP8 bytes of x along K: data [M, K] e4m3 + scales [M, K/32] E8M0, byte-identical with
    `precision.mxfp8.quantize` for bf16/fp16 input."""
    M, K = x_MK.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x_MK.device)
    s = torch.empty(M, K // 32, dtype=torch.uint8, device=x_MK.device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 256))
    _act_quant_kernel[grid](x_MK, q, s, M, K, x_MK.stride(0), BM=32, BK=256, FLOOR=scale_mode == "floor",
                            num_warps=8)
    return MXFP8Tensor(q, s)


def dequant_triton(w: MXFP8Tensor, dtype: torch.dtype = torch.bfloat16,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    N, K = w.shape
    if out is not None and (out.shape != (N, K) or out.dtype != dtype or not out.is_contiguous()
                            or out.device != w.device):
        raise ValueError(f"dequant: out {tuple(out.shape)} {out.dtype} on {out.device} must be a contiguous "
                         f"[{N}, {K}] {dtype} tensor on {w.device}")
    y = torch.empty(N, K, dtype=dtype, device=w.device) if out is None else out
    _dequant_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 512))](w.data, w.scale, y, N, K, BN=32, BK=512,
                                                                num_warps=8)
    return y


@functools.lru_cache(maxsize=8)
def _split_locks(device: torch.device) -> torch.Tensor:
    """Per-tile arrival counters for split-K. Every call leaves them at zero again, so one buffer
    per device serves all GEMMs issued on one stream (the engine's)."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=1)
def _num_sms() -> int:
    if _interpreting():
        return 4
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


MID_MIN_M, MID_MAX_M = 17, 64  # the mid path (triton_mxfp8_gemm_mid): W dequantized once per launch
BIG_WEIGHT = 1 << 24  # elements; larger decode weights take BK=128 and a separate activation-quant pass
MAX_TILES = 1 << 16
# A weight's exact bf16 copy (`precision.linear.bf16_copy`), when kept, serves GEMMs above this many tokens through
# cuBLAS (measured faster there on every moonlight shape); up to it the fused kernel reads half the bytes, except
# for weights below BIG_WEIGHT elements whose input is already quantize-dequantized by its producer (no activation
# pass to add): there cuBLAS on the copy measured faster (fusion_check.json, H200: moonlight q+kv_a 7.1 vs 10.0 us,
# shared gate+up 8.9 vs 13.0 us, deepseek-v3 q_a+kv_a 13.3 vs 14.4 us at M=1; the big-weight TMA config wins on
# deepseek-v3's shared gate+up, 17.5 vs 20.7 us).
COPY_MIN_M = 16


def copy_serves(M: int, N: int, K: int, quant_x: bool) -> bool:
    """Whether a GEMM of M tokens on an [N, K] weight runs cuBLAS on the weight's bf16 copy (when it keeps one)."""
    return M > COPY_MIN_M or (not quant_x and N * K < BIG_WEIGHT)


@functools.lru_cache(maxsize=4096)
def pick_config(M: int, N: int, K: int) -> dict:
    """The path and tiles for one GEMM shape, by M (callers must not mutate the cached dict).

    | M          | path    | what runs                                                        |
    |------------|---------|------------------------------------------------------------------|
    | 1..16      | fused   | decode kernel below (split-K, in-register activation quant)      |
    | 17..64     | mid     | triton_mxfp8_gemm_mid: one M tile (<= 256 rows) per W tile, so W |
    |            |         | is read and dequantized once per launch; MMA per `mid_config`    |
    | > 64       | dequant | W dequantized once to bf16 (exact), activation pass, cuBLAS bf16 |
    Measured (H200, 2026-11-30, benchmarks/results/mxfp8_gemm_quick.json, geomean x cuBLAS bf16 over
    moonlight + dsv3 shapes): M=64 mid_bf16 0.50 / dequant 0.48 / previous fused 0.48; M=256 dequant 0.52,
    previous fused 0.31, mid_bf16 0.23; M=1024 dequant 0.63, mid_bf16 0.29; in the engine (throughput_mxfp8.json)
    decode at batch 128 on the mid path took 27.9 ms against 23.2 ms at batch 256 on dequant. So mid only up to 64.
    """
    if M > MID_MAX_M:
        return dict(PATH="dequant")
    if M >= MID_MIN_M:
        from .triton_mxfp8_gemm_mid import mid_config
        return mid_config(M, N, K)
    return fused_config(M, N, K)


def fused_config(M: int, N: int, K: int) -> dict:
    """Tiles of the fused kernel (measured for M <= 16; the M > 16 rows are the previous mid-M
    configs, kept for the benchmark's comparison)."""
    big = N * K >= BIG_WEIGHT
    if M <= 16 and big:  # measured (benchmarks/results/mxfp8_gemm_sweep*.json): BK=128, TMA loads stream best
        return dict(PATH="fused", BM=16, BN=64, BK=128, num_warps=4, num_stages=4, SPLIT_TARGET=2,
                    GATHER_SCALES=False, PRE_QDQ=True, USE_TMA=True)
    if M <= 16:  # small weights: launch-bound; narrow tiles, more splits
        return dict(PATH="fused", BM=16, BN=32, BK=256, num_warps=4, num_stages=4, SPLIT_TARGET=4,
                    GATHER_SCALES=False, PRE_QDQ=False)
    if M <= 64:
        cfg = dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4)
    return dict(cfg, PATH="fused", SPLIT_TARGET=2, GATHER_SCALES=False, PRE_QDQ=big)


def _split(M: int, N: int, K: int, cfg: dict) -> tuple[int, int]:
    """(splits, K per split): enough programs for SPLIT_TARGET waves, each split >= 2 K-blocks."""
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    k_blocks = triton.cdiv(K, cfg["BK"])
    split = max(1, min(triton.cdiv(cfg["SPLIT_TARGET"] * _num_sms(), tiles), k_blocks // 2))
    k_per_split = triton.cdiv(k_blocks, split) * cfg["BK"]
    return triton.cdiv(K, k_per_split), k_per_split


def mxfp8_gemm_triton(x_MK: torch.Tensor, w: MXFP8Tensor, act_mode: str = "w8a8", scale_mode: str = "rceil",
                      config: dict | None = None) -> torch.Tensor:
    check_gemm_args(x_MK, w)
    if x_MK.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"triton mxfp8 gemm: x must be bf16/fp16 on the GPU, got {x_MK.dtype}")
    if not (x_MK.is_cuda and w.data.is_cuda) and not _interpreting():
        raise ValueError("triton mxfp8 gemm: tensors must be on a CUDA device")
    x = x_MK if x_MK.stride(-1) == 1 else x_MK.contiguous()
    data, scale = w.data.contiguous(), w.scale.contiguous()
    M, K = x.shape
    N = data.shape[0]
    quant_x = act_mode == "w8a8"
    copy = w.bf16_copy
    use_copy = copy is not None and config is None and x.dtype == copy.dtype and copy_serves(M, N, K, quant_x)
    cfg = None if use_copy else config or pick_config(M, N, K)
    if use_copy or cfg["PATH"] == "dequant":  # cuBLAS bf16 (fp32 accumulate) on the exact dequantized weight
        w16 = copy if use_copy else dequant_triton(MXFP8Tensor(data, scale), x.dtype)
        return torch.nn.functional.linear(act_qdq_triton(x, scale_mode) if quant_x else x, w16)
    if cfg["PATH"] == "mid":
        from .triton_mxfp8_gemm_mid import mxfp8_gemm_mid
        return mxfp8_gemm_mid(x, MXFP8Tensor(data, scale), act_mode, scale_mode, cfg)
    if quant_x and cfg["PRE_QDQ"]:
        x, quant_x = act_qdq_triton(x, scale_mode), False
    split, k_per_split = _split(M, N, K, cfg) if cfg["SPLIT_TARGET"] else (1, triton.cdiv(K, cfg["BK"]) * cfg["BK"])
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    if split > 1 and tiles > MAX_TILES:
        split, k_per_split = 1, triton.cdiv(K, cfg["BK"]) * cfg["BK"]
    partial = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = _split_locks(x.device) if split > 1 else y
    use_tma = cfg.get("USE_TMA", False) and K % 16 == 0
    w_desc = TensorDescriptor.from_tensor(data, [cfg["BN"], cfg["BK"]]) if use_tma else None
    _mxfp8_gemm_kernel[(tiles, split)](x, data, w_desc, scale, y, partial, locks, M, N, K, x.stride(0), data.stride(0),
                                       scale.stride(0), N, M * N, k_per_split, NSPLIT=split, BM=cfg["BM"],
                                       BN=cfg["BN"], BK=cfg["BK"], ACT_QUANT=quant_x, FLOOR=scale_mode == "floor",
                                       GROUP_M=8, GATHER_SCALES=cfg["GATHER_SCALES"],
                                       STREAM_W=cfg.get("STREAM_W", False), USE_TMA=use_tma,
                                       MMA_DTYPE=tl.float16 if x.dtype == torch.float16 else tl.bfloat16,
                                       num_warps=cfg["num_warps"],
                                       num_stages=cfg["num_stages"])
    return y


def _interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: the tests' path
    for checking kernel logic on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


assert BLOCK == 32  # the kernel's block arithmetic assumes 32-element MX blocks
