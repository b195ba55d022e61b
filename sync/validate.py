"""Batched NaN/inf check of a whole update: one reduction per run of neighbouring tensors of a kind
(a bucket staged back to back is a few runs; pieces of at most CHUNK_BYTES bound the temporary), small
scattered tensors concatenated into chunks, and one host sync per update, instead of a reduction and a
sync per tensor (an update of a 16B MoE holds ~10k tensors). Offenders are named by a per-tensor pass
over the bad pieces only.

Kinds: e4m3 data (NaN bytes 0x7f / 0xff; e4m3fn has no inf), E8M0 scales (255 = NaN, 254 = what
the rceil rule gives for inf), floats (not finite).
"""
from __future__ import annotations

import torch

from ..model.names import SCALE_SUFFIX
from .runs import merge_views

CHUNK_BYTES = 256 << 20


def _kind(name: str, t: torch.Tensor) -> str | None:
    if t.dtype == torch.float8_e4m3fn:
        return "e4m3"
    if name.endswith(SCALE_SUFFIX):
        return "e8m0"
    return "float" if t.is_floating_point() else None


def _bad(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Elementwise: which entries are non-finite (x is uint8 for the byte kinds)."""
    if kind == "e4m3":
        return torch.isnan(x.view(torch.float8_e4m3fn))  # NaN bytes 0x7f / 0xff: one pass
    if kind == "e8m0":
        return x >= 254
    return ~torch.isfinite(x)


class FiniteCheck:
    """Built once per update layout (it keeps flat views of the staged tensors: neighbours in memory
    merged into one view, the rest grouped in chunks); `run()` checks the current bytes and returns
    the names of offending tensors."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES):
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, t in named_tensors:
            kind = _kind(name, t)
            if kind is None or t.numel() == 0:
                continue
            flat = t.reshape(-1).view(torch.uint8) if kind != "float" else t.reshape(-1)
            groups.setdefault((kind, flat.dtype, flat.device), []).append((name, flat))
        # checks: (kind, view to reduce, members as (name, flat)); a run of neighbours is reduced in place,
        # small scattered tensors are concatenated up to chunk_bytes (one reduction each way)
        self.checks: list[tuple[str, torch.Tensor | None, list]] = []
        for (kind, _, _), members in groups.items():
            scattered, size = [], 0
            for view, idx in merge_views([flat for _, flat in members]):
                part = [members[i] for i in idx]
                n = view.numel() * view.element_size()
                if len(part) > 1 or n >= chunk_bytes // 4:
                    for lo in range(0, view.numel(), max(1, chunk_bytes // view.element_size())):
                        self.checks.append((kind, view[lo:lo + chunk_bytes // view.element_size()], part))
                    continue
                if scattered and size + n > chunk_bytes:
                    self.checks.append((kind, None, scattered))
                    scattered, size = [], 0
                scattered += part
                size += n
            if scattered:
                self.checks.append((kind, None, scattered))

    def run(self) -> list[str]:
        flags = [_bad(kind, view if view is not None else part[0][1] if len(part) == 1
                      else torch.cat([f for _, f in part])).any() for kind, view, part in self.checks]
        if not flags:
            return []
        bad = torch.stack(flags).cpu()  # one sync per update
        names: dict[str, None] = {}
        for (kind, _, part), b in zip(self.checks, bad.tolist(), strict=True):
            if b:
                names.update((name, None) for name, flat in part if bool(_bad(kind, flat).any()))
        return list(names)
