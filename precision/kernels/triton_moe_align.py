"""Triton align-block-size: a stable counting sort of the (token, k) rows by expert, one or two launches.

Program (g, c) owns experts g*EPP .. g*EPP+EPP-1 and chunk c (CHUNK consecutive flat ids). Every program
derives, from the per-expert counts and with no communication, the padded start of its expert's run (sum
of the padded counts of lower experts) plus the rows of earlier chunks in that run; a cumulative sum of
(id == e) over its chunk ranks the chunk's rows, so each run keeps flat (token * K + k) order. The counts
are a histogram of the single chunk inside the same launch when N <= CHUNK (decode), else a first launch
writes every chunk's histogram [n_chunks, EP] (and an int32 copy of the ids that the second launch reads
E/EPP times). Each output element is written by one program, or by several with the same value
(block_expert and block_first, the first block of its expert's run, of a block that several chunks fill): no
atomics, no memset, fixed-size outputs, no host synchronisation, so the step is captured in CUDA graphs.
Reference: `moe_align.align_block_size_torch`.
Legend: N = T*K flat ids, E experts (EP: bins, a power of two >= 32), BM rows per block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_align import Alignment, padded_rows


@triton.jit
def _chunk_counts_kernel(ids_ptr, ids32_ptr, counts_ptr, N, EP: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < N
    x = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
    tl.store(ids32_ptr + offs, x, mask=valid)
    tl.store(counts_ptr + c * EP + tl.arange(0, EP), tl.histogram(x, EP, mask=valid))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, sorted_ptr, bexp_ptr, bfirst_ptr, N, E, n_chunks, n_blocks, BM: tl.constexpr,
                  EP: tl.constexpr, CHUNK: tl.constexpr, NCP: tl.constexpr, EPP: tl.constexpr,
                  FUSED: tl.constexpr):
    g = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < N
    x = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    bins = tl.arange(0, EP)
    if FUSED:  # one chunk: its histogram is every count
        cnt = tl.histogram(x, EP, mask=valid)
        before = tl.zeros([EP], dtype=tl.int32)
    else:
        rows = tl.arange(0, NCP)
        mask = (rows[:, None] < n_chunks) & (bins[None, :] < EP)
        counts = tl.load(counts_ptr + rows[:, None] * EP + bins[None, :], mask=mask, other=0)
        cnt = tl.sum(counts, 0)
        before = tl.sum(tl.where(rows[:, None] < c, counts, 0), 0)  # this chunk's rows start after these
    padded = (cnt + BM - 1) // BM * BM
    start = tl.cumsum(padded, 0) - padded
    total = tl.sum(padded, 0)
    first = c == 0
    lane = tl.arange(0, BM)
    for i in tl.static_range(EPP):
        e = g * EPP + i
        sel = bins == e
        base = tl.sum(tl.where(sel, start + before, 0), 0)
        hit = x == e
        dest = base + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + dest, offs, mask=hit)
        tl.store(bexp_ptr + dest // BM, tl.zeros([CHUNK], dtype=tl.int32) + e, mask=hit)  # same value if shared
        e_start = tl.sum(tl.where(sel, start, 0), 0)
        tl.store(bfirst_ptr + dest // BM, tl.zeros([CHUNK], dtype=tl.int32) + e_start // BM, mask=hit)
        # chunk 0 also pads expert e's run to its multiple of BM and writes tail block e (past the last run)
        pad = e_start + tl.sum(tl.where(sel, cnt, 0), 0) + lane
        run_end = e_start + tl.sum(tl.where(sel, padded, 0), 0)
        tl.store(sorted_ptr + pad, tl.zeros([BM], dtype=tl.int32) + N, mask=first & (pad < run_end))
        tb = total // BM + e
        tail = first & (e < E) & (tb < n_blocks)
        tl.store(sorted_ptr + tb * BM + lane, tl.zeros([BM], dtype=tl.int32) + N, mask=tail)
        tl.store(bexp_ptr + tb, E, mask=tail)
        tl.store(bfirst_ptr + tb, tb, mask=tail)


def align_config(n: int, num_experts: int) -> dict:
    """One launch up to 4096 ids (a chunk of them histogrammed by every program); beyond, chunks of
    4096 with a few experts per program, so that each chunk is read fewer times."""
    if n <= 4096:
        return dict(CHUNK=max(triton.next_power_of_2(n), 128), EPP=1, num_warps=4 if n <= 1024 else 8)
    return dict(CHUNK=4096, EPP=4, num_warps=8)


def align_block_size_triton(topk_ids_TK: torch.Tensor, num_experts: int, BM: int,
                            config: dict | None = None) -> Alignment:
    """`align_block_size_torch`'s outputs, bit for bit. Ids must lie in [0, num_experts) (not checked:
    that would synchronise); BM a power of two."""
    if BM < 1 or BM & (BM - 1):
        raise ValueError(f"align_block_size: BM={BM} must be a power of two")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"align_block_size: ids must be int32/int64, got {topk_ids_TK.dtype}")
    flat = topk_ids_TK.reshape(-1).contiguous()
    n, E = flat.numel(), num_experts
    rows = padded_rows(n, E, BM)
    cfg = dict(config or align_config(n, E))
    CHUNK, EPP = cfg.pop("CHUNK"), cfg.pop("EPP")
    EP = max(triton.next_power_of_2(E), 32)
    n_chunks = max(1, triton.cdiv(n, CHUNK))
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(rows // BM, dtype=torch.int32, device=flat.device)
    block_first = torch.empty_like(block_expert)
    fused = n_chunks == 1
    ids, counts = flat, block_expert  # counts unused when fused
    if not fused:
        ids = torch.empty(n, dtype=torch.int32, device=flat.device)
        counts = torch.empty(n_chunks, EP, dtype=torch.int32, device=flat.device)
        _chunk_counts_kernel[(n_chunks,)](flat, ids, counts, n, EP=EP, CHUNK=CHUNK, **cfg)
    _place_kernel[(triton.cdiv(E, EPP), n_chunks)](
        ids, counts, sorted_ids, block_expert, block_first, n, E, n_chunks, rows // BM, BM=BM, EP=EP, CHUNK=CHUNK,
        NCP=triton.next_power_of_2(n_chunks), EPP=EPP, FUSED=fused, **cfg)
    return Alignment(sorted_ids, block_expert, BM, block_first)
