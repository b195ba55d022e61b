"""DeepSeek-V3 feed-forward: dense MLP, the group-limited top-k Gate, and the MoE block.

Legend: T tokens, D hidden, E routed experts, G groups, K experts per token, F expert intermediate.
"""
from __future__ import annotations

import torch
from torch import nn

from ..precision import MXFP8Tensor, Precision, QATWeight, experts
from ..precision.kernels.moe_config import COPY_MIN_ROWS, DEQUANT_ONCE_MIN_ROWS, dequant_once
from ..precision.mxfp8 import BLOCK

from .config import ModelConfig
from .kernels import ModelKernels
from .layers import Linear, frozen, fuse_linears, fused_norm_quant, stack_rows
from .ops import gate_topk, silu_mul


# Shared experts run inside the fused MoE kernel for batches up to this many tokens (see Experts.host_shared).
SHARED_FUSION_MAX_TOKENS = 64


class MLP(nn.Module):
    """act_backend: model.ops.silu_mul's ("torch" or "triton", the same bits); decided at construction."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype, prec: Precision = Precision(),
                 act_backend: str = "torch"):
        super().__init__()
        self.act_backend = act_backend
        self.gate_proj = Linear(dim, inter, dtype, prec.child("gate_proj"))
        self.up_proj = Linear(dim, inter, dtype, prec.child("up_proj"))
        self.down_proj = Linear(inter, dim, dtype, prec.child("down_proj"))
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])  # one GEMM (None: storage differs)
        # the silu*up kernel also quantizes its output for an MXFP8 w8a8 down projection (one launch fewer)
        self.act_qdq = fused_norm_quant(act_backend, [prec.child("down_proj")])

    def forward(self, x: torch.Tensor | None, routes: RouteRecorder | None = None,
                x_qdq: torch.Tensor | None = None) -> torch.Tensor:
        """x_qdq: x's MXFP8 quantize-dequantize from a fused norm; gate/up then take it (x may be None)."""
        x, qdq = (x_qdq, True) if x_qdq is not None else (x, False)
        g, u = (self.gate_up_proj(x, qdq) if self.gate_up_proj is not None
                else (self.gate_proj(x, qdq), self.up_proj(x, qdq)))
        return self.down_proj(silu_mul(g, u, self.act_backend, self.act_qdq), self.act_qdq is not None)


class Gate(nn.Module):
    """Sigmoid router with noaux_tc group-limited top-k.

    Contract (DESIGN.md): fp32 logits; the correction bias steers selection only; weights are the
    unbiased scores of the chosen experts, normalized if norm_topk_prob, then multiplied by
    routed_scaling_factor here, once, for every expert backend. `backend` "triton": the logits GEMM takes
    the bf16 operands with fp32 output (exact products, fp32 accumulation: the same sum as upcasting
    first, in cuBLAS's order) and the sigmoid and top-k are one kernel (model.ops.route_topk); a small
    decode batch's logits are computed in that kernel's launch too (model.ops.gate_topk).
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, x_TD: torch.Tensor, record: tuple[torch.Tensor, torch.Tensor] | None = None,
                shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (topk_weights_TK fp32 with the scaling factor applied, topk_ids_TK int64); `record`: a route
        recorder's rows (RouteRecorder.rows) that receive them too; `shared`: S more columns for the shared
        experts a fused MoE hosts (experts E..E+S-1, weight 1), written by the same kernel."""
        return gate_topk(x_TD, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                         self.norm_topk_prob, self.routed_scaling_factor, self.backend, record, shared)


class Experts(nn.Module):
    """Routed experts stacked for grouped GEMMs: w13 = [gate; up] per expert, w2 = down.
    MXFP8 storage adds `w13_weight_scale_inv` [E, 2F, D/32] and `w2_weight_scale_inv` [E, D, F/32];
    a trainer's MXFP8 experts hold high-precision masters, fake-quantized per expert in the forward."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, prec: Precision = Precision()):
        super().__init__()
        self.E, self.D, self.F = E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gemm = prec.gemm  # bf16 experts use the fused MoE kernel too
        self.qat = prec.qat
        if prec.mxfp8 and not prec.qat:
            self.w13_weight = frozen(E, 2 * F_, D, dtype=torch.float8_e4m3fn)
            self.w13_weight_scale_inv = frozen(E, 2 * F_, D // BLOCK, dtype=torch.uint8)
            self.w2_weight = frozen(E, D, F_, dtype=torch.float8_e4m3fn)
            self.w2_weight_scale_inv = frozen(E, D, F_ // BLOCK, dtype=torch.uint8)
        else:
            self.w13_weight = frozen(E, 2 * F_, D, dtype=dtype)
            self.w2_weight = frozen(E, D, F_, dtype=dtype)
            self.w13_weight_scale_inv = self.w2_weight_scale_inv = None
        self.hosted: tuple[Linear, Linear, Linear] | None = None  # see host_shared
        self.S = 0
        self.w13_all = self.w13_scale_all = self.w2_all = self.w2_scale_all = None
        # bf16 scratch, shared by every layer, that the fused kernel dequantizes MXFP8 experts into once for a
        # prefill-size call (moe_config.dequant_once); the engine attaches it (`workspace_numel`), or None
        self.workspace: torch.Tensor | None = None
        # exact bf16 copies (w13, w2) of MXFP8 experts that large calls run on (`attach_bf16_copies`), or None
        self.bf16_copy: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def workspace_numel(self) -> int:
        """bf16 elements a dequantize-once workspace needs for these experts (w13 and w2)."""
        return 3 * self.E * self.F * self.D

    @property
    def k_dims(self) -> tuple[int, ...]:
        return (self.D, self.F)

    def can_host(self, mlp: "MLP") -> bool:
        """Whether a shared-expert MLP (intermediate S x F) can run as S more experts of this stack: the same
        storage and GEMM settings, no trainer's fake-quantized masters."""
        parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return (not self.qat and not any(p.qat for p in parts) and mlp.gate_proj.out_features % self.F == 0
                and all(p.weight.dtype == self.w13_weight.dtype and p.gemm == self.gemm
                        and (p.weight_scale_inv is None) == (self.w13_weight_scale_inv is None) for p in parts))

    def host_shared(self, mlp: "MLP") -> None:
        """Run the shared experts as experts E..E+S-1 of the fused kernel (sglang's shared-experts fusion): one
        GEMM pair for all instead of the MLP's gate_up, silu*up and down launches. `postprocess` stacks the routed
        weights into buffers of E + S experts (the routed Parameters become views of their first E) and copies
        the shared MLP's rows in after them, again after every update; the MLP keeps its own weights (its
        checkpoint names, and the path for batches above `MoE.shared_fusion_max_tokens`)."""
        assert self.can_host(mlp)
        self.hosted = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        self.S = mlp.gate_proj.out_features // self.F

    def _extend(self, attr: str, shared: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        """The [E + S, ...] buffer whose first E rows the routed Parameter `attr` is a view of, with `shared` (the
        hosted experts' rows) copied in after them."""
        buf = stack_rows([getattr(self, attr)], buf, extra=self.S)
        buf[self.E:].copy_(shared)
        return buf

    @torch.no_grad()
    def fill_bf16_copy(self) -> None:
        """Dequantize the stored MXFP8 experts into their bf16 copies, in place (same addresses: captured graphs stay
        valid); after loading and after every weight update (`postprocess`)."""
        from ..precision.kernels.triton_moe import dequantize_experts
        dequantize_experts(self._q("w13_weight"), self._q("w2_weight"), *self.bf16_copy)

    @torch.no_grad()
    def postprocess(self, layouts) -> None:
        if self.bf16_copy is not None:
            self.fill_bf16_copy()
        if self.hosted is None:
            return
        gate, up, down = self.hosted
        S, F_, D = self.S, self.F, self.D

        def w13(g, u):  # [S*F, X] gate and up rows -> S experts' [gate; up] blocks
            return torch.cat([g.view(S, F_, -1), u.view(S, F_, -1)], dim=1)

        def w2(d):  # [D, S*X] down columns -> S experts' [D, X] blocks
            return d.view(D, S, -1).transpose(0, 1)

        self.w13_all = self._extend("w13_weight", w13(gate.weight, up.weight), self.w13_all)
        self.w2_all = self._extend("w2_weight", w2(down.weight), self.w2_all)
        if self.w13_weight_scale_inv is not None:
            self.w13_scale_all = self._extend("w13_weight_scale_inv", w13(gate.weight_scale_inv, up.weight_scale_inv),
                                              self.w13_scale_all)
            self.w2_scale_all = self._extend("w2_weight_scale_inv", w2(down.weight_scale_inv), self.w2_scale_all)

    @property
    def shared_nbytes(self) -> int:
        """Bytes of the hosted shared experts' copies (weights and scales)."""
        return sum(t[self.E:].nbytes for t in (self.w13_all, self.w13_scale_all, self.w2_all, self.w2_scale_all)
                   if t is not None)

    def drop_derived(self) -> None:
        self.w13_all = self.w13_scale_all = self.w2_all = self.w2_scale_all = None
        self.workspace = self.bf16_copy = None

    def _q(self, name: str):
        if self.qat:
            return QATWeight(getattr(self, name))
        scale = getattr(self, name + "_scale_inv")
        return getattr(self, name) if scale is None else MXFP8Tensor(getattr(self, name), scale)

    def forward(self, x_TD, ids_TK, weights_TK, x_qdq: bool = False, shared_TD: torch.Tensor | None = None):
        return experts(x_TD, ids_TK, weights_TK, self._q("w13_weight"), self._q("w2_weight"), self.gemm, x_qdq,
                       shared_TD, self.workspace, self.bf16_copy)

    def forward_with_shared(self, x_TD, ids_TKS, weights_TKS, x_qdq: bool = False):
        """Routed plus hosted shared experts in one fused call: the router's K columns and S more (experts
        E..E+S-1, weight 1: the shared output is not scaled by the routed scaling factor; `Gate`'s `shared`)."""
        w13, w2 = ((self.w13_all, self.w2_all) if self.w13_scale_all is None else
                   (MXFP8Tensor(self.w13_all, self.w13_scale_all), MXFP8Tensor(self.w2_all, self.w2_scale_all)))
        return experts(x_TD, ids_TKS, weights_TKS, w13, w2, self.gemm, x_qdq, hosted=self.S)


def _mxfp8_triton_stacks(model: nn.Module) -> list[Experts]:
    """The model's stored-MXFP8 expert stacks that the Triton fused MoE runs on a CUDA device."""
    return [m for m in model.modules() if isinstance(m, Experts) and m.w13_weight_scale_inv is not None
            and m.gemm.backend == "triton" and m.w13_weight.is_cuda]


def attach_dequant_workspace(model: nn.Module, chunk_tokens: int, top_k: int, enabled: bool = True,
                             max_fraction: float = 0.1) -> str:
    """Give the model's MXFP8 expert stacks (Triton backend, CUDA) one bf16 workspace, shared by all layers, that
    the fused MoE dequantizes them into once for a call of `dequant_once` size (prefill chunks), when the engine's
    chunk reaches that size and the workspace takes at most `max_fraction` of the device's memory. Call before the
    KV cache is sized (it counts the workspace) and again after the weights come back. Returns what it decided,
    for the start-up log ("" when no stack is MXFP8 on the Triton backend)."""
    stacks = _mxfp8_triton_stacks(model)
    if not stacks:
        return ""
    E, numel = stacks[0].E, max(m.workspace_numel for m in stacks)
    gib = numel * 2 / 2**30
    if not enabled:
        return "MXFP8 expert tiles at every size (disable_moe_prefill_dequant)"
    if not dequant_once(chunk_tokens, top_k, E):
        return (f"MXFP8 expert tiles at every size (a {chunk_tokens}-token chunk routes {chunk_tokens * top_k / E:.0f}"
                f" rows an expert, dequantize-once starts at {DEQUANT_ONCE_MIN_ROWS})")
    device = stacks[0].w13_weight.device
    total = torch.cuda.get_device_properties(device).total_memory
    if numel * 2 > max_fraction * total:
        return (f"MXFP8 expert tiles at every size (a dequantize-once workspace would take {gib:.2f} GiB, over "
                f"{max_fraction:.0%} of the device)")
    workspace = torch.empty(numel, dtype=torch.bfloat16, device=device)
    for m in stacks:
        m.workspace = workspace
    first = -(-DEQUANT_ONCE_MIN_ROWS * E // top_k)
    return (f"MXFP8 experts dequantized once per call from {first} tokens into a shared {gib:.2f} GiB bf16 workspace "
            "(disable_moe_prefill_dequant)")


def attach_bf16_copies(model: nn.Module, enabled: bool) -> str:
    """Give each MXFP8 expert stack (Triton backend, CUDA) exact bf16 copies of its weights, filled now and after
    every weight update, that the fused MoE runs calls of 64+ rows an expert on (`moe_config.copy_serves`: prefill
    chunks, large decode batches) instead of dequantizing tiles per block. Costs 3 * E * F * D bf16 elements a layer
    (the experts' bf16 size); raises when that does not fit in free device memory. Call before the KV cache is
    sized and again after the weights come back. Returns what it did, for the start-up log."""
    if not enabled:
        return ""
    stacks = _mxfp8_triton_stacks(model)
    if not stacks:
        return "no MXFP8 experts on the Triton backend to keep bf16 copies of (mxfp8_moe_bf16_copy)"
    need = sum(2 * m.workspace_numel for m in stacks)
    free = torch.cuda.mem_get_info(stacks[0].w13_weight.device)[0]
    if need > 0.9 * free:
        raise ValueError(f"mxfp8_moe_bf16_copy: bf16 copies of {len(stacks)} MXFP8 expert stacks need "
                         f"{need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB of device memory is free")
    for m in stacks:
        dev = m.w13_weight.device
        m.bf16_copy = (torch.empty(m.w13_weight.shape, dtype=torch.bfloat16, device=dev),
                       torch.empty(m.w2_weight.shape, dtype=torch.bfloat16, device=dev))
        m.fill_bf16_copy()
    return (f"MXFP8 experts also kept as exact bf16 copies, {need / 2**30:.2f} GiB, for calls of >= "
            f"{COPY_MIN_ROWS} rows an expert (mxfp8_moe_bf16_copy)")


class RouteRecorder:
    """Collects the router's choices of every MoE layer for one forward (rollout routing replay):
    ids [moe_layers, T, K] int32 and fp32 weights (routed scaling included), in the router's slot order."""

    def __init__(self, moe_layers: int, max_tokens: int, top_k: int, device: torch.device | str):
        self.ids = torch.zeros(moe_layers, max_tokens, top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(moe_layers, max_tokens, top_k, dtype=torch.float32, device=device)

    def rows(self, moe_index: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32, ids int32) [T, K] views that one MoE layer's router writes (Gate's `record`)."""
        return self.weights[moe_index, :T], self.ids[moe_index, :T]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, prec: Precision = Precision(), moe_index: int = 0,
                 kernels: ModelKernels = ModelKernels()):
        super().__init__()
        self.moe_index = moe_index  # this layer's row in a RouteRecorder
        self.gate = Gate(cfg, dtype, kernels.router)
        self.experts = Experts(cfg, dtype, prec.child("experts"))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype,
                                   prec.child("shared_experts"), kernels.act) if cfg.n_shared_experts else None)
        # the fused MoE kernel also runs the shared experts, for batches up to this many tokens (0: never)
        self.shared_fusion_max_tokens = 0
        if (kernels.shared_experts_fusion and self.shared_experts is not None and self.experts.gemm.backend == "triton"
                and self.experts.can_host(self.shared_experts)):
            self.experts.host_shared(self.shared_experts)
            self.shared_fusion_max_tokens = SHARED_FUSION_MAX_TOKENS

    def forward(self, x_TD: torch.Tensor, routes: RouteRecorder | None = None,
                x_qdq_TD: torch.Tensor | None = None) -> torch.Tensor:
        """x_qdq_TD: x's MXFP8 quantize-dequantize from a fused norm, for the experts (the router takes x)."""
        record = routes.rows(self.moe_index, x_TD.shape[0]) if routes is not None else None
        if self.experts.w13_all is not None and x_TD.shape[0] <= self.shared_fusion_max_tokens:
            weights_TKS, ids_TKS = self.gate(x_TD, record, shared=self.experts.S)
            return self.experts.forward_with_shared(x_TD if x_qdq_TD is None else x_qdq_TD, ids_TKS, weights_TKS,
                                                    x_qdq_TD is not None)
        weights_TK, ids_TK = self.gate(x_TD, record)
        shared_TD = self.shared_experts(x_TD, None, x_qdq_TD) if self.shared_experts is not None else None
        return self.experts(x_TD if x_qdq_TD is None else x_qdq_TD, ids_TK, weights_TK, x_qdq_TD is not None, shared_TD)
