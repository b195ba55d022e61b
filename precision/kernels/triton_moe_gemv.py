"""Fused-MoE GEMV path for one or two decode tokens (sm90): whole weight rows per program, as the dense GEMV
(`triton_gemv`), over the (token, k) pairs directly (no sort).

1. gate_up: program (BN rows of F, pair) holds the BN gate rows and BN up rows of the pair's expert over all of D,
   dots them with the token's x (quantize-dequantized along D first for w8a8 unless its producer did), and writes
   h = SiLU(gate) * up with the fused kernel's bf16 roundings, unquantized. The pairs of hosted shared experts
   (their ids fixed, their x older than the router's launch) are computed before the PDL wait, during the router.
2. down + combine: program (pair, BN rows of D) loads the pair's expert rows before its PDL wait (the expert ids
   come from the router, two launches back, which has completed by then: see `pdl`), then reads the pair's whole
   h row, quantize-dequantizes it along F for w8a8 (the same 32-element blocks, so the same values, as the fused
   kernel's gate_up epilogue), dots it with those rows, rounds to bf16, scales by the pair's top-k weight and
   stores the fp32 row; the last of a token's K programs to arrive at a row block (arrival counter, as split-K)
   sums the K rows in k order, casts to bf16 and adds the shared output: the bits of the separate ordered
   combine (`triton_moe._combine_kernel`), without its launch.
Sums: exact products, fp32 sums per 32-wide block, block sums scaled (MXFP8), then summed: another fp32 order than
the MMA path; the reference's to fp32 noise. Reference: `precision.moe.experts_ref`.
Legend: P = T * K pairs, D hidden, F expert intermediate, E experts (shared ones hosted included), KP: a
contraction rounded up to a power of two, BN rows per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_args, pdl_wait
from .triton_gemv import _load_rows, _load_x, _row_dots
from .triton_mxfp8_gemm import MAX_TILES, _split_last, _split_locks, _split_sum_unrolled

# fused_moe_triton takes this path up to this many tokens (0: never). gemv_20261201b.json (H200, CUDA graph, expert
# weights rotated past L2; vs the tile path's GEMV config): MXFP8 at 1 token moonlight 28.8 -> 26.2 us (routed),
# 39.8 -> 32.2 (routed + 2 hosted shared), deepseek-v3 129.6 -> 126.1; at 2 tokens moonlight 45.3 -> 44.0 but
# deepseek-v3 234.9 -> 252.0. bf16 experts: slower at 1 and 2 tokens on every shape (33.1 -> 37.1 us moonlight; again
# in gemv_20261201d_moe_combined.json: 42.3 -> 45.7 with shared, and engine decode at batch 1 2.23 ms either way).
# The combine inside the down kernel: within noise of the separate launch (gemv_20261201d_moe_*.json, same run:
# 32.32 vs 32.40 us; engine 1.81 vs 1.79 ms/step), kept for one launch fewer. Not kept: one persistent launch for
# both phases (down items waiting on per-pair gate_up counters): 38-57 us at 2-4 programs an SM, no loads in flight
# across items (gemv_20261201e_moe_persistent.json; engine 1.93-2.42 ms).
MAX_TOKENS_MXFP8 = 1
# gate_up computes the hosted shared experts' pairs before its PDL wait (`moe_gemv`'s `hosted`); benchmarks
# compare with False
HOSTED_BEFORE_WAIT = True
MAX_TOKENS_BF16 = 0


def serves(T: int, quant: bool) -> bool:
    return 1 <= T <= (MAX_TOKENS_MXFP8 if quant else MAX_TOKENS_BF16)


@triton.jit
def _pair_rows(ids_ptr, BN: tl.constexpr):
    """This program's (token, k) pair, its BN output rows, and the pair's expert."""
    p = tl.program_id(0)
    return p, tl.program_id(1) * BN + tl.arange(0, BN), tl.load(ids_ptr + p).to(tl.int64)


@triton.jit
def _gate_up_h(x_ptr, w_ptr, s_ptr, t, e, n, D, F, BN: tl.constexpr, KP: tl.constexpr, QUANT_W: tl.constexpr,
               QUANT_X: tl.constexpr, FLOOR: tl.constexpr):
    """h = SiLU(gate) * up at rows n of token t's pair with expert e, fp32 holding the bf16 values."""
    x = _load_x(x_ptr + t.to(tl.int64) * D, D, KP, QUANT_X, FLOOR)
    wg, sg = _load_rows(w_ptr, s_ptr, e * 2 * F + n, n < F, D, KP, QUANT_W)
    wu, su = _load_rows(w_ptr, s_ptr, e * 2 * F + F + n, n < F, D, KP, QUANT_W)
    g = _row_dots(wg, sg, x, BN, KP, QUANT_W).to(tl.bfloat16).to(tl.float32)
    u = _row_dots(wu, su, x, BN, KP, QUANT_W).to(tl.bfloat16).to(tl.float32)
    return (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u


@triton.jit
def _gemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, ids_ptr, TOPK, HOSTED, E, D, F, BN: tl.constexpr,
                         KP: tl.constexpr, QUANT_W: tl.constexpr, QUANT_X: tl.constexpr, FLOOR: tl.constexpr,
                         PDL: tl.constexpr):
    """Program (BN rows, j): the pairs in the order hosted first (every token's last HOSTED columns, experts
    E - HOSTED .. E - 1), then the routed ones. A hosted pair's expert is known without the router, and x was written
    before the router's launch (`moe_gemv`), so its program computes h before the PDL wait (the router's launch still
    running) and only stores after it."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    j = tl.program_id(1)
    T = tl.num_programs(1) // TOPK
    R = TOPK - HOSTED
    if j < T * HOSTED:
        t = j // HOSTED
        p = t * TOPK + R + j % HOSTED
        h = _gate_up_h(x_ptr, w_ptr, s_ptr, t, (E - HOSTED + j % HOSTED).to(tl.int64), n, D, F, BN, KP, QUANT_W,
                       QUANT_X, FLOOR)
        pdl_wait(PDL)  # h may reuse memory the router's launch reads: stored after it completes
    else:
        pdl_wait(PDL)
        t = (j - T * HOSTED) // R
        p = t * TOPK + (j - T * HOSTED) % R
        h = _gate_up_h(x_ptr, w_ptr, s_ptr, t, tl.load(ids_ptr + p).to(tl.int64), n, D, F, BN, KP, QUANT_W, QUANT_X,
                       FLOOR)
    tl.store(h_ptr + p.to(tl.int64) * F + n, h.to(tl.bfloat16), mask=n < F)


@triton.jit
def _gemv_down_kernel(h_ptr, w_ptr, s_ptr, p_ptr, y_ptr, sh_ptr, sh_stride, lock_ptr, ids_ptr, topk_w_ptr,
                      TOPK: tl.constexpr, D, F,
                      BN: tl.constexpr, KP: tl.constexpr, QUANT_W: tl.constexpr, QUANT_H: tl.constexpr,
                      FLOOR: tl.constexpr, SHARED: tl.constexpr, PDL: tl.constexpr):
    p, n, e = _pair_rows(ids_ptr, BN)  # ids: written before gate_up, the launch before this one (module docstring)
    w, s = _load_rows(w_ptr, s_ptr, e * D + n, n < D, F, KP, QUANT_W)
    pdl_wait(PDL)  # h comes from gate_up
    h = _load_x(h_ptr + p.to(tl.int64) * F, F, KP, QUANT_H, FLOOR)
    y = _row_dots(w, s, h, BN, KP, QUANT_W).to(tl.bfloat16).to(tl.float32) * tl.load(topk_w_ptr + p)
    tl.store(p_ptr + p.to(tl.int64) * D + n, y, mask=n < D)
    t = p // TOPK
    if _split_last(lock_ptr, t * tl.num_programs(1) + tl.program_id(1), TOPK):
        out = _split_sum_unrolled(p_ptr + (t * TOPK).to(tl.int64) * D + n, n < D, D, TOPK, ".cg").to(
            y_ptr.dtype.element_ty)
        if SHARED:  # torch's add of two bf16 tensors: the sum rounded, plus the shared output, rounded again
            sh = tl.load(sh_ptr + t.to(tl.int64) * sh_stride + n, mask=n < D, other=0.0)
            out = (out.to(tl.float32) + sh.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t.to(tl.int64) * D + n, out, mask=n < D)


# weight elements a program holds. gemv_20261201d_moe_combined.json (H200, one token, MXFP8, both in one run):
# 8192 -> 16384: moonlight routed 25.4 -> 24.1 us, routed + 2 shared 31.7 -> 30.5, deepseek-v3 130.5 -> 122.4 (bf16
# experts, which the dispatch keeps on the tile path: slower at 16384); engine decode at batch 1, MXFP8: 1.81 -> 1.77
# ms/step (throughput_20261201w_{new,moe16k}_decode.json).
TILE_ELEMS = 16384
# rows of gate and of up a gate_up program holds at least: a hidden size past 4096 got one row from TILE_ELEMS.
# moe_gemv_tiles_20261202_sweep.json (H200, one token, MXFP8, deepseek-v3 D = 7168, 8 warps): 1 / 2 / 4 rows 122.1-128.3 /
# 111.2-115.5 / 107.0 us; confirmed by benchmarks/moe_gemv_tiles.py (moe_gemv_tiles_20261202.json): 4 rows 107.7 /
# 115.7 (first / last run), 1 row 123.1, 8 rows 108.4. moonlight (D = 2048) already had 4, where other tile sizes
# stayed within the 5-10% between two runs of one config, and so did the engine's batch-1 step (1.75-1.78 ms over
# three down tiles, throughput_20261202g_down_*.json).
GATE_UP_MIN_ROWS = 4
# per-kernel overrides of TILE_ELEMS and of the warps, for benchmarks/moe_gemv_tiles.py (None: TILE_ELEMS, and 4
# warps up to KP 4096, else 8)
GATE_UP_TILE_ELEMS = DOWN_TILE_ELEMS = None
GATE_UP_WARPS = DOWN_WARPS = None


def _tiles(KP: int, matrices: int, elems: int | None, warps: int | None, min_rows: int = 1) -> dict:
    """BN rows a program: `matrices` x BN x KP weight elements = elems, at least min_rows rows."""
    return dict(BN=max(min_rows, (elems or TILE_ELEMS) // (matrices * KP)),
                num_warps=warps or (4 if KP <= 4096 else 8))


def moe_gemv(x: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, d13: torch.Tensor,
             s13: torch.Tensor, d2: torch.Tensor, s2: torch.Tensor, quant: bool, w8a8: bool, quant_x: bool,
             floor: bool, y: torch.Tensor | None = None, shared_TD: torch.Tensor | None = None,
             hosted: int = 0) -> torch.Tensor:
    """y [T, D] (x's dtype; into `y` when given): each token's K expert outputs times their top-k weights, summed
    in k order, plus shared_TD [T, D] when given (two bf16 roundings, as the fused MoE's combine).
    d13 [E, 2F, D] / d2 [E, D, F] contiguous (e4m3 with E8M0 s13 / s2, or bf16 with s = d).
    hosted: the last `hosted` columns of every token's ids are the hosted shared experts E - hosted .. E - 1 in
    order (what `Gate(shared=...)` writes), and x was written before the launch just before this call (the
    router's): gate_up computes those pairs before its PDL wait, overlapping the router. The same bits either way."""
    E, F2, D = d13.shape
    F = F2 // 2
    T, K = topk_ids_TK.shape
    P = T * K
    ids = topk_ids_TK.reshape(-1).contiguous()
    topk_w = topk_weights_TK.float().contiguous()  # before gate_up: down's launch follows gate_up's directly
    h = torch.empty(P, F, dtype=torch.bfloat16, device=x.device)
    KD, KF = triton.next_power_of_2(D), triton.next_power_of_2(F)
    gu = _tiles(KD, 2, GATE_UP_TILE_ELEMS, GATE_UP_WARPS, GATE_UP_MIN_ROWS)
    dn = _tiles(KF, 1, DOWN_TILE_ELEMS, DOWN_WARPS)
    if not 0 <= hosted < K:
        raise ValueError(f"moe gemv: {hosted} hosted shared columns of {K} leave no routed column")
    if T * triton.cdiv(D, dn["BN"]) > MAX_TILES:
        raise ValueError(f"moe gemv: {T} tokens exceed the arrival counters ({MAX_TILES} row blocks)")
    hosted = hosted if HOSTED_BEFORE_WAIT else 0
    _gemv_gate_up_kernel[(triton.cdiv(F, gu["BN"]), P)](
        x, d13, s13, h, ids, K, hosted, E, D, F, KP=KD, QUANT_W=quant, QUANT_X=quant_x, FLOOR=floor, **gu,
        **pdl_args(x))
    parts = torch.empty(P, D, dtype=torch.float32, device=x.device)
    y = torch.empty(T, D, dtype=x.dtype, device=x.device) if y is None else y
    sh = shared_TD if shared_TD is not None else y
    _gemv_down_kernel[(P, triton.cdiv(D, dn["BN"]))](
        h, d2, s2, parts, y, sh, sh.stride(0), _split_locks(x.device), ids, topk_w, K,
        D, F, KP=KF, QUANT_W=quant, QUANT_H=w8a8, FLOOR=floor, SHARED=shared_TD is not None, **dn, **pdl_args(x))
    return y
