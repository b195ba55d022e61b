"""Fake quantization for the trainer: the exact MXFP8 round trip forward, identity gradient, and the
dispatch points (`linear`, the grouped-expert seam) giving a master weight the engine's numbers."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision import GemmConfig, MXFP8Tensor, QATWeight, dequantize, experts, fake_quant_mxfp8, linear, quantize

MODES = ("rceil", "floor")


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape, generator=g))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_exact_round_trip(mode, dtype):
    x = heavy_tailed(24, 128).to(dtype)
    x[3, :32] = 0  # a zero block
    y = fake_quant_mxfp8(x, mode)
    assert y.dtype == dtype and torch.equal(y, dequantize(*quantize(x, scale_mode=mode), dtype=dtype))
    # along another axis: blocks of 32 down the columns
    yt = fake_quant_mxfp8(x.t().contiguous(), mode, axis=0)
    assert torch.equal(yt, dequantize(*quantize(x, scale_mode=mode), dtype=dtype).t())


@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_identity(mode):
    x = heavy_tailed(8, 64, seed=1).requires_grad_()
    g = torch.randn(8, 64)
    (fake_quant_mxfp8(x, mode) * g).sum().backward()
    assert torch.equal(x.grad, g)
    x.grad = None
    (fake_quant_mxfp8(x.t(), mode, axis=0) * g.t()).sum().backward()
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("mode", MODES)
def test_matches_torchao_round_trip(mode):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    x = heavy_tailed(16, 256, seed=2)
    m = {"rceil": ScaleCalculationMode.RCEIL, "floor": ScaleCalculationMode.FLOOR}[mode]
    scale, data = mx.to_mx(x, torch.float8_e4m3fn, 32, m)
    ref = mx.to_dtype(data, scale, torch.float8_e4m3fn, 32, torch.float32)
    assert torch.equal(fake_quant_mxfp8(x, mode), ref)


@pytest.mark.parametrize("act_mode", ["w8a8", "w8a16"])
def test_linear_with_master_weight_equals_the_engine_gemm(act_mode):
    gemm = GemmConfig(act_mode, "rceil", "torch")
    w = heavy_tailed(48, 96, seed=3).requires_grad_()
    x = heavy_tailed(10, 96, seed=4).requires_grad_()
    y = linear(x, QATWeight(w), gemm)
    engine = linear(x.detach(), MXFP8Tensor.quantize(w.detach()), gemm)
    assert torch.equal(y, engine)
    y.square().sum().backward()
    assert w.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out_dtype"):
        linear(x, QATWeight(w), gemm, out_dtype=torch.float64)


def test_experts_with_master_weights_equal_the_engine_experts():
    T, D, E, F, K = 12, 64, 4, 32, 2
    gemm = GemmConfig("w8a8", "rceil", "torch")
    w13, w2 = heavy_tailed(E, 2 * F, D, seed=5).requires_grad_(), heavy_tailed(E, D, F, seed=6).requires_grad_()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(8)).requires_grad_()
    y = experts(x, ids, weights, QATWeight(w13), QATWeight(w2), gemm)
    engine = experts(x, ids, weights.detach(), MXFP8Tensor.quantize(w13.detach()), MXFP8Tensor.quantize(w2.detach()),
                     gemm)
    assert torch.equal(y, engine)
    y.sum().backward()
    assert all((t.grad.flatten(1).abs().sum(1) > 0).all() for t in (w13, w2))  # every expert got tokens
    assert weights.grad.abs().sum() > 0  # the router weights are differentiable too
