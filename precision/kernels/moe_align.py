"""Sort (token, k) pairs by expert and pad each expert's run to a multiple of BM.

Fixed-size outputs (upper bound T*K + E*(BM-1) rows) and no host synchronisation, so the step
runs on the GPU inside CUDA graphs. Pure torch ops; the reference is a Python loop (tests).
Legend: T tokens, K experts per token, E experts, BM rows per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    sorted_ids: torch.Tensor  # [R] flat (token * K + k) index per padded row; T*K marks padding
    block_expert: torch.Tensor  # [R / BM] expert of each block; E marks blocks past the end
    BM: int


def align_block_size(topk_ids_TK: torch.Tensor, num_experts: int, BM: int) -> Alignment:
    flat = topk_ids_TK.reshape(-1)
    n = flat.numel()
    rows = n + num_experts * (BM - 1)
    rows = -(-rows // BM) * BM
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
    return Alignment(sorted_ids, block_expert, BM)


def align_block_size_ref(topk_ids_TK: torch.Tensor, num_experts: int, BM: int) -> tuple[list[int], list[int]]:
    """Python reference: rows per expert in token order, each run padded to BM."""
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

