"""Flattened buckets: many tensors of mixed dtypes in one uint8 buffer, one broadcast per bucket.

Layout (sglang's FlattenedTensorBucket): the tensors' bytes back to back, in `names` order, no
padding; each tensor is recovered from (dtype, shape) by its byte offset. Dtypes travel as strings
("bfloat16", "float8_e4m3fn", "uint8", ...), as in sglang's update_weights_from_distributed.
"""
from __future__ import annotations

import torch

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float8_e4m3fn", "uint8",
                                                   "float8_e8m0fnu", "int32", "int64")}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r}; supported: {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype | str) -> str:
    """The wire name of a dtype ("bfloat16"); a name passes through."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def pack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate the tensors' bytes into one uint8 buffer (into `out` when given)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    if out is None:
        out = torch.empty(total, dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    elif out.numel() < total:
        raise ValueError(f"bucket buffer of {out.numel()} bytes is smaller than its {total} bytes")
    torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors], out=out[:total])  # a few launches, not one per tensor
    return out[:total]


def unpack(buffer: torch.Tensor, dtypes: list[torch.dtype], shapes: list) -> list[torch.Tensor]:
    """Views of the tensors inside a packed buffer (no copy)."""
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes, strict=True):
        n = nbytes(dtype, shape)
        raw = buffer[offset:offset + n]
        if offset % dtype.itemsize:  # packed without padding: a misaligned tensor needs its own copy
            raw = raw.clone()
        out.append(raw.view(dtype).view(*shape))
        offset += n
    if offset != buffer.numel():
        raise ValueError(f"bucket of {buffer.numel()} bytes does not match its tensors' {offset} bytes")
    return out
