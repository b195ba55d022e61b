"""Batched NaN/inf check of a whole update: one concatenation and one reduction per ~1 GiB of
tensors of a kind, and one host sync per update, instead of a reduction and a sync per tensor (an
update of a 16B MoE holds ~16k tensors). Offenders are named by a per-tensor pass over the bad chunks only.

Kinds: e4m3 data (NaN bytes 0x7f / 0xff; e4m3fn has no inf), E8M0 scales (255 = NaN, 254 = what
the rceil rule gives for inf), floats (not finite).
"""
from __future__ import annotations

import torch

from ..model.names import SCALE_SUFFIX

CHUNK_BYTES = 1 << 30


def _kind(name: str, t: torch.Tensor) -> str | None:
    if t.dtype == torch.float8_e4m3fn:
        return "e4m3"
    if name.endswith(SCALE_SUFFIX):
        return "e8m0"
    return "float" if t.is_floating_point() else None


def _bad(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Elementwise: which entries are non-finite (x is uint8 for the byte kinds)."""
    if kind == "e4m3":
        return (x & 0x7F) == 0x7F
    if kind == "e8m0":
        return x >= 254
    return ~torch.isfinite(x)


class FiniteCheck:
    """Built once per update layout (it keeps flat views of the staged tensors, grouped in chunks);
    `run()` checks the current bytes and returns the names of offending tensors."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES):
        groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
        for name, t in named_tensors:
            kind = _kind(name, t)
            if kind is None or t.numel() == 0:
                continue
            flat = t.reshape(-1).view(torch.uint8) if kind != "float" else t.reshape(-1)
            groups.setdefault((kind, flat.dtype, flat.device), []).append((name, flat))
        self.chunks: list[tuple[str, list]] = []
        for (kind, _, _), members in groups.items():
            part, size = [], 0
            for name, flat in members:
                n = flat.numel() * flat.element_size()
                if part and size + n > chunk_bytes:
                    self.chunks.append((kind, part))
                    part, size = [], 0
                part.append((name, flat))
                size += n
            self.chunks.append((kind, part))

    def run(self) -> list[str]:
        flags = [_bad(kind, part[0][1] if len(part) == 1 else torch.cat([f for _, f in part])).any()
                 for kind, part in self.chunks]
        if not flags:
            return []
        bad = torch.stack([f.cpu() for f in flags])  # one sync per chunk (a few per update)
        return [name for (kind, part), b in zip(self.chunks, bad.tolist(), strict=True) if b
                for name, flat in part if bool(_bad(kind, flat).any())]

