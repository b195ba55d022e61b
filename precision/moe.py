"""The grouped-expert seam: `experts(x, topk_ids, topk_weights, w13, w2)`.

Legend: T tokens, D hidden, E experts, F expert intermediate, K experts per token.
w13_EFD holds [gate; up] stacked along F (2F rows); w2_EDF is the down projection.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .linear import REFERENCE, GemmConfig, linear
from .mxfp8 import MXFP8Tensor
from .qat import QATWeight

Weight = torch.Tensor | MXFP8Tensor | QATWeight


def experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
            w13_EFD: Weight, w2_EDF: Weight, gemm: GemmConfig = REFERENCE, x_qdq: bool = False,
            shared_TD: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
            bf16_copy: tuple[torch.Tensor, torch.Tensor] | None = None, hosted: int = 0) -> torch.Tensor:
    """The grouped-expert seam: Triton fused MoE on sm90 (bf16 activations), else the reference (always
    for a trainer's master weights: its per-expert `linear` calls are differentiable). `x_qdq`: x is
    already MXFP8 quantize-dequantized (see `linear`); the gate/up GEMMs skip their activation pass.
    `shared_TD` (the shared experts' output, x's dtype) is added to the result in x's dtype, as
    `experts(...) + shared_TD` would (the fused kernel adds it in its combine pass). `workspace`: bf16 scratch
    the fused kernel may dequantize MXFP8 experts into once for a large call, `bf16_copy` exact bf16 copies of them
    it runs large calls on (`fused_moe_triton`); the reference path needs neither (same values). `hosted`: the ids'
    last columns that are hosted shared experts, for the fused kernel's launch order (`fused_moe_triton`)."""
    fused = gemm.backend == "triton" and x_TD.is_cuda and x_TD.dtype == torch.bfloat16
    if fused and not isinstance(w13_EFD, QATWeight):
        from .kernels.triton_moe import fused_moe_triton
        return fused_moe_triton(x_TD, topk_ids_TK, topk_weights_TK, w13_EFD, w2_EDF, gemm.act_mode, gemm.scale_mode,
                                x_qdq=x_qdq, shared_TD=shared_TD, workspace=workspace, bf16_copy=bf16_copy,
                                hosted=hosted)
    y = experts_ref(x_TD, topk_ids_TK, topk_weights_TK, w13_EFD, w2_EDF, replace(gemm, backend="torch"), x_qdq)
    return y if shared_TD is None else y + shared_TD


def experts_ref(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                w13_EFD: Weight, w2_EDF: Weight, gemm: GemmConfig = REFERENCE, x_qdq: bool = False) -> torch.Tensor:
    """sum_k w[t,k] * down(silu(gate(x)) * up(x)) over each token's experts; fp32 combine, x's dtype out.
    topk_weights already carry the routed scaling factor (fused into top-k by the router).
    MXFP8 experts run each GEMM through `linear` (w8a8: activations quantized along K first).
    Differentiable: an index gather of tokens and an index_add_ into a fresh buffer."""
    T, D = x_TD.shape
    E = w13_EFD.shape[0]
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != T:
        raise ValueError(f"experts: topk ids {tuple(topk_ids_TK.shape)} / weights {tuple(topk_weights_TK.shape)} "
                         f"do not match {T} tokens")
    if w13_EFD.shape[2] != D or w2_EDF.shape[:2] != (E, D) or w2_EDF.shape[2] * 2 != w13_EFD.shape[1]:
        raise ValueError(f"experts: w13 {tuple(w13_EFD.shape)} / w2 {tuple(w2_EDF.shape)} do not fit hidden {D}")
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    flat_ids = topk_ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    token_of = order // topk_ids_TK.shape[1]
    weight_of = topk_weights_TK.reshape(-1)[order].float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = token_of[start:start + n]
        gate, up = linear(x_TD[tok], w13_EFD[e], gemm, x_qdq=x_qdq).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, w2_EDF[e], gemm)
        out_TD.index_add_(0, tok, y.float() * weight_of[start:start + n, None])
        start += n
    return out_TD.to(x_TD.dtype)
