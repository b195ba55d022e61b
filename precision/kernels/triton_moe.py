"""Triton fused MoE for Hopper (sm90), bf16 or MXFP8 experts.

1. `align_block_size` (a Triton counting sort): (token, k) rows sorted by expert, each run padded to BM.
2. gate_up kernel: per block of one expert's rows, x rows are gathered by index and multiplied by
   that expert's gate and up rows of w13 (MXFP8: e4m3 tiles arrive by TMA where `moe_config` asks,
   e4m3 + E8M0 dequantized in registers); the
   epilogue applies SiLU(gate) * up and, for w8a8, quantize-dequantizes h along F in registers.
3. down kernel: h @ w2[e]^T, scaled by the row's top-k weight (routed scaling already fused by
   the router), written to its own (token, k) row; the K rows of a token are then summed in
   order (deterministic; no atomics).
Optional grouped blocks (config key GROUP, 2 or 4): the first block of each GROUP consecutive blocks of an expert's
run (`Alignment.block_first`) multiplies all of them, each weight tile loaded and dequantized once; each block keeps
its own accumulator over the same K steps (the same bits); lone blocks run a loop of their own.
Optional split-K for decode (config keys, `moe_config`): both kernels spread their contraction over
several programs; the last to arrive at a tile (an arrival counter, the dense decode GEMM's
`_split_last`) sums the fp32 partials in split order, so results stay deterministic.
Reference: `precision.moe.experts_ref`. Legend: T tokens, K top-k, E experts, D hidden,
F expert intermediate, BM/BN/BK tiles.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..mxfp8 import MXFP8Tensor
from . import triton_moe_gemv
from .moe_align import align_block_size
from .moe_config import copy_serves, dequant_once, moe_config
from .pdl import pdl_args, pdl_wait
from .triton_mxfp8_gemm import (MAX_TILES, _act_qdq, _dequant_tile, _interpreting, _split_last, _split_locks,
                                _split_sum, _split_sum_unrolled, _tile_scales, act_qdq_triton, dequant_triton)

log = logging.getLogger(__name__)

PAIR_BLOCKS_MAX = 32  # up to this many (token, k) pairs, skip the sort: one block per pair


@triton.jit
def _load_s(ws_ptr, rows, mask_rows, k, KDIM, QUANT_W: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The E8M0 bytes [BN, BK // 32] of the weight tile at (rows, k) (`_tile_scales`: 127 past KDIM; a dummy when
    not QUANT_W). The kernels fetch them a step ahead of their tile, as the dense kernel does (SASS: a byte load
    beside its use sat ~20 instructions before it, inside a loop that also waits for its MMAs)."""
    if QUANT_W:
        s = _tile_scales(ws_ptr, rows, KDIM // 32, k, KDIM, mask_rows, BK)
    else:
        s = tl.zeros((BN, BK // 32), dtype=tl.uint8)
    return s


@triton.jit
def _load_w(w_ptr, s, w_desc, row0, rows, mask_rows, k, KDIM, QUANT_W: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, USE_TMA: tl.constexpr):
    """The [BN, BK] weight tile at (rows, k): fp32 dequantized by its scale bytes s (`_load_s`) when QUANT_W, else
    bf16. USE_TMA: one bulk tensor copy of rows row0.. of the flattened [E * rows, KDIM] weight; rows past the
    expert's own belong to the next one (or arrive as zeros at the end) and only feed output columns
    that the caller masks; columns past KDIM arrive as zeros."""
    kk = k + tl.arange(0, BK)
    if USE_TMA:
        w = w_desc.load([row0, k])
    else:
        w = tl.load(w_ptr + rows[:, None] * KDIM + kk[None, :], mask=mask_rows[:, None] & (kk[None, :] < KDIM),
                    other=0.0)
    if QUANT_W:
        w = _dequant_tile(w, s, BN, BK)
    return w


@triton.jit
def _mac(acc, a, w, GEMV: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ w [BN, BK]^T: bf16 tensor cores, or (GEMV, for a row or two) fp32
    multiply-adds on the weight tile where it was loaded, no shared-memory operand staging."""
    if GEMV:
        if a.shape[0] == 1:  # stays 2D: the row broadcasts over the weight tile's own layout
            return acc + tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)


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
def _group_size(bexp_ptr, bfirst_ptr, pid_b, e, GROUP: tl.constexpr):
    """Blocks program pid_b multiplies (GROUP > 1): an expert's run of blocks is cut into groups of GROUP from its
    first block (`Alignment.block_first`); a group's first block leads it (1..GROUP blocks, the run's own), the
    others get 0 and exit. The leader dequantizes each weight tile once for all its blocks."""
    n = 1
    if GROUP > 1:
        n = tl.where((pid_b - tl.load(bfirst_ptr + pid_b)) % GROUP == 0, 1, 0)
        for s in tl.static_range(1, GROUP):
            same = tl.load(bexp_ptr + pid_b + s, mask=pid_b + s < tl.num_programs(0), other=-1) == e
            n += tl.where(same & (n == s), 1, 0)
    return n


@triton.jit
def _program(ids_ptr, bexp_ptr, bfirst_ptr, n_rows, E, BM: tl.constexpr, PAIRS: tl.constexpr, GROUP: tl.constexpr):
    """Program (block, N tile, split), its block (`_block`) and how many blocks it multiplies (`_group_size`): 0 past
    the last expert's blocks, or for a group's later blocks; the program then exits."""
    pid_b = tl.program_id(0)
    rows, rid, valid, e = _block(ids_ptr, bexp_ptr, pid_b, n_rows, BM, PAIRS)
    nsub = tl.where(e < E, _group_size(bexp_ptr, bfirst_ptr, pid_b, e, GROUP), 0)
    return pid_b, tl.program_id(1), tl.program_id(2), rows, rid, valid, e, nsub


@triton.jit
def _sub_block(ids_ptr, b, on, n_rows, BM: tl.constexpr):
    """Rows of block b when `on` (a group's later block): (row slots, flat (token, k) ids, valid mask)."""
    rows = b * BM + tl.arange(0, BM)
    rid = tl.load(ids_ptr + rows, mask=on, other=n_rows)
    return rows, rid, rid < n_rows


@triton.jit
def _gu_x(x_ptr, rid, valid, TOPK, kk, mask_k, D, BM: tl.constexpr, BK: tl.constexpr, QUANT_X: tl.constexpr,
          FLOOR: tl.constexpr):
    """x [BM, BK] bf16 of the rows rid at kk, gathered by token (quantize-dequantized here when QUANT_X)."""
    tok = rid // TOPK
    x = tl.load(x_ptr + tok[:, None].to(tl.int64) * D + kk[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
    if QUANT_X:  # decode: quantize the few x rows here instead of in a separate launch
        x = _act_qdq(x.to(tl.float32), BM, BK, FLOOR)
    return x.to(tl.bfloat16)


@triton.jit
def _down_h(h_ptr, rows, valid, kk, mask_k, F):
    """h [BM, BK] of the block's row slots at kk."""
    return tl.load(h_ptr + rows[:, None].to(tl.int64) * F + kk[None, :], mask=valid[:, None] & mask_k[None, :],
                   other=0.0)


@triton.jit
def _down_out(out_ptr, topk_w_ptr, rid, valid, offs_n, mask_n, D, acc):
    topk_w = tl.load(topk_w_ptr + rid, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + rid[:, None].to(tl.int64) * D + offs_n[None, :], acc.to(tl.bfloat16).to(tl.float32) * topk_w,
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _gate_up_out(acc_g, acc_u, h_ptrs, mask, BM: tl.constexpr, BN: tl.constexpr, QUANT_H: tl.constexpr,
                 FLOOR: tl.constexpr):
    # bf16 roundings where the reference rounds: GEMM outputs, SiLU, product
    g = acc_g.to(tl.bfloat16).to(tl.float32)
    u = acc_u.to(tl.bfloat16).to(tl.float32)
    h = (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u
    h = h.to(tl.bfloat16).to(tl.float32)
    if QUANT_H:
        h = _act_qdq(h, BM, BN, FLOOR)
    tl.store(h_ptrs, h.to(tl.bfloat16), mask=mask)


@triton.jit
def _gate_up_loop(x_ptr, w_ptr, ws_ptr, w_desc, h_ptr, ids_ptr, pid_b, pid_n, e, nsub, rid, valid, n_rows, TOPK, D,
                  F, k_start, K_PER_SPLIT, NS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  QUANT_W: tl.constexpr, QUANT_H: tl.constexpr, FLOOR: tl.constexpr, QUANT_X: tl.constexpr,
                  USE_TMA: tl.constexpr, GEMV: tl.constexpr):
    """The K loop of gate and up over NS (1, 2 or 4) blocks pid_b.. of expert e, each weight tile loaded once for
    all; blocks past nsub are masked (their x rows read as zeros, nothing stored). Stores h of blocks 1.. itself and
    returns block 0's fp32 gate and up accumulators. No branch inside the loop: it stays software-pipelined."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < F
    rows1, rid1, valid1 = _sub_block(ids_ptr, pid_b + 1, nsub > 1, n_rows, BM)
    rows2, rid2, valid2 = _sub_block(ids_ptr, pid_b + 2, nsub > 2, n_rows, BM)
    rows3, rid3, valid3 = _sub_block(ids_ptr, pid_b + 3, nsub > 3, n_rows, BM)
    w_e = w_ptr + e.to(tl.int64) * 2 * F * D
    ws_e = ws_ptr + e.to(tl.int64) * 2 * F * (D // 32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g1, acc_u1, acc_g2, acc_u2, acc_g3, acc_u3 = acc_g, acc_u, acc_g, acc_u, acc_g, acc_u
    sg_next = _load_s(ws_e, offs_n, mask_n, k_start, D, QUANT_W, BN, BK)
    su_next = _load_s(ws_e, F + offs_n, mask_n, k_start, D, QUANT_W, BN, BK)
    for k0 in range(0, K_PER_SPLIT, BK):
        k = tl.multiple_of(k_start + k0, BK)  # K_PER_SPLIT is a multiple of BK: keeps the loads vectorized
        sg, su = sg_next, su_next
        sg_next = _load_s(ws_e, offs_n, mask_n, k + BK, D, QUANT_W, BN, BK)
        su_next = _load_s(ws_e, F + offs_n, mask_n, k + BK, D, QUANT_W, BN, BK)
        kk = k + tl.arange(0, BK)
        mask_k = kk < D  # a split's range ends on a BK multiple: only the contraction's end is masked
        x = _gu_x(x_ptr, rid, valid, TOPK, kk, mask_k, D, BM, BK, QUANT_X, FLOOR)
        x1, x2, x3 = x, x, x
        if NS > 1:
            x1 = _gu_x(x_ptr, rid1, valid1, TOPK, kk, mask_k, D, BM, BK, QUANT_X, FLOOR)
        if NS > 2:
            x2 = _gu_x(x_ptr, rid2, valid2, TOPK, kk, mask_k, D, BM, BK, QUANT_X, FLOOR)
            x3 = _gu_x(x_ptr, rid3, valid3, TOPK, kk, mask_k, D, BM, BK, QUANT_X, FLOOR)
        wg = _load_w(w_e, sg, w_desc, e * 2 * F + pid_n * BN, offs_n, mask_n, k, D, QUANT_W, BN, BK, USE_TMA)
        wu = _load_w(w_e, su, w_desc, e * 2 * F + F + pid_n * BN, F + offs_n, mask_n, k, D, QUANT_W, BN, BK,
                     USE_TMA)
        acc_g = _mac(acc_g, x, wg, GEMV)
        acc_u = _mac(acc_u, x, wu, GEMV)
        if NS > 1:
            acc_g1 = _mac(acc_g1, x1, wg, GEMV)
            acc_u1 = _mac(acc_u1, x1, wu, GEMV)
        if NS > 2:
            acc_g2 = _mac(acc_g2, x2, wg, GEMV)
            acc_u2 = _mac(acc_u2, x2, wu, GEMV)
            acc_g3 = _mac(acc_g3, x3, wg, GEMV)
            acc_u3 = _mac(acc_u3, x3, wu, GEMV)
    if NS > 1:
        _gate_up_out(acc_g1, acc_u1, h_ptr + rows1[:, None].to(tl.int64) * F + offs_n[None, :],
                     valid1[:, None] & mask_n[None, :], BM, BN, QUANT_H, FLOOR)
    if NS > 2:
        _gate_up_out(acc_g2, acc_u2, h_ptr + rows2[:, None].to(tl.int64) * F + offs_n[None, :],
                     valid2[:, None] & mask_n[None, :], BM, BN, QUANT_H, FLOOR)
        _gate_up_out(acc_g3, acc_u3, h_ptr + rows3[:, None].to(tl.int64) * F + offs_n[None, :],
                     valid3[:, None] & mask_n[None, :], BM, BN, QUANT_H, FLOOR)
    return acc_g, acc_u


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, ws_ptr, w_desc, h_ptr, p_ptr, lock_ptr, ids_ptr, bexp_ptr, bfirst_ptr, n_rows,
                        TOPK, D, F, E, K_PER_SPLIT, NSPLIT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, QUANT_W: tl.constexpr,
                        QUANT_H: tl.constexpr, FLOOR: tl.constexpr, PAIRS: tl.constexpr, QUANT_X: tl.constexpr,
                        USE_TMA: tl.constexpr, GEMV: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """Split-K (NSPLIT > 1): program (b, n, s) sums D-range s; fp32 gate and up partials go to
    p [NSPLIT, 2, n_rows, F] by (token, k) row and the last split to arrive sums them in split order
    (`_split_last`, `_split_sum`) before the epilogue. GROUP (2 or 4, no split): block b leads up to GROUP blocks
    of its expert (`_group_size`), each weight tile dequantized once for all of them; each block's rows keep
    their own accumulators, so every row gets the ungrouped kernel's bits."""
    pdl_wait(PDL)
    pid_b, pid_n, pid_k, rows, rid, valid, e, nsub = _program(ids_ptr, bexp_ptr, bfirst_ptr, n_rows, E, BM, PAIRS,
                                                              GROUP)
    if nsub == 0:
        return
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < F
    args = (x_ptr, w_ptr, ws_ptr, w_desc, h_ptr, ids_ptr, pid_b, pid_n, e, nsub, rid, valid, n_rows, TOPK, D, F,
            pid_k * K_PER_SPLIT, K_PER_SPLIT)
    if GROUP == 1:
        acc_g, acc_u = _gate_up_loop(*args, 1, BM, BN, BK, QUANT_W, QUANT_H, FLOOR, QUANT_X, USE_TMA, GEMV)
    elif nsub == 1:  # a separate loop for lone blocks: they keep the ungrouped kernel's code
        acc_g, acc_u = _gate_up_loop(*args, 1, BM, BN, BK, QUANT_W, QUANT_H, FLOOR, QUANT_X, USE_TMA, GEMV)
    else:
        acc_g, acc_u = _gate_up_loop(*args, GROUP, BM, BN, BK, QUANT_W, QUANT_H, FLOOR, QUANT_X, USE_TMA, GEMV)
    mask = valid[:, None] & mask_n[None, :]
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :]
    if NSPLIT == 1:
        _gate_up_out(acc_g, acc_u, h_ptrs, mask, BM, BN, QUANT_H, FLOOR)
    else:
        pg = p_ptr + rid[:, None].to(tl.int64) * F + offs_n[None, :]
        stride_s = 2 * n_rows * F
        tl.store(pg + pid_k * stride_s, acc_g, mask=mask)
        tl.store(pg + n_rows * F + pid_k * stride_s, acc_u, mask=mask)
        if _split_last(lock_ptr, pid_b * tl.num_programs(1) + pid_n, NSPLIT):
            _gate_up_out(_split_sum(pg, mask, stride_s, NSPLIT), _split_sum(pg + n_rows * F, mask, stride_s, NSPLIT),
                         h_ptrs, mask, BM, BN, QUANT_H, FLOOR)


@triton.jit
def _down_loop(h_ptr, w_ptr, ws_ptr, w_desc, out_ptr, topk_w_ptr, ids_ptr, pid_b, pid_n, e, nsub, rows, valid, n_rows,
               D, F, k_start, K_PER_SPLIT, NS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               QUANT_W: tl.constexpr, USE_TMA: tl.constexpr, GEMV: tl.constexpr):
    """The down K loop over NS blocks as `_gate_up_loop`: stores blocks 1.. and returns block 0's accumulator."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < D
    rows1, rid1, valid1 = _sub_block(ids_ptr, pid_b + 1, nsub > 1, n_rows, BM)
    rows2, rid2, valid2 = _sub_block(ids_ptr, pid_b + 2, nsub > 2, n_rows, BM)
    rows3, rid3, valid3 = _sub_block(ids_ptr, pid_b + 3, nsub > 3, n_rows, BM)
    w_e = w_ptr + e.to(tl.int64) * D * F
    ws_e = ws_ptr + e.to(tl.int64) * D * (F // 32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc1, acc2, acc3 = acc, acc, acc
    s_next = _load_s(ws_e, offs_n, mask_n, k_start, F, QUANT_W, BN, BK)
    for k0 in range(0, K_PER_SPLIT, BK):
        k = tl.multiple_of(k_start + k0, BK)  # K_PER_SPLIT is a multiple of BK: keeps the loads vectorized
        s = s_next
        s_next = _load_s(ws_e, offs_n, mask_n, k + BK, F, QUANT_W, BN, BK)
        kk = k + tl.arange(0, BK)
        mask_k = kk < F
        h = _down_h(h_ptr, rows, valid, kk, mask_k, F)
        h1, h2, h3 = h, h, h
        if NS > 1:
            h1 = _down_h(h_ptr, rows1, valid1, kk, mask_k, F)
        if NS > 2:
            h2 = _down_h(h_ptr, rows2, valid2, kk, mask_k, F)
            h3 = _down_h(h_ptr, rows3, valid3, kk, mask_k, F)
        w = _load_w(w_e, s, w_desc, e * D + pid_n * BN, offs_n, mask_n, k, F, QUANT_W, BN, BK, USE_TMA)
        acc = _mac(acc, h, w, GEMV)
        if NS > 1:
            acc1 = _mac(acc1, h1, w, GEMV)
        if NS > 2:
            acc2 = _mac(acc2, h2, w, GEMV)
            acc3 = _mac(acc3, h3, w, GEMV)
    if NS > 1:
        _down_out(out_ptr, topk_w_ptr, rid1, valid1, offs_n, mask_n, D, acc1)
    if NS > 2:
        _down_out(out_ptr, topk_w_ptr, rid2, valid2, offs_n, mask_n, D, acc2)
        _down_out(out_ptr, topk_w_ptr, rid3, valid3, offs_n, mask_n, D, acc3)
    return acc


@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, ws_ptr, w_desc, out_ptr, p_ptr, lock_ptr, ids_ptr, bexp_ptr, bfirst_ptr, topk_w_ptr,
                     n_rows, D, F, E, K_PER_SPLIT, NSPLIT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, QUANT_W: tl.constexpr,
                     PAIRS: tl.constexpr, USE_TMA: tl.constexpr, GEMV: tl.constexpr, GROUP: tl.constexpr,
                     PDL: tl.constexpr):
    """Split-K as in the gate_up kernel, partials in p [NSPLIT, n_rows, D]; GROUP as there."""
    pdl_wait(PDL)
    pid_b, pid_n, pid_k, rows, rid, valid, e, nsub = _program(ids_ptr, bexp_ptr, bfirst_ptr, n_rows, E, BM, PAIRS,
                                                              GROUP)
    if nsub == 0:
        return
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < D
    args = (h_ptr, w_ptr, ws_ptr, w_desc, out_ptr, topk_w_ptr, ids_ptr, pid_b, pid_n, e, nsub, rows, valid, n_rows,
            D, F, pid_k * K_PER_SPLIT, K_PER_SPLIT)
    if GROUP == 1:
        acc = _down_loop(*args, 1, BM, BN, BK, QUANT_W, USE_TMA, GEMV)
    elif nsub == 1:  # a separate loop for lone blocks: they keep the ungrouped kernel's code
        acc = _down_loop(*args, 1, BM, BN, BK, QUANT_W, USE_TMA, GEMV)
    else:
        acc = _down_loop(*args, GROUP, BM, BN, BK, QUANT_W, USE_TMA, GEMV)
    if NSPLIT == 1:
        _down_out(out_ptr, topk_w_ptr, rid, valid, offs_n, mask_n, D, acc)
    else:
        mask = valid[:, None] & mask_n[None, :]
        out_ptrs = out_ptr + rid[:, None].to(tl.int64) * D + offs_n[None, :]
        topk_w = tl.load(topk_w_ptr + rid, mask=valid, other=0.0)[:, None]
        p_ptrs = p_ptr + rid[:, None].to(tl.int64) * D + offs_n[None, :]
        tl.store(p_ptrs + pid_k * n_rows * D, acc, mask=mask)
        if _split_last(lock_ptr, pid_b * tl.num_programs(1) + pid_n, NSPLIT):
            y = _split_sum(p_ptrs, mask, n_rows * D, NSPLIT)
            tl.store(out_ptrs, y.to(tl.bfloat16).to(tl.float32) * topk_w, mask=mask)


@triton.jit
def _combine_kernel(p_ptr, y_ptr, s_ptr, s_stride, TOPK: tl.constexpr, D, BD: tl.constexpr, SHARED: tl.constexpr,
                    PDL: tl.constexpr):
    """y[t] = sum_k p[t * K + k] in k order (deterministic), cast to y's dtype; SHARED: plus s[t] after that
    rounding, rounded again (torch's add of two tensors of y's dtype). TOPK is a compile-time constant: the K
    loads of a row are unrolled and in flight together."""
    pdl_wait(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    y = _split_sum_unrolled(p_ptr + (t * TOPK).to(tl.int64) * D + offs, mask, D, TOPK, "").to(y_ptr.dtype.element_ty)
    if SHARED:
        s = tl.load(s_ptr + t.to(tl.int64) * s_stride + offs, mask=mask, other=0.0)
        y = (y.to(tl.float32) + s.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t.to(tl.int64) * D + offs, y, mask=mask)


def _k_split(KDIM: int, BK: int, split: int) -> tuple[int, int]:
    """(splits, contraction length per split, a multiple of BK)."""
    per = triton.cdiv(triton.cdiv(KDIM, BK), max(1, split)) * BK
    return triton.cdiv(KDIM, per), per


def fused_moe_triton(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                     w13, w2, act_mode: str = "w8a8", scale_mode: str = "rceil",
                     config: dict | None = None, x_qdq: bool = False,
                     shared_TD: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                     bf16_copy: tuple[torch.Tensor, torch.Tensor] | None = None, hosted: int = 0) -> torch.Tensor:
    """x_qdq: x is already MXFP8 quantize-dequantized by its producer; only h is quantized here. shared_TD:
    added to the bf16 result in the combine pass (`y + shared_TD` in bf16: two roundings, as torch).
    workspace: a contiguous bf16 buffer of at least 3 * E * F * D elements (w13's and w2's); MXFP8 calls with
    enough rows an expert (`moe_config.dequant_once`, prefill chunks) dequantize w13 and w2 into it once (exact)
    and run the bf16 tiles, the activations still MXFP8 quantize-dequantized as the recipe says.
    bf16_copy: exact bf16 copies (w13 [E, 2F, D], w2 [E, D, F]) of MXFP8 experts that the caller keeps in step with
    them; calls of `moe_config.copy_serves` size run the bf16 tiles on them (no dequantize pass at all).
    hosted: the ids' last `hosted` columns are hosted shared experts, x older than the router's launch
    (`triton_moe_gemv.moe_gemv`; the one-token path only, the same bits)."""
    quant = isinstance(w13, MXFP8Tensor)
    if quant != isinstance(w2, MXFP8Tensor):
        raise TypeError("fused moe: w13 and w2 must share one format")
    if x_TD.dtype != torch.bfloat16 or not (x_TD.is_cuda or _interpreting()):
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
    if shared_TD is not None and (shared_TD.shape != (T, D) or shared_TD.dtype != x_TD.dtype
                                  or shared_TD.stride(1) != 1):
        raise ValueError(f"fused moe: shared output {tuple(shared_TD.shape)} {shared_TD.dtype} must be [T, D] "
                         f"{x_TD.dtype} with unit stride along D")
    w8a8 = quant and act_mode == "w8a8"
    quant_x = w8a8 and not x_qdq
    y = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    d13, d2 = d13.contiguous(), d2.contiguous()
    s13 = w13.scale.contiguous() if quant else d13
    s2 = w2.scale.contiguous() if quant else d2
    if config is None and triton_moe_gemv.serves(T, quant):
        return triton_moe_gemv.moe_gemv(x_TD.contiguous(), topk_ids_TK, topk_weights_TK, d13, s13, d2, s2, quant,
                                        w8a8, quant_x, scale_mode == "floor", y, shared_TD, hosted)
    tiles_quant = quant  # False when the experts are dequantized once for this call: bf16 tiles, QUANT_H kept
    if quant and bf16_copy is not None:
        c13, c2 = bf16_copy
        if (c13.dtype, c2.dtype) != (torch.bfloat16,) * 2 or c13.shape != d13.shape or c2.shape != d2.shape \
                or not (c13.is_contiguous() and c2.is_contiguous()):
            raise ValueError(f"fused moe: bf16 copies {c13.dtype} {tuple(c13.shape)} / {c2.dtype} {tuple(c2.shape)} "
                             f"must be contiguous bf16 tensors shaped as w13 {tuple(d13.shape)} / w2 {tuple(d2.shape)}")
    if quant and bf16_copy is not None and config is None and copy_serves(T, K, E):
        d13, d2 = bf16_copy
        s13, s2, tiles_quant = d13, d2, False
    elif quant and workspace is not None and config is None and dequant_once(T, K, E):
        d13, d2 = _dequantize_experts(MXFP8Tensor(d13, s13), MXFP8Tensor(d2, s2), workspace)
        s13, s2, tiles_quant = d13, d2, False
    cfg = dict(config or moe_config(T, tiles_quant, K, E, D))
    BM, BN, BK = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    bn_down = cfg.pop("BN_DOWN", BN)
    split_gu, split_down = cfg.pop("SPLIT_GU", 1), cfg.pop("SPLIT_DOWN", 1)
    use_tma, gemv = cfg.pop("USE_TMA", False), cfg.pop("GEMV", False)
    group = cfg.pop("GROUP", 1)
    if use_tma and not tiles_quant:
        raise ValueError("fused moe: USE_TMA is for MXFP8 weight tiles")
    if gemv and BM > 4:
        raise ValueError(f"fused moe: GEMV takes blocks of 1..4 rows, got BM={BM}")
    fuse_x = quant_x and T <= 64  # prefill keeps one separate pass (the kernel would redo it per N tile)
    x = act_qdq_triton(x_TD.contiguous(), scale_mode) if quant_x and not fuse_x else x_TD.contiguous()
    pairs = T * K <= PAIR_BLOCKS_MAX
    if pairs:  # the kernels index pairs directly: sorted ids unused, experts from the top-k ids
        ids, bexp, R = topk_ids_TK, topk_ids_TK.reshape(-1), T * K * BM
        bfirst, group = bexp, 1
    else:
        al = align_block_size(topk_ids_TK, E, BM)
        ids, bexp, bfirst, R = al.sorted_ids, al.block_expert, al.block_first, al.sorted_ids.numel()
    h = torch.empty(R, F, dtype=torch.bfloat16, device=x.device)
    n_gu, n_down = triton.cdiv(F, BN), triton.cdiv(D, bn_down)
    split_gu, k_gu = _k_split(D, BK, split_gu if R // BM * n_gu <= MAX_TILES else 1)
    split_down, k_down = _k_split(F, BK, split_down if R // BM * n_down <= MAX_TILES else 1)
    if group not in (1, 2, 4) or (group > 1 and (gemv or max(split_gu, split_down) > 1)):
        raise ValueError(f"fused moe: GROUP={group} must be 1, 2 or 4, and 1 with GEMV or split-K")
    locks = _split_locks(x.device) if max(split_gu, split_down) > 1 else h
    desc13 = TensorDescriptor.from_tensor(d13.view(E * F2, D), [BN, BK]) if use_tma else None
    desc2 = TensorDescriptor.from_tensor(d2.view(E * D, F), [bn_down, BK]) if use_tma else None
    log.debug("fused moe T=%d K=%d: BM=%d BN=%d/%d BK=%d split %d/%d tma=%s gemv=%s pairs=%s group=%d", T, K, BM, BN,
              bn_down, BK, split_gu, split_down, use_tma, gemv, pairs, group)
    p13 = torch.empty(split_gu, 2, T * K, F, dtype=torch.float32, device=x.device) if split_gu > 1 else h
    _moe_gate_up_kernel[(R // BM, n_gu, split_gu)](
        x, d13, s13, desc13, h, p13, locks, ids, bexp, bfirst, T * K, K, D, F, E, k_gu, split_gu, BM=BM, BN=BN,
        BK=BK, QUANT_W=tiles_quant, QUANT_H=w8a8, FLOOR=scale_mode == "floor", PAIRS=pairs, QUANT_X=fuse_x,
        USE_TMA=use_tma, GEMV=gemv, GROUP=group, **cfg, **pdl_args(x))
    out = torch.empty(T * K, D, dtype=torch.float32, device=x.device)
    p2 = torch.empty(split_down, T * K, D, dtype=torch.float32, device=x.device) if split_down > 1 else out
    _moe_down_kernel[(R // BM, n_down, split_down)](
        h, d2, s2, desc2, out, p2, locks, ids, bexp, bfirst, topk_weights_TK.float().contiguous(), T * K,
        D, F, E, k_down, split_down, BM=BM, BN=bn_down, BK=BK, QUANT_W=tiles_quant, PAIRS=pairs, USE_TMA=use_tma,
        GEMV=gemv, GROUP=group, **cfg, **pdl_args(x))
    return _combine(out, y, shared_TD, K)


def _dequantize_experts(w13: MXFP8Tensor, w2: MXFP8Tensor, workspace: torch.Tensor) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Exact bf16 w13 [E, 2F, D] and w2 [E, D, F] in the workspace's first elements (`dequant_triton`)."""
    n13, n2 = w13.data.numel(), w2.data.numel()
    if workspace.dtype != torch.bfloat16 or not workspace.is_contiguous() or workspace.numel() < n13 + n2 \
            or workspace.device != w13.data.device:
        raise ValueError(f"fused moe: workspace {workspace.dtype} [{workspace.numel()}] on {workspace.device} must be "
                         f"a contiguous bf16 buffer of >= {n13 + n2} elements on {w13.data.device}")
    out = workspace[:n13].view(w13.data.shape), workspace[n13:n13 + n2].view(w2.data.shape)
    dequantize_experts(w13, w2, *out)
    return out


def dequantize_experts(w13: MXFP8Tensor, w2: MXFP8Tensor, out13: torch.Tensor, out2: torch.Tensor) -> None:
    """Exact bf16 dequantization of stacked MXFP8 experts (w13 [E, 2F, D], w2 [E, D, F]) into contiguous bf16
    tensors of their shapes, in place (`dequant_triton` over the experts' rows)."""
    for w, out in ((w13, out13), (w2, out2)):
        K = w.data.shape[-1]
        dequant_triton(MXFP8Tensor(w.data.view(-1, K), w.scale.view(-1, K // 32)), torch.bfloat16,
                       out=out.view(-1, K))


def _combine(out: torch.Tensor, y: torch.Tensor, shared_TD: torch.Tensor | None, K: int, BD: int = 512,
             num_warps: int = 4) -> torch.Tensor:
    """y [T, D] = the K fp32 rows of each token summed in k order (+ shared_TD), by `_combine_kernel`. BD 512 with
    K unrolled (moe_combine.json, H200, same bits): 1.01-1.72x the previous runtime-K loop over 1024 columns,
    0.97-1.18x the bytes' floor (same-run copy bandwidth) from 1024 tokens; wider blocks lost up to 1.6x."""
    T, D = y.shape
    s = shared_TD if shared_TD is not None else y
    _combine_kernel[(T, triton.cdiv(D, BD))](out, y, s, s.stride(0), K, D, BD=BD, SHARED=shared_TD is not None,
                                             num_warps=num_warps, **pdl_args(y))
    return y
