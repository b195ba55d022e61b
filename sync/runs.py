"""Adjacent tensors as one: views that sit back to back in one storage merge into a single flat view.

A weight update of a 16B MoE holds ~10k tensors, but staged back to back in a bucket (and landing in
stacked expert parameters) most of them are neighbours on both sides: one copy or one reduction per run
instead of one per tensor. Only exact neighbours merge (same storage, same dtype and device, contiguous,
the next one starting where the previous one ends), so a merged view covers exactly its members' bytes.
"""
from __future__ import annotations

import torch


def _end(t: torch.Tensor) -> int:
    return t.data_ptr() + t.numel() * t.element_size()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _follows(prev: torch.Tensor, t: torch.Tensor) -> bool:
    return (t.dtype == prev.dtype and t.device == prev.device and t.is_contiguous() and prev.is_contiguous()
            and t.data_ptr() == _end(prev) and _same_storage(prev, t))


def flat_run(first: torch.Tensor, numel: int) -> torch.Tensor:
    """A 1-d view of `numel` elements of `first`'s storage, starting where `first` starts."""
    return first.as_strided((numel,), (1,), first.storage_offset())


def merge_views(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[int]]]:
    """Consecutive neighbours merged: (flat view, indices of the members) per run, in order."""
    out: list[tuple[torch.Tensor, list[int]]] = []
    first = last = None
    members: list[int] = []
    numel = 0
    for i, t in enumerate(tensors):
        if last is not None and _follows(last, t):
            members.append(i)
            numel += t.numel()
        else:
            if first is not None:
                out.append((flat_run(first, numel) if len(members) > 1 else first, members))
            first, members, numel = t, [i], t.numel()
        last = t
    if first is not None:
        out.append((flat_run(first, numel) if len(members) > 1 else first, members))
    return out


def merge_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) copy pairs merged where both sides are neighbours of the previous pair's."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    run: list[tuple[torch.Tensor, torch.Tensor]] = []
    numel, run_plain = 0, False

    def close():
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append((flat_run(run[0][0], numel), flat_run(run[0][1], numel)))

    for dest, src in pairs:
        plain = dest.dtype == src.dtype and dest.numel() == src.numel()  # a plain byte copy, no cast/broadcast
        if run and plain and run_plain and _follows(run[-1][0], dest) and _follows(run[-1][1], src):
            run.append((dest, src))
            numel += dest.numel()
        else:
            close()
            run, numel, run_plain = [(dest, src)], dest.numel(), plain
    close()
    return out
