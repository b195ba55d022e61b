"""Triton NaN/inf flag of a flat view in one read pass (the torch reference `validate._bad` + `.any()`
makes an elementwise temporary and reads it again: three passes over ~17 GB for a 16B MoE update).

`any_bad_(kind, x, flags, slot)` sets flags[slot] to 1 when x holds a non-finite entry of its kind
(e4m3 bytes 0x7f / 0xff; E8M0 bytes 254 / 255; floats not finite); it never clears a flag, so one
zeroed int32 flags tensor collects a whole update's checks and is read back once.
Legend: N elements of the flat view.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = {"e4m3": 0, "e8m0": 1, "float": 2}
BLOCK = 8192


@triton.jit
def _any_bad_kernel(x_ptr, flag_ptr, N, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if KIND == 0:
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32)
        bad = (x & 0x7F) == 0x7F
    elif KIND == 1:
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32)
        bad = x >= 254
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad = (x != x) | (tl.abs(x) == float("inf"))
    found = tl.max(bad.to(tl.int32), axis=0)
    if found > 0:
        tl.store(flag_ptr, 1)


def any_bad_(kind: str, x_N: torch.Tensor, flags: torch.Tensor, slot: int) -> None:
    """flags[slot] = 1 if x holds a non-finite entry (x: uint8 for the byte kinds, a float dtype otherwise)."""
    n = x_N.numel()
    if n == 0:
        return
    _any_bad_kernel[(triton.cdiv(n, BLOCK),)](x_N, flags[slot:], n, KIND=KINDS[kind], BLOCK=BLOCK)
