"""FlashInfer MXFP8 GEMM for Blackwell (sm100+): `flashinfer.mm_mxfp8`.

Written to FlashInfer 0.7.2's documented API; the project's machines are Hopper, where this
path cannot run (and FlashInfer's `mxfp8_quantize` kernel body is compiled for sm100+ only), so
it is untested on hardware. Weight scales must be in the 128x4 swizzled layout, which the
engine builds once per weight (and re-applies on updates) through `precision.layout`; the
activation is quantized by FlashInfer (RCEIL rule, swizzled scales).
"""
from __future__ import annotations

import torch

from ..mxfp8 import MXFP8Tensor
from .mxfp8_gemm import check_gemm_args


def mxfp8_gemm_flashinfer(x_MK: torch.Tensor, w: MXFP8Tensor, act_mode: str = "w8a8",
                          scale_mode: str = "rceil") -> torch.Tensor:
    check_gemm_args(x_MK, w)
    if act_mode != "w8a8":
        raise ValueError("flashinfer mm_mxfp8 multiplies MXFP8 by MXFP8: act_mode must be 'w8a8' "
                         "(use gemm_backend='torch' for w8a16 on sm100)")
    if scale_mode != "rceil":
        raise ValueError("flashinfer.mxfp8_quantize uses the RCEIL scale rule; a 'floor' recipe needs "
                         "gemm_backend='torch'")
    if w.swizzled_scale is None:
        raise ValueError("flashinfer mm_mxfp8 needs 128x4-swizzled weight scales (engine post-processing)")
    import flashinfer

    x_q, x_sf = flashinfer.mxfp8_quantize(x_MK.contiguous(), is_sf_swizzled_layout=True)
    return flashinfer.mm_mxfp8(x_q, w.data.t(), x_sf, w.swizzled_scale.reshape(-1), out_dtype=x_MK.dtype)
