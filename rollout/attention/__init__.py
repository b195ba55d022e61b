"""Attention backends over the paged latent cache, behind one small interface:

    backend.begin(step: StepInputs)                      # once per step: the rows' page tables
    backend.forward(mla, q_nope, q_pe, kv, k_pe) -> o    # per layer: store the new latents, attend

`torch` (the reference, any device, one row at a time) and `flashinfer` (FlashInfer's MLA paged
kernels over the absorbed formulation; CUDA). Chosen once per engine by `select_attention`.
"""
from __future__ import annotations

import logging

import torch

from .torch_paged import TorchPagedAttention

log = logging.getLogger(__name__)
BACKENDS = ("torch", "flashinfer")


# FlashInfer's MLA kernels are built for DeepSeek's latent and rope widths.
FLASHINFER_DIMS = (512, 64)


def select_attention(requested: str | None, device: torch.device, cfg) -> tuple[str, str]:
    """(backend, why). An explicit request that cannot run is an error, never a silent fallback."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"attention_backend={requested!r}; supported: {BACKENDS}")
    if device.type != "cuda":
        if requested == "flashinfer":
            raise ValueError(f"attention_backend='flashinfer' needs a CUDA device, engine is on {device}")
        return "torch", f"torch reference attention ({device.type})"
    if requested == "torch":
        return "torch", "torch reference attention (requested)"
    dims = (cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    if dims != FLASHINFER_DIMS:
        if requested == "flashinfer":
            raise ValueError(f"attention_backend='flashinfer' needs kv_lora_rank/qk_rope_head_dim {FLASHINFER_DIMS}, "
                             f"this model has {dims}")
        return "torch", f"torch reference attention (FlashInfer MLA needs latent/rope dims {FLASHINFER_DIMS}, not {dims})"
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        if requested == "flashinfer":
            raise ValueError("attention_backend='flashinfer' requested but flashinfer is not importable "
                             "(pip install 'mxroll[gpu]')") from e
        return "torch", "torch reference attention (flashinfer not importable: pip install 'mxroll[gpu]')"
    return "flashinfer", "FlashInfer MLA paged attention"


__all__ = ["BACKENDS", "TorchPagedAttention", "select_attention"]
