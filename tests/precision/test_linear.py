"""precision.linear dispatch and the MXFP8 GEMM reference."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision import GemmConfig, MXFP8Tensor, linear, select_backend

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402


def torchao_qdq(x):
    scale, data = mx.to_mx(x.contiguous(), torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    return mx.to_dtype(data, scale, torch.float8_e4m3fn, 32, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gemm_against_torchao_emulation(dtype):
    g = torch.Generator().manual_seed(0)
    w_hp = torch.randn(96, 160, generator=g).to(dtype)
    x = torch.randn(3, 5, 160, generator=g).to(dtype)
    w = MXFP8Tensor.quantize(w_hp)
    y8 = linear(x, w, GemmConfig("w8a8"))
    y16 = linear(x, w, GemmConfig("w8a16"))
    assert y8.shape == (3, 5, 96) and y8.dtype == dtype
    ref8 = torch.nn.functional.linear(torchao_qdq(x), torchao_qdq(w_hp))
    ref16 = torch.nn.functional.linear(x, torchao_qdq(w_hp))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y8.float(), ref8.float(), rtol=tol, atol=tol)
    assert torch.allclose(y16.float(), ref16.float(), rtol=tol, atol=tol)
    assert not torch.allclose(y8, y16)  # activation quantization is really applied


def test_shape_and_block_errors():
    w = MXFP8Tensor.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="K=32"):
        linear(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match=r"data \(8, 48\)"):  # K=48 cannot be MXFP8 at all
        MXFP8Tensor(torch.zeros(8, 48, dtype=torch.float8_e4m3fn), torch.zeros(8, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be \\[N, K\\]"):
        linear(torch.randn(2, 64), MXFP8Tensor.quantize(torch.randn(2, 8, 64)))


def test_backend_selection_on_cpu_is_explicit():
    assert select_backend(torch.device("cpu")) == ("torch", "torch reference (cpu)")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="supported"):
        select_backend(torch.device("cpu"), "cutlass")
