"""Triton fused MoE for Hopper (sm90), bf16 or MXFP8 experts.

1. `align_block_size` (a Triton counting sort): (token, k) rows sorted by expert, each run padded to BM.
2. gate_up kernel: per block of one expert's rows, x rows are gathered by index and multiplied by
   that expert's gate and up rows of w13 (MXFP8: e4m3 + E8M0 dequantized in registers); the
   epilogue applies SiLU(gate) * up and, for w8a8, quantize-dequantizes h along F in registers.
3. down kernel: h @ w2[e]^T, scaled by the row's top-k weight (routed scaling already fused by
   the router), written to its own (token, k) row; the K rows of a token are then summed in
   order (deterministic; no atomics).
Reference: `precision.moe.experts_ref`. Legend: T tokens, K top-k, E experts, D hidden,
F expert intermediate, BM/BN/BK tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mxfp8 import MXFP8Tensor
from .moe_align import align_block_size
from .triton_mxfp8_gemm import _act_qdq, act_qdq_triton

PAIR_BLOCKS_MAX = 32  # up to this many (token, k) pairs, skip the sort: one block per pair


@triton.jit
def _load_w(w_ptr, ws_ptr, rows, mask_rows, k, KDIM, QUANT_W: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The [BN, BK] weight tile at (rows, k) in bf16 (dequantized when QUANT_W)."""
    kk = k + tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * KDIM + kk[None, :], mask=mask_rows[:, None] & (kk[None, :] < KDIM),
                other=0.0)
    if QUANT_W:
        ss = k // 32 + tl.arange(0, BK // 32)
        s = tl.load(ws_ptr + rows[:, None] * (KDIM // 32) + ss[None, :],
                    mask=mask_rows[:, None] & (ss[None, :] < KDIM // 32), other=127)
        scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        w = tl.reshape(tl.reshape(w.to(tl.float32), (BN, BK // 32, 32)) * scale[:, :, None], (BN, BK))
    return w.to(tl.bfloat16)


@triton.jit
def _block(ids_ptr, bexp_ptr, pid_b, n_rows, BM: tl.constexpr, PAIRS: tl.constexpr):
    """Rows of block pid_b: (row slots, flat (token, k) ids, valid mask, expert).
    PAIRS: block b is pair b alone (row 0), its expert read from the top-k ids; no sort needed."""
    rows = pid_b * BM + tl.arange(0, BM)
    if PAIRS:
        rid = tl.where(tl.arange(0, BM) == 0, pid_b, n_rows)
        e = tl.load(bexp_ptr + pid_b).to(tl.int32)
    else:
        rid = tl.load(ids_ptr + rows)
        e = tl.load(bexp_ptr + pid_b)
    return rows, rid, rid < n_rows, e


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, ws_ptr, h_ptr, ids_ptr, bexp_ptr, n_rows, TOPK, D, F, E,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, QUANT_W: tl.constexpr,
                        QUANT_H: tl.constexpr, FLOOR: tl.constexpr, PAIRS: tl.constexpr, QUANT_X: tl.constexpr):
    pid_b = tl.program_id(0)
    rows, rid, valid, e = _block(ids_ptr, bexp_ptr, pid_b, n_rows, BM, PAIRS)
    if e >= E:
        return
    tok = rid // TOPK
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < F
    w_e = w_ptr + e.to(tl.int64) * 2 * F * D
    ws_e = ws_ptr + e.to(tl.int64) * 2 * F * (D // 32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        kk = k + tl.arange(0, BK)
        mask_k = kk < D
        x = tl.load(x_ptr + tok[:, None].to(tl.int64) * D + kk[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0)
        if QUANT_X:  # decode: quantize the few x rows here instead of in a separate launch
            x = _act_qdq(x.to(tl.float32), BM, BK, FLOOR)
        x = x.to(tl.bfloat16)
        wg = _load_w(w_e, ws_e, offs_n, mask_n, k, D, QUANT_W, BN, BK)
        wu = _load_w(w_e, ws_e, F + offs_n, mask_n, k, D, QUANT_W, BN, BK)
        acc_g = tl.dot(x, tl.trans(wg), acc_g)
        acc_u = tl.dot(x, tl.trans(wu), acc_u)
    # bf16 roundings where the reference rounds: GEMM outputs, SiLU, product
    g = acc_g.to(tl.bfloat16).to(tl.float32)
    u = acc_u.to(tl.bfloat16).to(tl.float32)
    h = (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u
    h = h.to(tl.bfloat16).to(tl.float32)
    if QUANT_H:
        h = _act_qdq(h, BM, BN, FLOOR)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :], h.to(tl.bfloat16),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, bexp_ptr, topk_w_ptr, n_rows, D, F, E,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, QUANT_W: tl.constexpr,
                     PAIRS: tl.constexpr):
    pid_b = tl.program_id(0)
    rows, rid, valid, e = _block(ids_ptr, bexp_ptr, pid_b, n_rows, BM, PAIRS)
    if e >= E:
        return
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < D
    w_e = w_ptr + e.to(tl.int64) * D * F
    ws_e = ws_ptr + e.to(tl.int64) * D * (F // 32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, F, BK):
        kk = k + tl.arange(0, BK)
        mask_k = kk < F
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + kk[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0)
        w = _load_w(w_e, ws_e, offs_n, mask_n, k, F, QUANT_W, BN, BK)
        acc = tl.dot(h, tl.trans(w), acc)
    y = acc.to(tl.bfloat16).to(tl.float32) * tl.load(topk_w_ptr + rid, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + rid[:, None].to(tl.int64) * D + offs_n[None, :], y, mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _combine_kernel(p_ptr, y_ptr, s_ptr, s_stride, TOPK, D, BD: tl.constexpr, SHARED: tl.constexpr):
    """y[t] = sum_k p[t * K + k] in k order (deterministic), cast to y's dtype; SHARED: plus s[t] after that
    rounding, rounded again (torch's add of two tensors of y's dtype)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for k in range(TOPK):
        acc += tl.load(p_ptr + (t * TOPK + k).to(tl.int64) * D + offs, mask=mask, other=0.0)
    y = acc.to(y_ptr.dtype.element_ty)
    if SHARED:
        s = tl.load(s_ptr + t.to(tl.int64) * s_stride + offs, mask=mask, other=0.0)
        y = (y.to(tl.float32) + s.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t.to(tl.int64) * D + offs, y, mask=mask)


def moe_config(T: int, quant: bool) -> dict:
    """Tiles by token count: prefill from benchmarks/results/moe_sweep.json (H100), decode from
    moe_decode_sweep.json (H200: 32-row blocks at 65..512 tokens, 0.79x / 0.93x the time of 64-row blocks for
    MXFP8 / bf16 experts at 256 tokens)."""
    if T <= 64:
        return dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
    if T <= 512:
        return dict(BM=32, BN=64, BK=128, num_warps=4, num_stages=3)
    if T <= 1024:
        return dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=3)
    if quant:  # register dequantization of two weight tiles per step: narrower N tiles
        return dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def fused_moe_triton(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                     w13, w2, act_mode: str = "w8a8", scale_mode: str = "rceil",
                     config: dict | None = None, x_qdq: bool = False,
                     shared_TD: torch.Tensor | None = None) -> torch.Tensor:
    """x_qdq: x is already MXFP8 quantize-dequantized by its producer; only h is quantized here. shared_TD:
    added to the bf16 result in the combine pass (`y + shared_TD` in bf16: two roundings, as torch)."""
    quant = isinstance(w13, MXFP8Tensor)
    if quant != isinstance(w2, MXFP8Tensor):
        raise TypeError("fused moe: w13 and w2 must share one format")
    if x_TD.dtype != torch.bfloat16 or not x_TD.is_cuda:
        raise TypeError(f"fused moe: x must be a CUDA bf16 tensor, got {x_TD.dtype} on {x_TD.device}")
    d13 = w13.data if quant else w13
    d2 = w2.data if quant else w2
    E, F2, D = d13.shape
    F = F2 // 2
    if x_TD.shape[1] != D or tuple(d2.shape) != (E, D, F):
        raise ValueError(f"fused moe: x {tuple(x_TD.shape)}, w13 {tuple(d13.shape)}, w2 {tuple(d2.shape)} disagree")
    if quant and (D % 32 or F % 32):
        raise ValueError(f"fused moe: MXFP8 experts need D ({D}) and F ({F}) multiples of 32")
    T, K = topk_ids_TK.shape
    cfg = dict(config or moe_config(T, quant))
    BM, BN, BK = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    w8a8 = quant and act_mode == "w8a8"
    quant_x = w8a8 and not x_qdq
    fuse_x = quant_x and T <= 64  # prefill keeps one separate pass (the kernel would redo it per N tile)
    x = act_qdq_triton(x_TD.contiguous(), scale_mode) if quant_x and not fuse_x else x_TD.contiguous()
    pairs = T * K <= PAIR_BLOCKS_MAX
    if pairs:  # the kernels index pairs directly: sorted ids unused, experts from the top-k ids
        ids, bexp, R = topk_ids_TK, topk_ids_TK.reshape(-1), T * K * BM
    else:
        al = align_block_size(topk_ids_TK, E, BM)
        ids, bexp, R = al.sorted_ids, al.block_expert, al.sorted_ids.numel()
    h = torch.empty(R, F, dtype=torch.bfloat16, device=x.device)
    s13 = w13.scale.contiguous() if quant else d13
    s2 = w2.scale.contiguous() if quant else d2
    _moe_gate_up_kernel[(R // BM, triton.cdiv(F, BN))](
        x, d13.contiguous(), s13, h, ids, bexp, T * K, K, D, F, E, BM=BM, BN=BN, BK=BK,
        QUANT_W=quant, QUANT_H=w8a8, FLOOR=scale_mode == "floor", PAIRS=pairs, QUANT_X=fuse_x, **cfg)
    out = torch.empty(T * K, D, dtype=torch.float32, device=x.device)
    _moe_down_kernel[(R // BM, triton.cdiv(D, BN))](
        h, d2.contiguous(), s2, out, ids, bexp, topk_weights_TK.float().contiguous(), T * K,
        D, F, E, BM=BM, BN=BN, BK=BK, QUANT_W=quant, PAIRS=pairs, **cfg)
    if shared_TD is not None and (shared_TD.shape != (T, D) or shared_TD.dtype != x_TD.dtype
                                  or shared_TD.stride(1) != 1):
        raise ValueError(f"fused moe: shared output {tuple(shared_TD.shape)} {shared_TD.dtype} must be [T, D] "
                         f"{x_TD.dtype} with unit stride along D")
    y = torch.empty(T, D, dtype=x_TD.dtype, device=x.device)
    s = shared_TD if shared_TD is not None else y
    _combine_kernel[(T, triton.cdiv(D, 1024))](out, y, s, s.stride(0), K, D, BD=1024, SHARED=shared_TD is not None)
    return y
