"""MXFP8 (OCP MX, e4m3 elements, one E8M0 scale per 32 elements along the last dim).

Byte-identical to torchao's `to_mx` in the matching mode:
- ``rceil`` (TransformerEngine / torchao MXFP8 training / FlashInfer): scale byte =
  ceil(log2(amax / 448)) + 127, clamped to [0, 254]; elements = clamp(x * 2^(127 - byte), +-448).
  A byte of 0 (all-zero or tiny blocks) scales by 1, not 2^127.
- ``floor`` (OCP spec): byte = floor(log2(amax)) - 8 + 127 from amax's exponent bits (clamped to
  [0, 255]); elements = clamp(x / 2^(byte - 127), +-448) with the divisor at least 2^-126.
Elements are cast to float8_e4m3fn with round-to-nearest-even.

Non-finite input (the behaviour is torchao's, kept so bytes stay identical):
- a block holding NaN gets scale byte 255 (the E8M0 NaN); its NaN elements stay NaN;
- a block holding +-inf gets byte 254 (rceil) or 247 (floor); inf elements saturate to +-448.
Weights with such blocks are rejected where weights enter the engine (`has_nonfinite`).

Legend: K the quantized (last, contraction) dim, B = K / 32 blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_MODES = ("rceil", "floor")
_E4M3_MAX_POW2 = 8  # 448 = 1.75 * 2^8
_F32_MIN_NORMAL = 2.0**-126


def quantize(x: torch.Tensor, block_size: int = BLOCK, scale_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (fp32/bf16/fp16; fp64 is rounded to fp32 first) -> (data [..., K] float8_e4m3fn,
    scale [..., K/32] uint8 E8M0)."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r}; supported: {SCALE_MODES}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"quantize: input dtype {x.dtype} is not fp32/bf16/fp16/fp64")
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"quantize: last dim of shape {tuple(x.shape)} must be a multiple of {block_size}")
    shape = x.shape
    xb = x.contiguous().float().reshape(*shape[:-1], shape[-1] // block_size, block_size)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    if scale_mode == "rceil":
        scale, data = _rceil(xb, amax)
    else:
        scale, data = _floor(xb, amax)
    return data.to(torch.float8_e4m3fn).reshape(shape), scale.squeeze(-1)


def _rceil(xb: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    descale = amax / E4M3_MAX
    finite = torch.clamp(torch.ceil(torch.log2(descale)), -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    scale = torch.where(descale.isnan(), E8M0_NAN, torch.where(descale.isinf(), 254, finite.to(torch.uint8)))
    scale = scale.to(torch.uint8)
    rcp = torch.where(scale == 255, descale,
                      torch.where(scale == 254, 2.0**-127,
                                  torch.where(scale == 0, 1.0, torch.exp2(E8M0_BIAS - scale.float()))))
    return scale, torch.clamp(xb * rcp, -E4M3_MAX, E4M3_MAX)


def _floor(xb: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pow2 = ((amax.view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS
    unbiased = torch.clamp(pow2 - _E4M3_MAX_POW2, -E8M0_BIAS, E8M0_BIAS + 1)
    scale = (unbiased + E8M0_BIAS).to(torch.uint8)
    scale = torch.where(amax.isnan(), torch.full_like(scale, E8M0_NAN), scale)
    divisor = torch.clamp((scale.to(torch.int32) << 23).view(torch.float32), min=_F32_MIN_NORMAL)
    return scale, torch.clamp(xb / divisor, -E4M3_MAX, E4M3_MAX)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> fp32 2^(byte - 127); 255 -> NaN."""
    f = torch.exp2(scale.to(torch.float32) - E8M0_BIAS)
    return torch.where(scale == E8M0_NAN, torch.nan, f)


def dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               block_size: int = BLOCK) -> torch.Tensor:
    """Exact: e4m3 * 2^k is representable in bf16/fp32 (up to bf16 subnormal rounding below 2^-126)."""
    check_pair(data, scale, block_size)
    shape = data.shape
    xb = data.float().reshape(*shape[:-1], shape[-1] // block_size, block_size)
    return (xb * scale_to_float(scale)[..., None]).reshape(shape).to(dtype)


def check_pair(data: torch.Tensor, scale: torch.Tensor, block_size: int = BLOCK) -> None:
    if data.dtype != torch.float8_e4m3fn:
        raise TypeError(f"MXFP8 data must be float8_e4m3fn, got {data.dtype}")
    if scale.dtype != torch.uint8:
        raise TypeError(f"MXFP8 scale must be uint8 (E8M0), got {scale.dtype}")
    expected = (*data.shape[:-1], data.shape[-1] // block_size)
    if data.shape[-1] % block_size or tuple(scale.shape) != expected:
        raise ValueError(f"MXFP8 scale shape {tuple(scale.shape)} does not fit data {tuple(data.shape)} "
                         f"(expected {expected})")


def has_nonfinite(data: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> bool:
    """True when a block came from NaN/inf input: E8M0 bytes 255, or 254 which rceil uses for inf;
    or e4m3 NaN elements (0x7f / 0xff)."""
    bad = scale is not None and bool((scale.view(torch.uint8) >= 254).any())
    return bad or (data is not None and bool(((data.view(torch.uint8) & 0x7F) == 0x7F).any()))


@dataclass
class MXFP8Tensor:
    """A logical [..., K] tensor stored as e4m3 data [..., K] + E8M0 scales [..., K/32] (linear layout)."""

    data: torch.Tensor
    scale: torch.Tensor
    block_size: int = BLOCK
    swizzled_scale: torch.Tensor | None = None  # kernel-side 128x4 layout, when a backend needs it
    bf16_copy: torch.Tensor | None = None  # exact bf16 dequantization kept beside a dense weight (`bf16_copy`)

    def __post_init__(self):
        check_pair(self.data, self.scale, self.block_size)

    @classmethod
    def quantize(cls, x: torch.Tensor, scale_mode: str = "rceil", block_size: int = BLOCK) -> "MXFP8Tensor":
        return cls(*quantize(x, block_size, scale_mode), block_size)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.data, self.scale, dtype, self.block_size)

    def __getitem__(self, idx) -> "MXFP8Tensor":
        """Index leading dims (e.g. one expert of a stacked [E, N, K] weight)."""
        return MXFP8Tensor(self.data[idx], self.scale[idx], self.block_size)  # swizzled layout is per 2-D weight
