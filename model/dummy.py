"""Random weights generated where the model lives (sglang's `load_format="dummy"`): for benchmarks
of large presets without writing tens of GB of checkpoint to disk.

Distributions follow `synthetic.random_tensor` (std 1/sqrt(fan_in), norms near 1, a small routing
bias, lm_head scaled for logits of std ~2), drawn on the device with one generator per parameter
seeded by (seed, name). MXFP8 parameters get the recipe's quantization of such bf16 weights,
one expert at a time to bound the temporary memory.
"""
from __future__ import annotations

import zlib

import torch

from ..precision.mxfp8 import quantize
from .deepseek import DeepseekV3

SCALE = "_scale_inv"


@torch.no_grad()
def init_dummy_weights(model: DeepseekV3, seed: int = 0) -> None:
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(SCALE):
            continue  # written with its data below
        g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("e_score_correction_bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g, device=p.device))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=p.device))
        elif p.dtype == torch.float8_e4m3fn:
            scale = params[name + SCALE]
            mode = model.plan.recipe.scale_mode if model.plan else "rceil"
            for i in range(p.shape[0] if p.dim() == 3 else 1):  # per expert
                dst, sdst = (p[i], scale[i]) if p.dim() == 3 else (p, scale)
                w = torch.randn(dst.shape, generator=g, device=p.device) / dst.shape[-1] ** 0.5
                data, s = quantize(w.to(torch.bfloat16), scale_mode=mode)
                dst.copy_(data)
                sdst.copy_(s)
        else:
            std = 1.0 if "embed_tokens" in name else (2.0 if name == "lm_head.weight" else 1.0) / p.shape[-1] ** 0.5
            p.copy_((torch.randn(p.shape, generator=g, device=p.device) * std).to(p.dtype))


@torch.no_grad()
def pin_routing(model: DeepseekV3) -> None:
    """Make every token choose experts 0..k-1 (a large selection bias; the weights stay the unbiased
    scores). Random-weight MoE stacks route near ties everywhere, so bf16 rounding differences between
    two correct kernels flip expert choices and the paths diverge chaotically; with pinned routes a
    comparison of two paths measures the kernels."""
    k = model.cfg.num_experts_per_tok
    for i in model.moe_layers:
        bias = model.layers[i].mlp.gate.e_score_correction_bias
        bias.zero_()
        bias[:k] = 10.0
