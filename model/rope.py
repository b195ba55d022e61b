"""Rotary position embedding with DeepSeek-V3's YaRN extension.

Legend: T tokens, R rope head dim (qk_rope_head_dim), H heads.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [R/2] in fp32; YaRN blends interpolated and extrapolated ones."""
    rope, dim = cfg.rope, cfg.qk_rope_head_dim
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / base
    if not rope.is_yarn:
        return extrapolated
    interpolated = 1.0 / (rope.factor * base)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return interpolated * (1 - keep) + extrapolated * keep


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN's cos/sin multiplier: mscale(f, mscale) / mscale(f, mscale_all_dim) (1.0 for DeepSeek-V3)."""
    rope = cfg.rope
    if not rope.is_yarn:
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


class Rope(torch.nn.Module):
    """cos/sin of every position, computed once per forward for all layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Computed on the CPU and kept out of the parameters, so a model built on "meta" keeps it.
        self.inv_freq = inv_freq(cfg)
        self.scale = attention_factor(cfg)

    def cos_sin(self, pos_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != pos_T.device:
            self.inv_freq = self.inv_freq.to(pos_T.device)
        freqs = pos_T.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def rotate(x_THR: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], interleave: bool) -> torch.Tensor:
    """Rotate x [T, H, R] (at least fp32 math). Interleaved pairs (x0, x1), (x2, x3) come out de-interleaved
    as [evens | odds]; q and k get the same layout, so their dot product is unchanged."""
    cos, sin = (t[:, None, :] for t in cos_sin)
    x = x_THR.to(torch.promote_types(x_THR.dtype, torch.float32))
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_THR.dtype)
