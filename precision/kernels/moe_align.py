"""Sort (token, k) pairs by expert and pad each expert's run to a multiple of BM.

Fixed-size outputs (upper bound T*K + E*(BM-1) rows, rounded up to BM) and no host synchronisation, so
the step runs on the GPU inside CUDA graphs. One dispatch point, `align_block_size`: the Triton counting
sort (triton_moe_align.py) on CUDA, the torch-op version here elsewhere; both equal, bit for bit, the
Python loop reference `align_block_size_ref` (tests/precision/test_moe_align.py).
Legend: T tokens, K experts per token, E experts, BM rows per block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class Alignment:
    sorted_ids: torch.Tensor  # [R] flat (token * K + k) index per padded row; T*K marks padding
    block_expert: torch.Tensor  # [R / BM] expert of each block; E marks blocks past the end
    BM: int
    block_first: torch.Tensor  # [R / BM] the first block of each block's expert run (a block past the end: itself)


def padded_rows(n: int, num_experts: int, BM: int) -> int:
    """R: room for n rows when each of the experts' runs is padded to a multiple of BM."""
    return -(-(n + num_experts * (BM - 1)) // BM) * BM


def align_block_size(topk_ids_TK: torch.Tensor, num_experts: int, BM: int) -> Alignment:
    """The Triton kernel on CUDA (one or two launches), the torch ops elsewhere."""
    if topk_ids_TK.is_cuda:
        from .triton_moe_align import align_block_size_triton
        log.debug("align_block_size: Triton counting sort (%s ids, E=%d, BM=%d)", topk_ids_TK.numel(),
                  num_experts, BM)
        return align_block_size_triton(topk_ids_TK, num_experts, BM)
    log.debug("align_block_size: torch ops on %s (%s ids, E=%d, BM=%d)", topk_ids_TK.device, topk_ids_TK.numel(),
              num_experts, BM)
    return align_block_size_torch(topk_ids_TK, num_experts, BM)


def align_block_size_torch(topk_ids_TK: torch.Tensor, num_experts: int, BM: int) -> Alignment:
    """Torch ops: a stable argsort by expert, counts by scatter_add, run starts by cumsum."""
    flat = topk_ids_TK.reshape(-1)
    n = flat.numel()
    rows = padded_rows(n, num_experts, BM)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)  # bincount would sync
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
    padded = (counts + BM - 1) // BM * BM
    start = torch.cumsum(counts, 0) - counts
    pstart = torch.cumsum(padded, 0) - padded
    e_sorted = flat[order]
    pos = pstart[e_sorted] + torch.arange(n, device=flat.device) - start[e_sorted]
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(0, rows, BM, device=flat.device)
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_start, right=True).to(torch.int32)
    blocks = torch.arange(rows // BM, dtype=torch.int32, device=flat.device)
    run_first = (torch.cat([pstart, pstart.new_zeros(1)]) // BM).to(torch.int32)[block_expert.long()]
    block_first = torch.where(block_expert < num_experts, run_first, blocks)
    return Alignment(sorted_ids, block_expert, BM, block_first)


def align_block_size_ref(topk_ids_TK: torch.Tensor, num_experts: int, BM: int) -> tuple[list[int], list[int]]:
    """Python reference: rows per expert in token order, each run padded to BM; (row ids, expert of each block).
    A block's `block_first` is the first block of its run in that expert list (`block_first_ref`)."""
    flat = topk_ids_TK.reshape(-1).tolist()
    ids, experts = [], []
    for e in range(num_experts):
        run = [i for i, x in enumerate(flat) if x == e]
        if not run:
            continue
        run += [len(flat)] * (-len(run) % BM)
        ids += run
        experts += [e] * (len(run) // BM)
    return ids, experts


def block_first_ref(experts: list[int], n_blocks: int) -> list[int]:
    """The first block of each block's run, from `align_block_size_ref`'s experts; blocks past them: themselves."""
    out = []
    for b in range(n_blocks):
        if b < len(experts):
            out.append(b if b == 0 or experts[b - 1] != experts[b] else out[b - 1])
        else:
            out.append(b)
    return out
