"""Kernel-side weight layouts as gathers by cached permutation indices.

A layout transform (scale swizzle, row shuffle, gate/up interleave) is expressed as a flat
gather `dst = src.flatten()[index]`. The index depends only on (layout, shape), so it is built
once and every later weight update re-applies the cached gather. Index entries equal to
`src.numel()` select a zero pad element. Each engine owns one `LayoutCache`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def blocked_128x4_index(*shape: int) -> torch.Tensor:
    """cuBLAS/CUTLASS 128x4 block-scaling layout of [..., rows, cols] E8M0 scales (each matrix's
    rows padded to 128, cols to 4): 128x4 tiles in row-major tile order, each stored as
    [32][4][4] with offset (r % 32) * 16 + (r // 32) * 4 + c; leading dims (experts) stack.
    Returns, per output byte, its source index."""
    *lead, rows, cols = shape
    one = _blocked_2d(rows, cols)
    batch = 1
    for d in lead:
        batch *= d
    if batch == 1:
        return one
    total = batch * rows * cols
    offs = torch.arange(batch)[:, None] * (rows * cols)
    return torch.where(one[None, :] == rows * cols, total, one[None, :] + offs).reshape(-1)


def _blocked_2d(rows: int, cols: int) -> torch.Tensor:
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    r = torch.arange(pr)[:, None].expand(pr, pc)
    c = torch.arange(pc)[None, :].expand(pr, pc)
    src = torch.where((r < rows) & (c < cols), r * cols + c, rows * cols)
    dst = ((r // 128) * (pc // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    index = torch.empty(pr * pc, dtype=torch.long)
    index[dst.flatten()] = src.flatten()
    return index


BUILDERS = {"scale_128x4": blocked_128x4_index}


@dataclass
class LayoutCache:
    """(layout, shape, device) -> permutation index, built on first use."""

    indices: dict = field(default_factory=dict)
    builds: int = 0
    hits: int = 0

    def index(self, layout: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (layout, tuple(shape), str(device))
        idx = self.indices.get(key)
        if idx is None:
            idx = BUILDERS[layout](*shape).to(device)
            self.indices[key] = idx
            self.builds += 1
        else:
            self.hits += 1
        return idx

    def apply(self, layout: str, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather `src` into `layout` (into `out` in place when given)."""
        idx = self.index(layout, tuple(src.shape), src.device)
        flat = torch.cat([src.reshape(-1), src.new_zeros(1)])
        if out is None:
            return flat[idx]
        torch.index_select(flat, 0, idx, out=out.view(-1))
        return out
