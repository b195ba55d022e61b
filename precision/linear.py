"""`linear(x, w)`: the one dispatch point for every dense GEMM in the model.

Legend: T tokens, K in_features (contraction), N out_features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x_TK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T in x's dtype. High-precision weights only for now; quantized formats dispatch here."""
    if not isinstance(w_NK, torch.Tensor) or w_NK.dim() != 2:
        raise TypeError(f"linear: weight must be a 2-D tensor, got {type(w_NK).__name__}")
    if x_TK.shape[-1] != w_NK.shape[1]:
        raise ValueError(f"linear: x has K={x_TK.shape[-1]} but weight is {tuple(w_NK.shape)}")
    return F.linear(x_TK, w_NK.to(x_TK.dtype))
