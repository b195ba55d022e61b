"""Triton router top-k (model.ops.route_topk_ref) after the sigmoid: correction bias, group-limited
selection, gather of the unbiased scores, normalization and routed scaling in one program per token.

Selection is a K-fold argmax (ties -> the lowest expert id; torch.topk leaves tie order unspecified),
so ids come out in the reference's slot order (descending biased score). Groups: the row is viewed
[G, E/G]; a group's score is its largest plus its second largest biased score (a repeated maximum
counts twice, as topk(2) does). The weights' fp32 normalization sum may differ from torch's in order.
Needs E a power of two split into power-of-two groups (DeepSeek-V3: 256 = 8 x 32; Moonlight: 64).
With a route recorder's rows (`record`), the weights are written there and the ids also as int32 (what the
recorder keeps), so recording takes no copy kernels. With `sigmoid`, the input is the router's fp32 logits
and the kernel applies torch's sigmoid first, 1 / (1 + exp(-x)) with libdevice's expf and an IEEE division
(Triton's own exp and fp32 `/` are approximate), instead of a separate torch kernel.
`gate_route_triton` also computes the logits (one program per expert; the last program to arrive routes the few
tokens of a decode step), so a small batch's router is one launch instead of a GEMM and this kernel.
Legend: T tokens, E experts, G groups, K experts per token, D hidden.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ...precision.kernels.pdl import pdl_args, pdl_wait
from ...precision.kernels.triton_mxfp8_gemm import _split_last, _split_locks

# Up to this many tokens (a decode batch of one) the Gate computes its logits inside the routing launch
# (`gate_route_triton`) instead of a cuBLAS GEMM before it. router_20261202.json (H200, benchmarks/router.py, us a
# call, fused / cuBLAS + route_topk_triton): 1 token moonlight 4.58 / 7.37, deepseek-v3 7.99 / 10.11; 2 tokens
# 6.96 / 7.39, 13.11 / 10.42; 4 tokens 11.56 / 7.21, 23.04 / 10.33 (the last program routes the tokens one after
# another). It was 4 before that measurement; the engine's decode at batch 4 is 2-3% faster with 1 (batch 2 within
# 1%: throughput_20261202f_router_*).
FUSED_GATE_MAX_TOKENS = 1
# warps of a `gate_route_triton` program: 1 warp measured 3.87 us at one moonlight token (2 warps 4.70), but the
# engine's batch-1 step did not move (2.177 / 2.175 / 2.184 ms bf16 with 1 / 4 / 1 warps, throughput_20261202e_*), so
# the bits stay those of 4
GATE_ROUTE_WARPS = 4


@triton.jit
def _route_row(row, scores_ptr, stride, bias_ptr, w_ptr, ids_ptr, rec_w_ptr, rec_ids_ptr, scale,
               E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NG: tl.constexpr, TG: tl.constexpr,
               NORM: tl.constexpr, RECORD: tl.constexpr, SIGMOID: tl.constexpr, S: tl.constexpr, SP: tl.constexpr):
    """Route token `row` (int64) from its E scores (or logits, SIGMOID) at scores_ptr + row * stride."""
    e = tl.arange(0, E)
    s = tl.load(scores_ptr + row * stride + e, cache_modifier=".cg")  # L2: other programs may have written them
    if SIGMOID:
        s = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-s))
    biased = s + tl.load(bias_ptr + e)
    if NG > 1:
        GS: tl.constexpr = E // NG
        x = tl.reshape(biased, (NG, GS))
        j = tl.arange(0, GS)[None, :]
        m1 = tl.max(x, 1)
        first = tl.min(tl.where(x == m1[:, None], j, GS), 1)
        m2 = tl.max(tl.where(j == first[:, None], float("-inf"), x), 1)
        score = m1 + m2
        g = tl.arange(0, NG)
        keep = g < 0
        for _ in tl.static_range(TG):
            best = tl.max(tl.where(keep, float("-inf"), score), 0)
            pick = tl.min(tl.where((score == best) & ~keep, g, NG), 0)
            keep = keep | (g == pick)
        biased = tl.reshape(tl.where(keep[:, None], x, float("-inf")), (E,))
    k = tl.arange(0, KP)
    ids = tl.zeros([KP], dtype=tl.int64)
    ws = tl.zeros([KP], dtype=tl.float32)
    for slot in tl.static_range(K):
        best = tl.max(biased, 0)
        pick = tl.min(tl.where(biased == best, e, E), 0)
        ids = tl.where(k == slot, pick.to(tl.int64), ids)
        ws = tl.where(k == slot, tl.sum(tl.where(e == pick, s, 0.0), 0), ws)
        biased = tl.where(e == pick, float("-inf"), biased)
    if NORM:
        ws = tl.math.div_rn(ws, tl.sum(ws, 0) + 1e-20)
    ws = ws * scale
    KS: tl.constexpr = K + S
    tl.store(w_ptr + row * KS + k, ws, mask=k < K)
    tl.store(ids_ptr + row * KS + k, ids, mask=k < K)
    if S > 0:  # the hosted shared experts E..E+S-1, weight 1
        j = tl.arange(0, SP)
        tl.store(w_ptr + row * KS + K + j, tl.full([SP], 1.0, tl.float32), mask=j < S)
        tl.store(ids_ptr + row * KS + K + j, (E + j).to(tl.int64), mask=j < S)
    if RECORD:
        if S > 0:  # the recorder's rows hold the routed choices only
            tl.store(rec_w_ptr + row * K + k, ws, mask=k < K)
        tl.store(rec_ids_ptr + row * K + k, ids.to(tl.int32), mask=k < K)


@triton.jit
def _route_kernel(scores_ptr, stride, bias_ptr, w_ptr, ids_ptr, rec_w_ptr, rec_ids_ptr, scale,
                  E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NG: tl.constexpr, TG: tl.constexpr,
                  NORM: tl.constexpr, RECORD: tl.constexpr, SIGMOID: tl.constexpr, S: tl.constexpr,
                  SP: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    _route_row(tl.program_id(0).to(tl.int64), scores_ptr, stride, bias_ptr, w_ptr, ids_ptr, rec_w_ptr, rec_ids_ptr,
               scale, E, K, KP, NG, TG, NORM, RECORD, SIGMOID, S, SP)


@triton.jit
def _gate_route_kernel(x_ptr, x_stride, g_ptr, logits_ptr, lock_ptr, T, D, bias_ptr, w_ptr, ids_ptr, rec_w_ptr,
                       rec_ids_ptr, scale, E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NG: tl.constexpr,
                       TG: tl.constexpr, NORM: tl.constexpr, RECORD: tl.constexpr, SIGMOID: tl.constexpr,
                       S: tl.constexpr, SP: tl.constexpr, TB: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """Program e: logits[:, e] = x @ gate[e] (fp32 products of the bf16 operands, exact, summed in fp32); the last
    program to arrive (`_split_last`) routes every token from the logits."""
    pdl_wait(PDL)
    e = tl.program_id(0)
    t = tl.arange(0, TB)
    tm = t < T
    acc = tl.zeros([TB], tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dm = d < D
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * x_stride + d[None, :], mask=tm[:, None] & dm[None, :],
                    other=0.0)
        w = tl.load(g_ptr + e.to(tl.int64) * D + d, mask=dm, other=0.0)
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :], 1)
    tl.store(logits_ptr + t * E + e, acc, mask=tm)
    if _split_last(lock_ptr, 0, E):
        for row in range(T):
            _route_row(tl.cast(row, tl.int64), logits_ptr, E, bias_ptr, w_ptr, ids_ptr, rec_w_ptr, rec_ids_ptr, scale,
                       E, K, KP, NG, TG, NORM, RECORD, SIGMOID, S, SP)


def _outputs(T: int, E: int, bias_E: torch.Tensor, top_k: int, n_group: int, topk_group: int, shared: int,
             record: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device):
    """Checked arguments -> (weights, ids, recorder weights, recorder ids, the kernels' constexprs)."""
    assert bias_E.shape == (E,) and bias_E.dtype == torch.float32 and bias_E.is_contiguous(), (bias_E.shape,
                                                                                                bias_E.dtype)
    assert E & (E - 1) == 0 and E % n_group == 0 and (E // n_group) & (E // n_group - 1) == 0, (E, n_group)
    assert 0 < top_k <= E and 0 < topk_group <= n_group, (E, n_group, top_k, topk_group)
    assert shared >= 0, shared
    rec_w = rec_ids = None
    if record is not None:
        rec_w, rec_ids = record
        assert rec_w.shape == rec_ids.shape == (T, top_k) and rec_w.is_contiguous() and rec_ids.is_contiguous(), (
            tuple(rec_w.shape), tuple(rec_ids.shape))
        assert rec_w.dtype == torch.float32 and rec_ids.dtype == torch.int32, (rec_w.dtype, rec_ids.dtype)
    weights = (rec_w if rec_w is not None and not shared
               else torch.empty(T, top_k + shared, dtype=torch.float32, device=device))
    ids = torch.empty(T, top_k + shared, dtype=torch.int64, device=device)
    consts = dict(E=E, K=top_k, KP=triton.next_power_of_2(top_k), NG=n_group, TG=topk_group,
                  RECORD=rec_ids is not None, S=shared, SP=triton.next_power_of_2(max(shared, 1)))
    return (weights, ids, weights if rec_w is None else rec_w, ids if rec_ids is None else rec_ids, consts)


def route_topk_triton(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                      norm_topk_prob: bool, routed_scaling_factor: float,
                      record: tuple[torch.Tensor, torch.Tensor] | None = None,
                      sigmoid: bool = False, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, K], ids int64 [T, K]) as route_topk_ref; with `record` (contiguous fp32 and int32 [T, K]
    rows of a route recorder) the weights returned are record[0] and the ids are also stored in record[1].
    sigmoid: scores_TE holds the logits (route_topk_ref(logits.sigmoid(), ...)). shared: S more columns
    [T, K + S], experts E..E+S-1 with weight 1 (shared experts hosted by the fused MoE; `route_topk`); the
    recorder then receives the K routed columns."""
    T, E = scores_TE.shape
    assert scores_TE.dtype == torch.float32 and scores_TE.stride(1) == 1, (scores_TE.dtype, scores_TE.stride())
    weights, ids, rec_w, rec_ids, consts = _outputs(T, E, bias_E, top_k, n_group, topk_group, shared, record,
                                                    scores_TE.device)
    if T:
        _route_kernel[(T,)](scores_TE, scores_TE.stride(0), bias_E, weights, ids, rec_w, rec_ids,
                            float(routed_scaling_factor), NORM=bool(norm_topk_prob), SIGMOID=bool(sigmoid), **consts,
                            num_warps=1 if E <= 128 else 2, **pdl_args(scores_TE))
    return weights, ids


def gate_route_triton(x_TD: torch.Tensor, gate_ED: torch.Tensor, bias_E: torch.Tensor, top_k: int, n_group: int,
                      topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
                      record: tuple[torch.Tensor, torch.Tensor] | None = None, sigmoid: bool = True,
                      shared: int = 0, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_topk_triton` of the fp32 logits x @ gate^T (bf16/fp16 operands) with the logits GEMV in the same
    launch: one program per expert, the last to arrive routes every token (serially: for a few tokens, the
    decode step's; `FUSED_GATE_MAX_TOKENS`). The logits are the fp32 sum of the exact products, in the kernel's
    order (cuBLAS sums in another: the same values to fp32 rounding)."""
    T, D = x_TD.shape
    E = gate_ED.shape[0]
    assert gate_ED.shape == (E, D) and gate_ED.is_contiguous() and x_TD.stride(1) == 1, (
        tuple(gate_ED.shape), x_TD.stride())
    assert x_TD.dtype == gate_ED.dtype and x_TD.dtype in (torch.bfloat16, torch.float16), (x_TD.dtype, gate_ED.dtype)
    weights, ids, rec_w, rec_ids, consts = _outputs(T, E, bias_E, top_k, n_group, topk_group, shared, record,
                                                    x_TD.device)
    if T:
        logits = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
        _gate_route_kernel[(E,)](x_TD, x_TD.stride(0), gate_ED, logits, _split_locks(x_TD.device), T, D, bias_E,
                                 weights, ids, rec_w, rec_ids, float(routed_scaling_factor), NORM=bool(norm_topk_prob),
                                 SIGMOID=bool(sigmoid), **consts, TB=max(2, triton.next_power_of_2(T)),
                                 BD=min(2048, triton.next_power_of_2(D)), num_warps=num_warps or GATE_ROUTE_WARPS,
                                 **pdl_args(x_TD))
    return weights, ids
