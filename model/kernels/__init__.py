"""Kernels of the model's small ops (RMSNorm, router top-k, MLA rope, MLA latent cache write, MLP SiLU * up),
each with its torch reference beside it in model/ops.py. Which implementation a model uses is decided once, at
construction (`ModelKernels`)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

NORM_BACKENDS = ("torch", "triton", "flashinfer")
ROUTER_BACKENDS = ("torch", "triton")
ROPE_BACKENDS = ("torch", "triton")
LATENT_BACKENDS = ("torch", "triton")
ACT_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class ModelKernels:
    """norm: "torch" (reference), "triton" (the reference's roundings: normalize, round to the model dtype,
    then times the weight, rounded again; fused residual add), "flashinfer" (FlashInfer's rmsnorm and
    fused_add_rmsnorm: x * rsqrt * weight rounded once, so bf16 results differ from the reference by a
    rounding; opt-in). router: "torch" or "triton" (bias, group-limited top-k, gather, normalize and
    scaling in one kernel). rope: "torch" or "triton" (q_pe and k_pe of a layer rotated in one kernel,
    bit-identical to the reference). latent: the decode write of MLA's latent into the cache, "torch"
    (kv_a_layernorm by `norm`, the optional MXFP8 quantize-dequantize, two index copies) or "triton" (all in one
    kernel with `norm` "triton"'s bits; needs norm "triton"). act: an MLP's silu(gate) * up, "torch" (two kernels)
    or "triton" (one, the same bits). shared_experts_fusion: a MoE layer whose experts run the Triton fused kernel
    also runs its shared experts there, as extra experts (`model.moe.Experts.host_shared`; sglang's shared-experts
    fusion, off with its `disable_shared_experts_fusion`)."""
    norm: str = "torch"
    router: str = "torch"
    rope: str = "torch"
    latent: str = "torch"
    act: str = "torch"
    shared_experts_fusion: bool = True

    def __post_init__(self):
        if self.norm not in NORM_BACKENDS:
            raise ValueError(f"norm kernel {self.norm!r}; supported: {NORM_BACKENDS}")
        if self.router not in ROUTER_BACKENDS:
            raise ValueError(f"router kernel {self.router!r}; supported: {ROUTER_BACKENDS}")
        if self.rope not in ROPE_BACKENDS:
            raise ValueError(f"rope kernel {self.rope!r}; supported: {ROPE_BACKENDS}")
        if self.latent not in LATENT_BACKENDS:
            raise ValueError(f"latent kernel {self.latent!r}; supported: {LATENT_BACKENDS}")
        if self.act not in ACT_BACKENDS:
            raise ValueError(f"act kernel {self.act!r}; supported: {ACT_BACKENDS}")
        if self.latent == "triton" and self.norm != "triton":
            raise ValueError(f"the Triton latent write gives the Triton norm's bits; norm kernel is {self.norm!r}")


def select_model_kernels(device: torch.device, dtype: torch.dtype, norm: str | None, router: str | None,
                         rope: str | None, num_experts: int, n_group: int,
                         latent: str | None = None, act: str | None = None) -> tuple[ModelKernels, str]:
    """(kernels, why). None picks Triton on CUDA for bf16/fp16 models when triton imports, else torch (the
    latent write: Triton when the norm is); an explicit request that cannot run is an error."""
    gpu = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    has_triton = importlib.util.find_spec("triton") is not None
    for name, value in (("norm_backend", norm), ("router_backend", router), ("rope_backend", rope),
                        ("latent_backend", latent), ("act_backend", act)):
        if value in ("triton", "flashinfer") and not gpu:
            raise ValueError(f"{name}={value!r} needs a CUDA device and a bf16/fp16 model ({device}, {dtype})")
        if value == "triton" and not has_triton:
            raise ValueError(f"{name}='triton' requested but triton is not importable")
    if norm == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        raise ValueError("norm_backend='flashinfer' requested but flashinfer is not importable")
    auto = "triton" if gpu and has_triton else "torch"
    router_shape_ok = _pow2(num_experts) and num_experts % n_group == 0 and _pow2(num_experts // n_group)
    if router == "triton" and not router_shape_ok:
        raise ValueError(f"router_backend='triton' needs a power-of-two expert count in power-of-two groups, "
                         f"this model has {num_experts} experts in {n_group} groups")
    norm = norm or auto
    if latent == "triton" and norm != "triton":
        raise ValueError(f"latent_backend='triton' gives the Triton norm's bits; norm_backend is {norm!r}")
    k = ModelKernels(norm, router or (auto if router_shape_ok or not num_experts else "torch"), rope or auto,
                     latent or ("triton" if norm == "triton" else "torch"), act or auto)
    why = (f"RMSNorm: {k.norm}, router top-k: {k.router}, rope: {k.rope}, latent cache write: {k.latent}, "
           f"MLP silu*up: {k.act}")
    if router is None and auto == "triton" and k.router == "torch":
        why += f" (the Triton router needs power-of-two experts/groups: {num_experts}/{n_group})"
    return k, why


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


__all__ = ["ACT_BACKENDS", "LATENT_BACKENDS", "ModelKernels", "NORM_BACKENDS", "ROPE_BACKENDS", "ROUTER_BACKENDS",
           "select_model_kernels"]
