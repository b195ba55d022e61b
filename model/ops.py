"""The model's small ops behind one functional interface each: RMSNorm (optionally with the residual
add in front), MLA's latent normed into the cache, an MLP's silu(gate) * up, the router's top-k after the
logits, and MLA's rope on q_pe and k_pe. The torch code here is the reference (the rope's is
model.rope.rotate); the kernels (model/kernels/) follow it and tests compare the two.
Legend: T tokens, D width, F MLP width, E routed experts, G groups, K experts per token, H heads, R rope head dim,
C kv_lora_rank, N cache slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision.linear import linear
from ..precision.qat import fake_quant_mxfp8
from .rope import rotate


# ---------------------------------------------------------------- RMSNorm

def rmsnorm_ref(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 normalize, round to x's dtype, times the weight (in the weight's promotion with x's dtype)."""
    xf = x_TD.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w_D * xf.to(x_TD.dtype)


def rmsnorm(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        from .kernels.triton_norm import rmsnorm_triton
        return rmsnorm_triton(x_TD, w_D, eps)
    if backend == "flashinfer":
        import flashinfer
        return flashinfer.norm.rmsnorm(x_TD.contiguous(), w_D, eps)
    return rmsnorm_ref(x_TD, w_D, eps)


def add_rmsnorm(x_TD: torch.Tensor, delta_TD: torch.Tensor | None, w_D: torch.Tensor, eps: float,
                backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(s), s) with s = x + delta in x's dtype (s = x when delta is None): the residual stream's
    next value and its normed copy."""
    if delta_TD is None:
        return rmsnorm(x_TD, w_D, eps, backend), x_TD
    if backend == "triton":
        from .kernels.triton_norm import add_rmsnorm_triton
        return add_rmsnorm_triton(x_TD, delta_TD, w_D, eps)
    if backend == "flashinfer":
        import flashinfer
        # in place on the step's own intermediates: x becomes x + delta, delta its normed copy
        h, s = delta_TD.contiguous(), x_TD.contiguous()
        flashinfer.norm.fused_add_rmsnorm(h, s, w_D, eps)
        return h, s
    s = x_TD + delta_TD
    return rmsnorm_ref(s, w_D, eps), s


def add_rmsnorm_qdq(x_TD: torch.Tensor, delta_TD: torch.Tensor | None, w_D: torch.Tensor, eps: float,
                    scale_mode: str, normed: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(rmsnorm(s) or None, its MXFP8 quantize-dequantize along D, s), s = x + delta, in one Triton kernel
    (precision.kernels.triton_rmsnorm_mxfp8; the normed values are `triton_norm`'s) for MXFP8 w8a8 GEMMs."""
    from ..precision.kernels.triton_rmsnorm_mxfp8 import add_rmsnorm_mxfp8_triton, rmsnorm_mxfp8_triton
    if delta_TD is None:
        h, _, hq = rmsnorm_mxfp8_triton(x_TD, w_D, eps, scale_mode, normed=normed, quant=False, qdq=True)
        return h, hq, x_TD
    h, _, hq, s = add_rmsnorm_mxfp8_triton(x_TD, delta_TD, w_D, eps, scale_mode, normed=normed)
    return h, hq, s


# ---------------------------------------------------------------- MLA latent into the cache

def latent_ref(kv_TC: torch.Tensor, w_C: torch.Tensor, eps: float, norm_backend: str = "torch",
               qdq_mode: str | None = None) -> torch.Tensor:
    """What MLA caches and attends over: kv_a_layernorm of the projected latent, MXFP8 quantize-dequantized
    along C when qdq_mode (the trainer ran kv_b_proj w8a8 on it). Differentiable (straight-through)."""
    kv_TC = rmsnorm(kv_TC, w_C, eps, norm_backend)
    return kv_TC if qdq_mode is None else fake_quant_mxfp8(kv_TC, qdq_mode)


def store_latent_ref(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                     k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, norm_backend: str = "torch",
                     qdq_mode: str | None = None) -> None:
    """ckv[slots] = latent_ref(kv), kpe[slots] = k_pe, in the caches' dtype (slots int64, flat rows)."""
    ckv_NC.index_copy_(0, slots_T, latent_ref(kv_TC, w_C, eps, norm_backend, qdq_mode).to(ckv_NC.dtype))
    kpe_NR.index_copy_(0, slots_T, k_pe_TR.to(kpe_NR.dtype))


def _check_triton_latent_norm(norm_backend: str) -> None:
    if norm_backend != "triton":
        raise ValueError(f"the Triton latent store gives triton_norm's bits; the model's norm is {norm_backend!r}")


def store_latent(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                 k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, norm_backend: str = "torch",
                 qdq_mode: str | None = None, backend: str = "torch") -> None:
    """backend "triton": one kernel, the bits of norm_backend "triton" (model.kernels.triton_latent)."""
    if backend == "triton":
        _check_triton_latent_norm(norm_backend)
        from .kernels.triton_latent import store_latent_triton
        return store_latent_triton(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, eps, qdq_mode)
    return store_latent_ref(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, eps, norm_backend, qdq_mode)


def store_latent_absorb(ckv_NC: torch.Tensor, kpe_NR: torch.Tensor, slots_T: torch.Tensor, kv_TC: torch.Tensor,
                        k_pe_TR: torch.Tensor, w_C: torch.Tensor, eps: float, q_nope_THP: torch.Tensor,
                        w_uk_HPC: torch.Tensor, norm_backend: str = "torch", qdq_mode: str | None = None,
                        backend: str = "torch",
                        rope: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], bool] | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`store_latent`, then MLA's absorb: q_lat [T, H, C] = q_nope @ W_UK per head (a bmm: fp32 sums, one rounding
    to q's dtype). backend "triton": both in one kernel (model.kernels.triton_latent.latent_absorb_triton: the
    store's bits, the absorb's values up to the fp32 sum order).
    rope: (q_pe [T, H, R], cos_sin, interleave): k_pe is the rope key before its rotation; `rope_ref` rotates both
    first (on triton, the same launch does, with the rope kernel's bits) and (q_lat, rotated q_pe) is returned."""
    if backend == "triton":
        _check_triton_latent_norm(norm_backend)
        from .kernels.triton_latent import latent_absorb_triton
        fused = None if rope is None else (rope[0], *rope[1], rope[2])
        return latent_absorb_triton(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, eps, qdq_mode, q_nope_THP, w_uk_HPC,
                                    fused)
    q_pe_THR = None
    if rope is not None:
        q_pe_THR, k_pe_TR = rope_ref(rope[0], k_pe_TR, rope[1], rope[2])
    store_latent(ckv_NC, kpe_NR, slots_T, kv_TC, k_pe_TR, w_C, eps, norm_backend, qdq_mode, backend)
    q_lat_THC = absorb_ref(q_nope_THP, w_uk_HPC)
    return q_lat_THC if rope is None else (q_lat_THC, q_pe_THR)


def absorb_ref(q_nope_THP: torch.Tensor, w_uk_HPC: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, P] -> q_lat [T, H, C] in q's dtype: a view of the batched product's [H, T, C] result."""
    return torch.bmm(q_nope_THP.transpose(0, 1), w_uk_HPC.to(q_nope_THP.dtype)).transpose(0, 1)


# ---------------------------------------------------------------- MLP activation

def silu_mul_ref(g_TF: torch.Tensor, u_TF: torch.Tensor) -> torch.Tensor:
    return F.silu(g_TF) * u_TF


def silu_mul(g_TF: torch.Tensor, u_TF: torch.Tensor, backend: str = "torch", qdq_mode: str | None = None
             ) -> torch.Tensor:
    """silu(gate) * up; backend "triton": one kernel, the same bits (model.kernels.triton_act). `qdq_mode`: the
    result also MXFP8 quantize-dequantized along F for an MXFP8 w8a8 consumer (in the same kernel on triton)."""
    if backend == "triton":
        from .kernels.triton_act import silu_mul_triton
        return silu_mul_triton(g_TF, u_TF, qdq_mode)
    h = silu_mul_ref(g_TF, u_TF)
    return h if qdq_mode is None else fake_quant_mxfp8(h, qdq_mode)


# ---------------------------------------------------------------- router top-k

def route_topk_ref(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                   norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """noaux_tc selection over sigmoid scores (fp32): the bias steers selection only; group score = sum of
    the group's top-2 biased scores, the best topk_group groups stay; weights = unbiased scores of the
    chosen experts, normalized if asked, times the scaling factor. Returns (weights fp32, ids int64) [T, K]."""
    biased_TE = scores_TE + bias_E
    if n_group > 1:
        T, E = biased_TE.shape
        grouped_TGe = biased_TE.view(T, n_group, E // n_group)
        group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
        biased_TE = grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
    ids_TK = biased_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * routed_scaling_factor, ids_TK


def route_topk(scores_TE: torch.Tensor, bias_E: torch.Tensor, top_k: int, n_group: int, topk_group: int,
               norm_topk_prob: bool, routed_scaling_factor: float, backend: str = "torch",
               record: tuple[torch.Tensor, torch.Tensor] | None = None,
               sigmoid: bool = False, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """record: (fp32, int32) [T, K] rows of a route recorder that also receive the weights and ids (the Triton
    kernel writes them itself; the torch path copies). sigmoid: scores_TE are the router's logits, turned
    into scores first (inside the Triton kernel). shared: S more columns after the K routed ones, experts
    E..E+S-1 with weight 1 (the shared experts a fused MoE hosts, `model.moe.Experts.host_shared`); the recorder
    receives the routed columns only."""
    if backend == "triton":
        from .kernels.triton_router import route_topk_triton
        return route_topk_triton(scores_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob,
                                 routed_scaling_factor, record, sigmoid, shared)
    if sigmoid:
        scores_TE = scores_TE.sigmoid()
    weights_TK, ids_TK = route_topk_ref(scores_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob,
                                        routed_scaling_factor)
    if record is not None:
        record[0].copy_(weights_TK)
        record[1].copy_(ids_TK)
    if shared:
        T, E = scores_TE.shape
        extra = torch.arange(E, E + shared, device=ids_TK.device)
        ids_TK = torch.cat([ids_TK, extra.expand(T, shared)], dim=1)
        weights_TK = torch.cat([weights_TK, weights_TK.new_ones(T, shared)], dim=1)
    return weights_TK, ids_TK


def gate_topk(x_TD: torch.Tensor, gate_ED: torch.Tensor, bias_E: torch.Tensor, top_k: int, n_group: int,
              topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float, backend: str = "torch",
              record: tuple[torch.Tensor, torch.Tensor] | None = None,
              shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid router: fp32 logits x @ gate^T, then `route_topk` (sigmoid=True). torch: both operands upcast
    first; "triton": the logits GEMM takes the bf16 operands with fp32 output (exact products, fp32 sums) and
    up to `FUSED_GATE_MAX_TOKENS` tokens on CUDA the logits are computed inside the routing launch
    (model.kernels.triton_router.gate_route_triton)."""
    if backend == "triton":
        from .kernels.triton_router import FUSED_GATE_MAX_TOKENS, gate_route_triton
        if x_TD.is_cuda and x_TD.shape[0] <= FUSED_GATE_MAX_TOKENS and gate_ED.dtype == x_TD.dtype:
            return gate_route_triton(x_TD, gate_ED, bias_E, top_k, n_group, topk_group, norm_topk_prob,
                                     routed_scaling_factor, record, True, shared)
        logits_TE = linear(x_TD, gate_ED, out_dtype=torch.float32)
    else:
        logits_TE = F.linear(x_TD.float(), gate_ED.float())
    return route_topk(logits_TE, bias_E, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, backend,
                      record, sigmoid=True, shared=shared)


# ---------------------------------------------------------------- MLA rope

def rope_ref(q_pe_THR: torch.Tensor, k_pe_TR: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
             interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotate(q_pe), rotate(k_pe)): every head of q and the single shared rope key of one layer."""
    return rotate(q_pe_THR, cos_sin, interleave), rotate(k_pe_TR[:, None, :], cos_sin, interleave)[:, 0]


def rope(q_pe_THR: torch.Tensor, k_pe_TR: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], interleave: bool,
         backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels.triton_rope import rope_triton
        return rope_triton(q_pe_THR, k_pe_TR, cos_sin, interleave)
    return rope_ref(q_pe_THR, k_pe_TR, cos_sin, interleave)
