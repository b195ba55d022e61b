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


def _into_case(M: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 64, generator=g).bfloat16().to(device)
    w = torch.randn(40, 64, generator=g).bfloat16().to(device)
    return x, w, torch.full((M + 2, 40), float("nan"), device=device)


def test_linear_into_out_buffer():
    """out=: the plain call's values land in the given rows (nothing beyond them), the buffer is returned; a buffer
    of another shape or dtype than the result is an error naming both."""
    x, w, buf = _into_case(3)
    y = linear(x, w, out_dtype=torch.float32, out=buf[:3])
    assert y.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:3], linear(x, w, out_dtype=torch.float32)) and torch.isnan(buf[3:]).all()
    q = MXFP8Tensor.quantize(w.float())
    qbuf = torch.empty(3, 40)
    assert torch.equal(linear(x.float(), q, out=qbuf), linear(x.float(), q))
    with pytest.raises(ValueError, match=r"out is \(4, 40\).*\(3, 40\)"):
        linear(x, w, out_dtype=torch.float32, out=buf[:4])
    with pytest.raises(ValueError, match="torch.float32.*torch.bfloat16"):
        linear(x, w, out=buf[:3])  # the result would be bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's fp32-output GEMM into the buffer")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("M", [1, 5, 300])
def test_linear_into_out_buffer_cuda(M, backend):
    """The lm_head's fp32 logits written into a graph's buffer: the same bits as the allocating call, on the GEMV
    (one token, Triton backend) and on cuBLAS."""
    x, w, buf = _into_case(M, "cuda")
    gemm = GemmConfig(backend=backend)
    y = linear(x, w, gemm, out_dtype=torch.float32, out=buf[:M])
    assert y.data_ptr() == buf.data_ptr() and torch.isnan(buf[M:]).all()
    assert torch.equal(buf[:M], linear(x, w, gemm, out_dtype=torch.float32))
