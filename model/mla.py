"""Multi-head Latent Attention (DeepSeek-V2/V3).

Legend: T query tokens, S cached positions, D hidden, H heads, P qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank (the compressed latent that is cached).

Two mathematically equal paths over the same latent cache:
- naive (prefill): expand the latent through kv_b_proj into per-head K_nope and V, attend.
- absorbed (decode): fold W_UK into q and W_UV after attention, attend directly over the latent.
  kv_b_proj stays high precision because this path contracts W_UK over P, across the blocks a
  trainer quantizes along C (see DESIGN.md).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import Rope


class LatentCache:
    """One sequence's compressed KV for one layer: normalized latent [S, C] and rotated k_pe [S, R]."""

    def __init__(self, capacity: int, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.kv_SC = torch.empty(capacity, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe_SR = torch.empty(capacity, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0

    def append(self, kv_TC: torch.Tensor, pe_TR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + kv_TC.shape[0]
        if end > self.kv_SC.shape[0]:
            raise RuntimeError(f"latent cache full: {end} positions > capacity {self.kv_SC.shape[0]}")
        self.kv_SC[self.length:end] = kv_TC
        self.pe_SR[self.length:end] = pe_TR
        self.length = end
        return self.kv_SC[:end], self.pe_SR[:end]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.nope, self.rope_dim = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, dtype)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, dtype)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype)
        self.o_proj = Linear(H * cfg.v_head_dim, D, dtype)
        self.rope = Rope(cfg)

    def forward(self, x_TD: torch.Tensor, pos_T: torch.Tensor, cache: LatentCache, absorbed: bool) -> torch.Tensor:
        T = x_TD.shape[0]
        cos_sin = self.rope.cos_sin(pos_T)
        q = self.q_proj(x_TD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD)))
        q_nope_THP, q_pe_THR = q.view(T, self.n_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        q_pe_THR = self.rope(q_pe_THR, cos_sin)
        kv_TC, k_pe_TR = self.kv_a_proj_with_mqa(x_TD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe_TR = self.rope(k_pe_TR[:, None, :], cos_sin)[:, 0]
        kv_SC, k_pe_SR = cache.append(self.kv_a_layernorm(kv_TC), k_pe_TR)
        mask_TS = torch.arange(kv_SC.shape[0], device=x_TD.device)[None, :] <= pos_T[:, None]
        attend = self._absorbed if absorbed else self._naive
        o_THV = attend(q_nope_THP, q_pe_THR, kv_SC, k_pe_SR, mask_TS)
        return self.o_proj(o_THV.reshape(T, -1).to(x_TD.dtype))

    def _softmax(self, scores_HTS: torch.Tensor, mask_TS: torch.Tensor) -> torch.Tensor:
        return (scores_HTS * self.scale).masked_fill(~mask_TS, float("-inf")).softmax(dim=-1)

    # Scores, their scale and softmax, and probabilities x V run in (at least) fp32 and only the attention
    # output is cast back: rounding each score term to bf16 before adding them made a bf16 engine noisier
    # than HF's bf16 eager attention.
    def _naive(self, q_nope_THP, q_pe_THR, kv_SC, k_pe_SR, mask_TS):
        S = kv_SC.shape[0]
        kv = self.kv_b_proj(kv_SC).view(S, self.n_heads, self.nope + self.v_dim)
        k_nope_SHP, v_SHV = (_up(t) for t in kv.split([self.nope, self.v_dim], dim=-1))
        scores = (torch.einsum("thp,shp->hts", _up(q_nope_THP), k_nope_SHP)
                  + torch.einsum("thr,sr->hts", _up(q_pe_THR), _up(k_pe_SR)))
        return torch.einsum("hts,shv->thv", self._softmax(scores, mask_TS), v_SHV)

    def _absorbed(self, q_nope_THP, q_pe_THR, kv_SC, k_pe_SR, mask_TS):
        w_HXC = _up(self.kv_b_proj.weight).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk_HPC, w_uv_HVC = w_HXC.split([self.nope, self.v_dim], dim=1)
        kv_SC = _up(kv_SC)
        q_lat_THC = torch.einsum("thp,hpc->thc", _up(q_nope_THP), w_uk_HPC)
        scores = (torch.einsum("thc,sc->hts", q_lat_THC, kv_SC)
                  + torch.einsum("thr,sr->hts", _up(q_pe_THR), _up(k_pe_SR)))
        o_lat_THC = torch.einsum("hts,sc->thc", self._softmax(scores, mask_TS), kv_SC)
        return torch.einsum("thc,hvc->thv", o_lat_THC, w_uv_HVC)


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (a float64 reference engine stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
