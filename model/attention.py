"""The torch reference attention over ONE sequence, with a contiguous latent cache per layer.

The model-level oracle: HF parity tests and single-sequence checks run the model through it. The
engine's paged backends (rollout/attention/) reuse the same `MLA.attend_*` math.
Legend: T new tokens, S cached positions, C kv_lora_rank, R qk_rope_head_dim.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .mla import MLA


class SequenceAttention:
    """Latents of one sequence stored at their positions; `mode` picks the formulation:
    "auto" (naive for multi-token chunks, absorbed for single tokens), "naive" or "absorbed"."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 mode: str = "auto"):
        if mode not in ("auto", "naive", "absorbed"):
            raise ValueError(f"attention mode {mode!r}; use auto, naive or absorbed")
        L = cfg.num_hidden_layers
        self.kv_LSC = torch.zeros(L, capacity, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe_LSR = torch.zeros(L, capacity, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.mode = mode
        self.pos_T: torch.Tensor | None = None

    def begin(self, pos_T: torch.Tensor) -> None:
        """Positions of this step's tokens (each token's latent is stored at its position)."""
        if int(pos_T.max()) >= self.kv_LSC.shape[1]:
            raise RuntimeError(f"latent cache full: position {int(pos_T.max())} >= capacity {self.kv_LSC.shape[1]}")
        self.pos_T = pos_T

    def forward(self, mla: MLA, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR) -> torch.Tensor:
        pos = self.pos_T
        mla.store_latents(self.kv_LSC[mla.layer], self.pe_LSR[mla.layer], pos.long(), kv_TC, k_pe_TR)
        end = int(pos.max()) + 1
        mask_TS = torch.arange(end, device=pos.device)[None, :] <= pos[:, None]
        kv_SC, pe_SR = self.kv_LSC[mla.layer, :end], self.pe_LSR[mla.layer, :end]
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and pos.numel() == 1)
        attend = mla.attend_absorbed if absorbed else mla.attend_naive
        return attend(q_nope_THP, q_pe_THR, kv_SC, pe_SR, mask_TS)
