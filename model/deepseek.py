"""DeepSeek-V3: embedding, N blocks (MLA + dense MLP or MoE), final norm, lm_head.

The forward takes the new tokens of any number of sequences as one flat batch (their positions,
and an attention backend that knows where each sequence's cache pages are).
Legend: T tokens, D hidden, V vocab, S rows whose logits are computed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..precision import Precision, linear
from .attention import SequenceAttention
from .config import ModelConfig
from .kernels import ModelKernels
from .layers import RMSNorm, fused_norm_quant
from .mla import MLA, AttentionBackend
from .moe import MLP, MoE, RouteRecorder
from .rope import Rope


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, prec: Precision, moe_index: int | None,
                 kernels: ModelKernels):
        super().__init__()
        self.self_attn = MLA(cfg, dtype, prec.child("self_attn"), layer, kernels)
        self.mlp = (MoE(cfg, dtype, prec.child("mlp"), moe_index, kernels) if moe_index is not None
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, prec.child("mlp"), kernels.act))
        # the GEMMs each norm feeds; where all are MXFP8 w8a8 the norm's kernel quantizes for them
        a, m = prec.child("self_attn"), prec.child("mlp")
        attn_in = [a.child("q_proj" if cfg.q_lora_rank is None else "q_a_proj"), a.child("kv_a_proj_with_mqa")]
        mlp_in = ([m.child("experts")] + [m.child("shared_experts").child(n) for n in ("gate_proj", "up_proj")
                                          if cfg.n_shared_experts] if moe_index is not None
                  else [m.child("gate_proj"), m.child("up_proj")])
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, dtype, kernels.norm, fused_norm_quant(kernels.norm, attn_in),
                                       keep_normed=False)
        self.post_attention_layernorm = RMSNorm(D, eps, dtype, kernels.norm, fused_norm_quant(kernels.norm, mlp_in),
                                                keep_normed=moe_index is not None)  # the router takes it

    def forward(self, x_TD, delta_TD, cos_sin, attn: AttentionBackend, routes: RouteRecorder | None):
        """The residual stream is x + delta (delta None before the first block); each add happens inside
        the next norm (`RMSNorm.add_for_gemm`, which may also hand the GEMMs its output quantize-dequantized:
        hq). Returns the next (x, delta)."""
        h_TD, hq_TD, x_TD = self.input_layernorm.add_for_gemm(x_TD, delta_TD)
        delta_TD = self.self_attn(h_TD if hq_TD is None else hq_TD, cos_sin, attn, hq_TD is not None)
        h_TD, hq_TD, x_TD = self.post_attention_layernorm.add_for_gemm(x_TD, delta_TD)
        return x_TD, self.mlp(h_TD, routes, hq_TD)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, prec: Precision = Precision(),
                 kernels: ModelKernels = ModelKernels()):
        super().__init__()
        self.cfg, self.dtype, self.plan, self.kernels, self.gemm = cfg, dtype, prec.plan, kernels, prec.gemm
        self.moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(cfg, i, dtype, prec.child(f"layers.{i}"), self.moe_layers.index(i) if i in self.moe_layers else None,
                  kernels)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, kernels.norm)
        self.lm_head = (self.embed_tokens if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype))
        self.lm_head.weight.requires_grad_(False)
        self.rope = Rope(cfg)

    def postprocess(self, layouts) -> None:
        """Kernel-side weight layouts (cached gathers); run after loading and after each update."""
        for module in self.modules():
            if module is not self and hasattr(module, "postprocess"):
                module.postprocess(layouts)

    def bf16_copies(self) -> list[torch.Tensor]:
        """The exact bf16 copies its MXFP8 dense weights keep now (`precision.linear.bf16_copy`)."""
        return [m.weight_bf16 for m in self.modules() if getattr(m, "weight_bf16", None) is not None]

    def drop_derived(self) -> None:
        """Free the postprocessed layouts and weight copies (weights moved to host); postprocess rebuilds them."""
        for module in self.modules():
            if module is not self and hasattr(module, "drop_derived"):
                module.drop_derived()

    def forward(self, ids_T: torch.Tensor, pos_T: torch.Tensor, attn: AttentionBackend,
                routes: RouteRecorder | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, D] of a flat batch of new tokens; their latents go into `attn`'s cache."""
        cos_sin = self.rope.cos_sin(pos_T)
        x_TD, delta_TD = self.embed_tokens(ids_T), None
        for block in self.layers:
            x_TD, delta_TD = block(x_TD, delta_TD, cos_sin, attn, routes)
        return self.norm.add(x_TD, delta_TD)[0]

    def logits(self, h_SD: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [S, V]: the lm_head GEMM accumulates and outputs fp32 (DESIGN.md, Logits); written into
        `out` when given (a CUDA graph's fixed buffer: no copy of S x V fp32 values afterwards)."""
        return linear(h_SD, self.lm_head.weight, self.gemm, out_dtype=torch.float32, out=out)

    # ---- one sequence through the torch reference (tests, checks) ----
    def new_cache(self, capacity: int, device: torch.device | str | None = None, mode: str = "auto"):
        device = device if device is not None else self.embed_tokens.weight.device
        return SequenceAttention(self.cfg, capacity, self.dtype, device, mode)

    @torch.inference_mode()
    def sequence_logits(self, ids_T: torch.Tensor, pos_T: torch.Tensor, cache: SequenceAttention) -> torch.Tensor:
        """fp32 logits [T, V] of one sequence's new tokens at `pos_T`, appending their latents to `cache`."""
        cache.begin(pos_T)
        return self.logits(self.forward(ids_T, pos_T, cache))
