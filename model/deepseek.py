"""DeepSeek-V3: embedding, N blocks (MLA + dense MLP or MoE), final norm, lm_head.

Legend: T tokens, D hidden, V vocab.
"""
from __future__ import annotations

import torch
from torch import nn

from ..precision import linear

from .config import ModelConfig
from .layers import RMSNorm
from .mla import MLA, LatentCache
from .moe import MLP, MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = MLA(cfg, dtype)
        self.mlp = MoE(cfg, dtype) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x_TD, pos_T, cache: LatentCache, absorbed: bool) -> torch.Tensor:
        x_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), pos_T, cache, absorbed)
        return x_TD + self.mlp(self.post_attention_layernorm(x_TD))


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (self.embed_tokens if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype))
        self.lm_head.weight.requires_grad_(False)

    def postprocess(self, layouts) -> None:
        """Kernel-side weight layouts (cached gathers); run after loading and after each update."""
        for module in self.modules():
            if module is not self and hasattr(module, "postprocess"):
                module.postprocess(layouts)

    def new_cache(self, capacity: int, device: torch.device | str | None = None) -> list[LatentCache]:
        device = torch.device(device) if device is not None else self.embed_tokens.weight.device
        return [LatentCache(capacity, self.cfg, self.dtype, device) for _ in self.layers]

    @torch.inference_mode()
    def forward(self, ids_T: torch.Tensor, pos_T: torch.Tensor, cache: list[LatentCache],
                absorbed: bool = False) -> torch.Tensor:
        """Logits [T, V] in fp32 for one sequence's new tokens, appending their latents to `cache`."""
        x_TD = self.embed_tokens(ids_T)
        for block, layer_cache in zip(self.layers, cache):
            x_TD = block(x_TD, pos_T, layer_cache, absorbed)
        return linear(self.norm(x_TD), self.lm_head.weight).float()
