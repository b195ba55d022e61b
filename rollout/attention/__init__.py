"""Attention backends over the paged latent cache, behind one small interface:

    backend.begin(step: StepInputs)                      # once per step: the rows' page tables
    backend.forward(mla, q_nope, q_pe, kv, k_pe) -> o    # per layer: store the new latents, attend

`torch` (the reference, any device, one row at a time) and `flashinfer` (FlashInfer's MLA paged
kernels over the absorbed formulation; CUDA). Chosen once per engine by `select_attention`; with
`flashinfer`, small decode batches attend with the Triton split-KV kernel (`select_decode_attention`).
"""
from __future__ import annotations

import logging

import torch

from .torch_paged import TorchPagedAttention

log = logging.getLogger(__name__)
BACKENDS = ("torch", "flashinfer")
DECODE_BACKENDS = ("flashinfer", "triton")
# Decode batches up to this many rows attend faster with the Triton split-KV kernel than with FlashInfer's
# at every context measured (256..4096); at 8 rows the two trade places by context, above FlashInfer wins
# (benchmarks/results/mla_triton_small.json, mla_triton_sweep.json, H200, moonlight shapes).
TRITON_DECODE_MAX_ROWS = 4


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


def select_decode_attention(requested: str | None, attention: str) -> tuple[int, str]:
    """(rows, why): decode batches of up to `rows` rows attend with the Triton split-KV kernel (0: none), for
    the engine's attention backend `attention`. An explicit request that cannot run is an error."""
    if requested is not None and requested not in DECODE_BACKENDS:
        raise ValueError(f"decode_attention_backend={requested!r}; supported: {DECODE_BACKENDS} (or null)")
    if attention != "flashinfer":
        if requested is not None:
            raise ValueError(f"decode_attention_backend={requested!r} needs attention_backend='flashinfer' "
                             f"(this engine attends with {attention!r})")
        return 0, ""
    if requested == "flashinfer":
        return 0, "FlashInfer MLA for every decode batch (requested)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        if requested == "triton":
            raise ValueError("decode_attention_backend='triton' requested but triton is not importable") from e
        return 0, "FlashInfer MLA for every decode batch (triton not importable)"
    if requested == "triton":
        return 1 << 30, "Triton split-KV MLA for every decode batch (requested)"
    return TRITON_DECODE_MAX_ROWS, (f"Triton split-KV MLA for decode batches up to {TRITON_DECODE_MAX_ROWS} rows, "
                                    "FlashInfer MLA above")


__all__ = ["BACKENDS", "DECODE_BACKENDS", "TorchPagedAttention", "select_attention", "select_decode_attention"]
