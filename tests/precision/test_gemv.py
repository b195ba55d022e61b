"""The Triton decode GEMV (precision/kernels/triton_gemv.py) against an fp64 reference of the same operands, and
the dispatch that sends 1..4-token products to it. On the GPU, or on CPU under the Triton interpreter (fp16
activations there: see tests/kernel_device.py)."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_device import kernel_device

DEVICE, LOW = kernel_device()

from mxroll.precision.kernels import triton_gemv  # noqa: E402
from mxroll.precision.kernels.mxfp8_gemm import fake_quant  # noqa: E402
from mxroll.precision.kernels.triton_gemv import gemv_triton  # noqa: E402
from mxroll.precision.linear import GemmConfig, linear  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

# N not a multiple of the rows per program; K not a power of two (96, 1408: moonlight's expert width, 1440)
SHAPES = [(37, 96), (130, 256), (8, 2048), (20, 1408), (9, 1440)]


def operands(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2).to(LOW).to(DEVICE)
    w = (torch.randn(N, K, generator=g) * 0.05).to(LOW).to(DEVICE)
    return x, w


def close(y, ref, out_dtype, x, w):
    """y within the output's rounding of the exact result plus fp32 summation error (2^-20 of the sum of |products|,
    K <= 2048: far below a bf16/fp16 ulp of typical outputs)."""
    tol = 2 ** -23 if out_dtype == torch.float32 else 2 ** -7
    sum_abs = x.double().abs() @ w.double().abs().t()
    err = (y.double() - ref).abs() - tol * ref.abs() - 2 ** -20 * sum_abs
    assert err.max().item() <= 0, (y.double() - ref).abs().max().item()


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_gemv_high_precision_weights(M, N, K, out_dtype):
    x, w = operands(M, N, K)
    y = gemv_triton(x, w, out_dtype)
    assert y.dtype == (out_dtype or LOW) and y.shape == (M, N)
    close(y, x.double() @ w.double().t(), y.dtype, x, w)
    assert torch.equal(y, gemv_triton(x, w, out_dtype))  # same bits twice


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("rows_per_program", [1, 4])
def test_gemv_mxfp8_weights(M, N, K, rows_per_program):
    """w8a16 on an input already quantize-dequantized (the fused norm's output); w8a8 on that same input is the
    same product (quantize-dequantize is idempotent)."""
    x, w = operands(M, N, K, 1)
    x = fake_quant(x, "rceil")
    q = MXFP8Tensor.quantize(w)
    ref = x.double() @ q.dequantize(torch.float32).double().t()
    cfg = dict(BN=rows_per_program, num_warps=4)
    for act in ("w8a16", "w8a8"):
        close(gemv_triton(x, q, act_mode=act, config=cfg), ref, LOW, x, q.dequantize(torch.float32))


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("N, K", [(6, 5024), (3, 9024), (5, 11264)])
def test_gemv_large_k_dispatch_config(quant, N, K):
    """The config the dispatch picks past K = 4096 (no config passed): MXFP8 from a padded K of LARGE_KP holds
    several whole rows a program on 8 warps (the last block's rows masked), bf16 one row; against the exact products
    (fp32 sums: a relative error far below a wrong row's or column's) and the same bits twice."""
    import triton
    x, w = operands(1, N, K, K)
    if quant:
        x = fake_quant(x, "rceil")
        q = MXFP8Tensor.quantize(w)
        w = q.dequantize(torch.float32)
    else:
        q = w
    cfg = triton_gemv.gemv_config(N, K, quant)
    if quant and triton.next_power_of_2(K) >= triton_gemv.LARGE_KP:
        assert cfg["BN"] > 1 and cfg["num_warps"] == 8
    y = gemv_triton(x, q, torch.float32)
    ref = x.double() @ w.double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert torch.equal(gemv_triton(x, q, torch.float32), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="round-to-nearest-even casts: GPU only (interpreter rounds "
                    "toward zero)")
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
def test_gemv_w8a8_quantizes_x_as_the_reference(scale_mode):
    x, w = operands(2, 300, 2048, 2)
    q = MXFP8Tensor.quantize(w, scale_mode)
    xq, wq = fake_quant(x, scale_mode), q.dequantize(torch.float32)
    close(gemv_triton(x, q, act_mode="w8a8", scale_mode=scale_mode), xq.double() @ wq.double().t(), LOW, xq, wq)


def test_gemv_rejects_what_it_cannot_run():
    x, w = operands(5, 16, 64)
    with pytest.raises(ValueError, match="rows"):
        gemv_triton(x, w)
    with pytest.raises(ValueError, match="w8a8"):
        gemv_triton(x[:1], w, act_mode="w8a8")
    with pytest.raises(ValueError, match="weight"):
        gemv_triton(x[:1], w[:, :32])
    with pytest.raises(ValueError, match="contiguous"):
        gemv_triton(x[:1], w.t().contiguous().t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch sends CUDA inputs only")
def test_dispatch_sends_decode_products_to_the_gemv(monkeypatch):
    """Up to SERVE_MAX_M tokens on the Triton backend: the GEMV; more tokens, or the torch backend: as before."""
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    gemm = GemmConfig(backend="triton")
    x, w = operands(5, 300, 2048, 3)
    q = MXFP8Tensor.quantize(w)
    M = triton_gemv.SERVE_MAX_M
    assert M >= 1
    assert torch.equal(linear(x[:M], w, gemm), gemv_triton(x[:M], w))
    assert torch.equal(linear(x[:M], w, gemm, out_dtype=torch.float32), gemv_triton(x[:M], w, torch.float32))
    assert torch.equal(linear(x[:M], q, gemm), gemv_triton(x[:M], q, act_mode="w8a8"))
    assert torch.equal(linear(x[:M], q, gemm, x_qdq=True), gemv_triton(x[:M], q))
    assert torch.equal(linear(x[:M + 1], w, gemm), torch.nn.functional.linear(x[:M + 1], w))
    assert torch.equal(linear(x[:M + 1], q, gemm), mxfp8_gemm_triton(x[:M + 1], q, "w8a8"))
    assert torch.equal(linear(x[:1], w), torch.nn.functional.linear(x[:1], w))  # torch backend
    monkeypatch.setattr(triton_gemv, "SERVE_MAX_M", 0)
    assert torch.equal(linear(x[:1], w, gemm), torch.nn.functional.linear(x[:1], w))


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("T", [1, 2])
def test_moe_rows_gemv_matches_reference(quant, T):
    """The fused MoE's one-token path (triton_moe_gemv; two tokens too) against an fp64 reference: each token's
    K expert outputs times their top-k weights, summed; D and F not powers of two (masked rows and columns). The
    combine in the down kernel's last-arriving program: with a shared output, exactly torch's bf16 add of it to the
    result without; the same bits twice (the arrival counters reset). MXFP8 on the GPU: w8a8 (x and h
    quantize-dequantized along K in the kernels); under the interpreter (casts round toward zero) x arrives
    quantize-dequantized and h is not quantized."""
    from mxroll.precision.kernels.triton_moe_gemv import moe_gemv
    E, K, D, F = 6, 3, 352, 224
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g).to(LOW)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(torch.int32)
    tw = torch.rand(T, K, generator=g) * 2
    w13 = torch.randn(E, 2 * F, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, F, generator=g) / F ** 0.5
    shared = torch.randn(T, D, generator=g).to(LOW)
    if quant:
        q13, q2 = MXFP8Tensor.quantize(w13), MXFP8Tensor.quantize(w2)
        d13, s13, d2, s2 = (t.to(DEVICE) for t in (q13.data, q13.scale, q2.data, q2.scale))
        w13, w2 = q13.dequantize(torch.float32), q2.dequantize(torch.float32)
    else:
        w13, w2 = w13.to(LOW).float(), w2.to(LOW).float()
        d13, d2 = w13.to(LOW).to(DEVICE), w2.to(LOW).to(DEVICE)
        s13, s2 = d13, d2
    w8a8 = quant and torch.cuda.is_available()
    if quant and not w8a8:
        x = fake_quant(x, "rceil")
    args = (x.to(DEVICE), ids.to(DEVICE), tw.to(DEVICE), d13, s13, d2, s2, quant, w8a8, w8a8, False)
    y = moe_gemv(*args).cpu()
    assert y.shape == (T, D) and y.dtype == x.dtype
    assert torch.equal(moe_gemv(*args).cpu(), y)
    assert torch.equal(moe_gemv(*args, shared_TD=shared.to(DEVICE)).cpu(), y + shared)
    # the last column made the hosted shared expert E - 1 (routed ids below it): its pairs, computed before the
    # PDL wait in programs ordered first, give the same bits as when routed like the others
    ids_h = torch.cat([torch.rand(T, E - 1, generator=g).argsort(dim=1)[:, :K - 1].to(torch.int32),
                       torch.full((T, 1), E - 1, dtype=torch.int32)], 1).to(DEVICE)
    args_h = (args[0], ids_h) + args[2:]
    assert torch.equal(moe_gemv(*args_h, hosted=1).cpu(), moe_gemv(*args_h).cpu())
    with pytest.raises(ValueError, match="hosted"):
        moe_gemv(*args_h, hosted=K)
    for t in range(T):
        xt = fake_quant(x[t:t + 1].float(), "rceil") if quant else x[t:t + 1].float()
        ref = torch.zeros(D, dtype=torch.float64)
        for k in range(K):
            e = ids[t, k].item()
            gu = (xt.double() @ w13[e].double().t()).to(torch.bfloat16).float()  # the kernel's bf16 roundings
            h = (torch.nn.functional.silu(gu[:, :F]).to(torch.bfloat16).float() * gu[:, F:]).to(torch.bfloat16)
            h = fake_quant(h, "rceil").double() if w8a8 else h.double()
            ref += (h @ w2[e].double().t())[0] * tw[t, k].item()
        assert ((y[t].double() - ref).norm() / ref.norm()).item() < 3e-2, t  # interpreter: roundings toward 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch sends CUDA inputs only")
def test_dispatch_keeps_long_w8a8_rows_on_the_decode_kernel():
    """w8a8 with K above QUANT_X_MAX_K: every GEMV program would quantize x again; the decode kernel serves."""
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    K = triton_gemv.QUANT_X_MAX_K * 2
    x, w = operands(1, 64, K, 4)
    q = MXFP8Tensor.quantize(w)
    gemm = GemmConfig(backend="triton")
    assert torch.equal(linear(x, q, gemm), mxfp8_gemm_triton(x, q, "w8a8"))
    assert torch.equal(linear(x, q, gemm, x_qdq=True), gemv_triton(x, q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch sends CUDA inputs only")
def test_dispatch_leaves_autograd_products_to_torch():
    x, w = operands(1, 64, 256, 5)
    w = w.clone().requires_grad_(True)
    y = linear(x, w, GemmConfig(backend="triton"))
    assert y.requires_grad and torch.equal(y.detach(), torch.nn.functional.linear(x, w.detach()))
