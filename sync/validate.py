"""Batched NaN/inf check of a whole update: one reduction per run of neighbouring tensors of a kind
(a bucket staged back to back is a few runs; pieces of at most CHUNK_BYTES bound the temporary), small
scattered tensors concatenated into chunks, and one host sync per update, instead of a reduction and a
sync per tensor (an update of a 16B MoE holds ~10k tensors). Offenders are named by a per-tensor pass
over the bad pieces only.

Kinds: e4m3 data (NaN bytes 0x7f / 0xff; e4m3fn has no inf), E8M0 scales (255 = NaN, 254 = what
the rceil rule gives for inf), floats (not finite). On CUDA the reduction is `finite_kernel`'s one-pass
Triton kernel (no temporary); `_bad(...).any()` is its reference and the path elsewhere.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from ..model.names import SCALE_SUFFIX
from .runs import merge_views

CHUNK_BYTES = 256 << 20
log = logging.getLogger(__name__)


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

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES,
                 backend: str | None = None):
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
                if len(part) > 1 or n >= chunk_bytes // 4:  # a run: reduced in place, in pieces
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
        devices = {view.device.type if view is not None else part[0][1].device.type for _, view, part in self.checks}
        if backend is None:  # the one-pass kernel on CUDA; the torch reduction elsewhere
            backend = "triton" if devices == {"cuda"} and importlib.util.find_spec("triton") else "torch"
        if backend not in ("torch", "triton"):
            raise ValueError(f"FiniteCheck: backend={backend!r} must be 'torch', 'triton' or None")
        self.backend = backend
        log.info("weight update NaN/inf check: %s path, %d reductions over %d tensors", backend, len(self.checks),
                 sum(len(p) for _, _, p in self.checks))

    def run(self) -> list[str]:
        if not self.checks:
            return []
        views = [view if view is not None else part[0][1] if len(part) == 1 else torch.cat([f for _, f in part])
                 for _, view, part in self.checks]
        if self.backend == "triton":
            from .finite_kernel import any_bad_

            flags = torch.zeros(len(self.checks), dtype=torch.int32, device=views[0].device)
            for i, ((kind, _, _), view) in enumerate(zip(self.checks, views)):
                any_bad_(kind, view, flags, i)
        else:
            flags = torch.stack([_bad(kind, view).any() for (kind, _, _), view in zip(self.checks, views)])
        bad = flags.cpu()  # one sync per update
        names: dict[str, None] = {}
        for (kind, _, part), b in zip(self.checks, bad.tolist(), strict=True):
            if b:
                names.update((name, None) for name, flat in part if bool(_bad(kind, flat).any()))
        return list(names)
