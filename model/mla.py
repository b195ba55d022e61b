"""Multi-head Latent Attention (DeepSeek-V2/V3).

Legend: T query tokens, S cached positions, D hidden, H heads, P qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank (the compressed latent that is cached).

`MLA.forward` projects q and the latent, then hands them to an attention backend (the torch
reference or FlashInfer, chosen once per engine), which stores the latent in its cache
(`store_latents`: kv_a_layernorm on the way in) and attends.
Two mathematically equal formulations over the same latent cache, used by the backends:
- naive (prefill): expand the latent through kv_b_proj into per-head K_nope and V, attend.
- absorbed (decode): fold W_UK into q and W_UV after attention, attend directly over the latent.
  kv_b_proj stays high precision because this path contracts W_UK over P, across the blocks a
  trainer quantizes along C (see DESIGN.md).
The torch reference keeps scores, softmax and the probability-weighted sum in fp32.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..precision import Precision
from .config import ModelConfig
from .kernels import ModelKernels
from .layers import Linear, RMSNorm, fuse_linears
from .ops import absorb_ref, latent_ref, rope, store_latent, store_latent_absorb


class AttentionBackend(Protocol):
    def forward(self, mla: "MLA", q_nope_THP: torch.Tensor, q_pe_THR: torch.Tensor, kv_TC: torch.Tensor,
                k_pe_TR: torch.Tensor) -> torch.Tensor:
        """Store this step's latents for layer `mla.layer` (`mla.store_latents`), attend, return o [T, H, V].
        kv_TC is the latent as projected (before kv_a_layernorm): `mla.latent(kv_TC)` is what attention reads.
        A backend whose `fuses_rope()` says so for the current step is also passed `cos_sin=`, with q_pe and k_pe
        not yet rotated (`mla.store_latents_and_absorb` rotates them in its launch)."""


def _no() -> bool:
    return False


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, prec: Precision = Precision(), layer: int = 0,
                 kernels: ModelKernels = ModelKernels()):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.layer = layer
        self.n_heads, self.nope, self.rope_dim = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope.interleave
        self.rope_backend, self.latent_backend = kernels.rope, kernels.latent
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, dtype, prec.child("q_proj"))
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, dtype, prec.child("q_a_proj"))
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype, kernels.norm)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype, prec.child("q_b_proj"))
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype,
                                         prec.child("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, kernels.norm)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype,
                                prec.child("kv_b_proj"))
        self.o_proj = Linear(H * cfg.v_head_dim, D, dtype, prec.child("o_proj"))
        # the two projections of the layer input as one GEMM (None: storage differs, or a trainer's model)
        self.fused_qkv_a_proj_with_mqa = fuse_linears(
            [self.q_proj if cfg.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa])
        # A trainer that ran kv_b_proj MXFP8 w8a8 quantized the latent going into it: cache the
        # quantize-dequantized latent, which makes both formulations follow it exactly (absorption
        # is linear in the latent). Quantized once, here: RCEIL re-quantization is not idempotent.
        # The straight-through fake-quant keeps a trainer's model differentiable (same bytes).
        kv_b = prec.child("kv_b_proj")
        self.latent_qdq = kv_b.gemm.scale_mode if kv_b.quantize_input else None

    def forward(self, x_TD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionBackend, x_qdq: bool = False) -> torch.Tensor:
        """x_qdq: x_TD is the input norm's MXFP8 quantize-dequantize (both projections skip their pass)."""
        T = x_TD.shape[0]
        q_lora = not hasattr(self, "q_proj")
        if self.fused_qkv_a_proj_with_mqa is not None:
            q, kv = self.fused_qkv_a_proj_with_mqa(x_TD, x_qdq)
        else:
            q = (self.q_a_proj if q_lora else self.q_proj)(x_TD, x_qdq)
            kv = self.kv_a_proj_with_mqa(x_TD, x_qdq)
        if q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope_THP, q_pe_THR = q.view(T, self.n_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        kv_TC, k_pe_TR = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.rope_backend == "triton" and self.latent_backend == "triton" and getattr(attn, "fuses_rope", _no)():
            # the backend's latent store rotates q_pe and k_pe in its launch (store_latents_and_absorb's rope)
            o_THV = attn.forward(self, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR, cos_sin=cos_sin)
        else:
            q_pe_THR, k_pe_TR = rope(q_pe_THR, k_pe_TR, cos_sin, self.interleave, self.rope_backend)
            o_THV = attn.forward(self, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR)
        return self.o_proj(o_THV.reshape(T, -1).to(x_TD.dtype))

    # ---- the cached latent: kv_a_layernorm of the projected latent (quantize-dequantized if the trainer did) ----
    def latent(self, kv_TC: torch.Tensor) -> torch.Tensor:
        """The normed latent [T, C] attention reads, computed apart from any cache (differentiable)."""
        n = self.kv_a_layernorm
        return latent_ref(kv_TC, n.weight, n.eps, n.backend, self.latent_qdq)

    def store_latents(self, ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                      k_pe_TR: torch.Tensor) -> None:
        """ckv[slots] = latent(kv), kpe[slots] = k_pe: the cache write of every backend (model.ops.store_latent,
        one kernel with `ModelKernels.latent` "triton"). slots_T int64 rows of the flat [N, C] / [N, R] caches."""
        n = self.kv_a_layernorm
        store_latent(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, n.weight, n.eps, n.backend, self.latent_qdq,
                     self.latent_backend)

    def store_latents_and_absorb(self, ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor,
                                 kv_TC: torch.Tensor, k_pe_TR: torch.Tensor, q_nope_THP: torch.Tensor,
                                 q_pe_THR: torch.Tensor | None = None,
                                 cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
                                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`store_latents`, then `absorb(q_nope)`: one kernel with `ModelKernels.latent` "triton" (a small decode
        batch's pre-attention work, model.ops.store_latent_absorb). With cos_sin, q_pe and k_pe are not rotated
        yet: the same launch rotates them and (q_lat, rotated q_pe) is returned."""
        n = self.kv_a_layernorm
        w_uk_HPC, _ = self.absorbed_weights()
        rope = None if cos_sin is None else (q_pe_THR, cos_sin, self.interleave)
        return store_latent_absorb(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, n.weight, n.eps, q_nope_THP, w_uk_HPC,
                                   n.backend, self.latent_qdq, self.latent_backend, rope)

    # ---- the absorbed weights: W_UK [H, P, C] and W_UV [H, V, C], views of kv_b_proj ----
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w_HXC = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w_HXC.split([self.nope, self.v_dim], dim=1)

    def absorb(self, q_nope_THP: torch.Tensor) -> torch.Tensor:
        """q_nope -> q in latent space [T, H, C] (model dtype, for kernels that attend over the latent): a view
        of the batched product's [H, T, C] result, heads outermost in memory."""
        w_uk_HPC, _ = self.absorbed_weights()
        return absorb_ref(q_nope_THP, w_uk_HPC)

    def unabsorb(self, o_lat_THC: torch.Tensor) -> torch.Tensor:
        """Latent-space attention output -> per-head values [T, H, V]."""
        _, w_uv_HVC = self.absorbed_weights()
        return torch.bmm(o_lat_THC.transpose(0, 1), w_uv_HVC.to(o_lat_THC.dtype).transpose(1, 2)).transpose(0, 1)

    # ---- the torch reference over one sequence's latents [S, C] / [S, R]; mask_TS: key s visible to query t ----
    def attend_naive(self, q_nope_THP, q_pe_THR, kv_SC, k_pe_SR, mask_TS) -> torch.Tensor:
        S = kv_SC.shape[0]
        kv = self.kv_b_proj(kv_SC).view(S, self.n_heads, self.nope + self.v_dim)
        k_nope_SHP, v_SHV = kv.split([self.nope, self.v_dim], dim=-1)
        scores_HTS = (torch.einsum("thp,shp->hts", q_nope_THP.float(), k_nope_SHP.float())
                      + torch.einsum("thr,sr->hts", q_pe_THR.float(), k_pe_SR.float()))
        p_HTS = self._softmax(scores_HTS, mask_TS)
        return torch.einsum("hts,shv->thv", p_HTS, v_SHV.float())

    def attend_absorbed(self, q_nope_THP, q_pe_THR, kv_SC, k_pe_SR, mask_TS) -> torch.Tensor:
        w_uk_HPC, w_uv_HVC = self.absorbed_weights()
        kv_SC = kv_SC.float()
        q_lat_THC = torch.einsum("thp,hpc->thc", q_nope_THP.float(), w_uk_HPC.float())
        scores_HTS = (torch.einsum("thc,sc->hts", q_lat_THC, kv_SC)
                      + torch.einsum("thr,sr->hts", q_pe_THR.float(), k_pe_SR.float()))
        o_lat_THC = torch.einsum("hts,sc->thc", self._softmax(scores_HTS, mask_TS), kv_SC)
        return torch.einsum("thc,hvc->thv", o_lat_THC, w_uv_HVC.float())

    def _softmax(self, scores_HTS: torch.Tensor, mask_TS: torch.Tensor) -> torch.Tensor:
        return (scores_HTS * self.scale).masked_fill(~mask_TS, float("-inf")).softmax(dim=-1)
