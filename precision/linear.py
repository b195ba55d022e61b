"""`linear(x, w, gemm)`: the one dispatch point for every dense GEMM in the model.

High-precision weights go to torch (cuBLAS on GPU). A trainer's MXFP8 master weight (`QATWeight`)
takes the differentiable fake-quant GEMM of `precision.qat`. MXFP8 weights go to the backend chosen
once per engine by `select_backend` and logged there:
- "torch": reference on any device (exact dequantize, then matmul);
- "triton": sm90 kernels (fp8 weights dequantized in registers, bf16 MMA, fp32 accumulate); on this backend
  one-token decode GEMMs, bf16 weights included, run the Triton GEMV (`kernels.triton_gemv.SERVE_MAX_M`);
- "flashinfer": `mm_mxfp8` on sm100+, written to FlashInfer's documented API; not runnable on
  the Hopper machines this project is tested on.
Legend: T tokens, K in_features, N out_features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels.mxfp8_gemm import check_gemm_args, mxfp8_gemm_ref
from .mxfp8 import MXFP8Tensor
from .qat import QATWeight, qat_linear

BACKENDS = ("torch", "triton", "flashinfer")


@dataclass(frozen=True)
class GemmConfig:
    act_mode: str = "w8a8"
    scale_mode: str = "rceil"
    backend: str = "torch"
    bf16_copy: bool = False  # stored-MXFP8 dense weights also keep an exact bf16 copy (Triton backend; `bf16_copy`)


REFERENCE = GemmConfig()


def select_backend(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """(backend, why). An explicit request that cannot run here is an error, never a silent fallback."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"MXFP8 GEMM backend {requested!r}; supported: {BACKENDS}")
    if device.type != "cuda":
        if requested not in (None, "torch"):
            raise ValueError(f"MXFP8 GEMM backend {requested!r} needs a CUDA device, engine is on {device}")
        return "torch", f"torch reference ({device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if requested == "torch":
        return "torch", "torch reference (requested)"
    if major >= 10 and requested in (None, "flashinfer"):
        return "flashinfer", f"FlashInfer mm_mxfp8 (sm{major}{minor})"
    if major == 9 and requested in (None, "triton"):
        try:
            import triton  # noqa: F401
        except ImportError as e:
            if requested == "triton":
                raise ValueError("MXFP8 GEMM backend 'triton' requested but triton is not importable") from e
            return "torch", "torch reference (triton not importable on sm90)"
        return "triton", f"Triton MXFP8 GEMM (sm{major}{minor})"
    if requested not in (None, "torch"):
        raise ValueError(f"MXFP8 GEMM backend {requested!r} cannot run on sm{major}{minor}")
    return "torch", f"torch reference (no MXFP8 kernel for sm{major}{minor})"


def bf16_copy(w: MXFP8Tensor, gemm: GemmConfig, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The exact bf16 dequantization of a stored-MXFP8 dense weight, written into `out` when given (the same
    address after every weight update, so captured CUDA graphs stay valid), or None when `gemm` keeps no copy.
    Only the Triton backend reads it: GEMMs of more than `COPY_MIN_M` tokens run cuBLAS bf16 on it instead of
    a Triton MXFP8 kernel (2-3x faster at 17..1024 tokens on moonlight-sized weights, mxfp8_gemm_quick.json)
    or a per-call dequantization; so do smaller GEMMs on weights below `BIG_WEIGHT` elements whose input comes
    quantize-dequantized from its producer (`copy_serves`). Same values as the stored bytes: e4m3 x 2^(s-127) is
    exact in bf16."""
    if not (gemm.bf16_copy and gemm.backend == "triton"):
        return None
    from .kernels.triton_mxfp8_gemm import dequant_triton
    return dequant_triton(w, torch.bfloat16, out=out)


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor | MXFP8Tensor | QATWeight, gemm: GemmConfig = REFERENCE,
           out_dtype: torch.dtype | None = None, x_qdq: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T in x's dtype, or in `out_dtype` (the lm_head's fp32 logits: fp32 accumulate and fp32
    output from the bf16 operands, never a bf16 result cast up afterwards). `x_qdq`: x is already MXFP8
    quantize-dequantized along K by its producer (a fused norm), so a w8a8 GEMM skips its activation
    pass and runs as w8a16 on it: the same values, quantize-dequantize being idempotent.
    `out`: a [T, N] tensor of the result's dtype that receives y and is returned (a CUDA graph's fixed logits
    buffer): cuBLAS's fp32-output GEMM writes it directly, other paths copy their result in."""
    if out is not None:
        return _linear_into(x_TK, w_NK, gemm, out_dtype, x_qdq, out)
    if x_qdq and not isinstance(w_NK, MXFP8Tensor):
        raise TypeError(f"linear: x_qdq is for stored MXFP8 weights, got {type(w_NK).__name__}")
    if isinstance(w_NK, QATWeight):
        if out_dtype not in (None, x_TK.dtype):
            raise ValueError("linear: MXFP8 weights produce x's dtype; out_dtype is for high-precision weights")
        return qat_linear(x_TK, w_NK, gemm.act_mode, gemm.scale_mode)
    if isinstance(w_NK, MXFP8Tensor):
        if out_dtype not in (None, x_TK.dtype):
            raise ValueError("linear: MXFP8 weights produce x's dtype; out_dtype is for high-precision weights")
        check_gemm_args(x_TK, w_NK)
        act_mode = "w8a16" if x_qdq else gemm.act_mode
        lead = x_TK.shape[:-1]
        x2 = x_TK.reshape(-1, x_TK.shape[-1])
        if gemm.backend == "triton" and _gemv_serves(x2, w_NK, act_mode == "w8a8"):
            from .kernels.triton_gemv import gemv_triton
            y = gemv_triton(x2, w_NK, act_mode=act_mode, scale_mode=gemm.scale_mode)
        elif gemm.backend == "triton":
            from .kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
            y = mxfp8_gemm_triton(x2, w_NK, act_mode, gemm.scale_mode)
        elif gemm.backend == "flashinfer":
            from .kernels.flashinfer_mxfp8_gemm import mxfp8_gemm_flashinfer
            y = mxfp8_gemm_flashinfer(x2, w_NK, act_mode, gemm.scale_mode)
        else:
            y = mxfp8_gemm_ref(x2, w_NK, act_mode, gemm.scale_mode)
        return y.reshape(*lead, w_NK.shape[0])
    if not isinstance(w_NK, torch.Tensor) or w_NK.dim() != 2:
        raise TypeError(f"linear: weight must be a 2-D tensor, MXFP8Tensor or QATWeight, got {type(w_NK).__name__}")
    if x_TK.shape[-1] != w_NK.shape[1]:
        raise ValueError(f"linear: x has K={x_TK.shape[-1]} but weight is {tuple(w_NK.shape)}")
    x2 = x_TK.reshape(-1, x_TK.shape[-1])
    if (gemm.backend == "triton" and w_NK.dtype == x_TK.dtype and out_dtype in (None, x_TK.dtype, torch.float32)
            and _gemv_serves(x2, w_NK)):
        from .kernels.triton_gemv import gemv_triton
        return gemv_triton(x2, w_NK, out_dtype).reshape(*x_TK.shape[:-1], w_NK.shape[0])
    if out_dtype is None or out_dtype == x_TK.dtype:
        return F.linear(x_TK, w_NK.to(x_TK.dtype))
    w = w_NK.to(x_TK.dtype)
    if x_TK.is_cuda and out_dtype == torch.float32 and x_TK.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x2, w.t(), out_dtype=out_dtype).reshape(*x_TK.shape[:-1], w.shape[0])  # cuBLAS fp32 output
    # CPU: products of bf16/fp16 operands are exact in fp32, so upcasting first is the same GEMM
    return F.linear(x_TK.to(out_dtype), w.to(out_dtype))


def _linear_into(x_TK: torch.Tensor, w_NK, gemm: GemmConfig, out_dtype: torch.dtype | None, x_qdq: bool,
                 out: torch.Tensor) -> torch.Tensor:
    """`linear` into `out` (see there)."""
    want = (x_TK.numel() // x_TK.shape[-1], w_NK.shape[0])
    dtype = out_dtype or x_TK.dtype
    if tuple(out.shape) != want or out.dtype != dtype or out.device != x_TK.device:
        raise ValueError(f"linear: out is {tuple(out.shape)} {out.dtype} on {out.device}, the result is {want} "
                         f"{dtype} on {x_TK.device}")
    x2 = x_TK.reshape(want[0], -1)
    if (isinstance(w_NK, torch.Tensor) and w_NK.dim() == 2 and x_TK.is_cuda and dtype == torch.float32
            and x_TK.dtype in (torch.bfloat16, torch.float16) and w_NK.dtype == x_TK.dtype
            and not (gemm.backend == "triton" and _gemv_serves(x2, w_NK)) and out.is_contiguous()):
        if x_TK.shape[-1] != w_NK.shape[1]:
            raise ValueError(f"linear: x has K={x_TK.shape[-1]} but weight is {tuple(w_NK.shape)}")
        return torch.mm(x2, w_NK.t(), out_dtype=torch.float32, out=out)
    return out.copy_(linear(x2, w_NK, gemm, out_dtype, x_qdq))


def _gemv_serves(x_MK: torch.Tensor, w_NK: torch.Tensor | MXFP8Tensor, quant_x: bool = False) -> bool:
    """The Triton GEMV has no backward: a product autograd records (a trainer's) stays on torch."""
    if not x_MK.is_cuda or (torch.is_grad_enabled() and (x_MK.requires_grad or getattr(w_NK, "requires_grad", False))):
        return False
    from .kernels.triton_gemv import gemv_serves
    return gemv_serves(x_MK, w_NK, quant_x)
