"""Triton sm90 MXFP8 GEMM against the torch reference (runs only where a CUDA GPU is present)."""
from __future__ import annotations

import pytest
import torch

from mxroll.precision.kernels.mxfp8_gemm import fake_quant, mxfp8_gemm_ref
from mxroll.precision.mxfp8 import MXFP8Tensor

cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                          reason="needs an sm90+ GPU")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@cuda
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
@pytest.mark.parametrize("N, K", [(576, 2048), (100, 96), (1000, 1504), (256, 32)])
def test_matches_reference_across_m(mode, scale_mode, N, K):
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    g = torch.Generator(device="cuda").manual_seed(N + K)
    w = MXFP8Tensor.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, scale_mode)
    for M in (1, 2, 3, 7, 16, 17, 33, 64, 100, 256, 257, 1024, 4096, 16384):
        x = (torch.randn(M, K, device="cuda", generator=g) * 3).to(torch.bfloat16)
        y = mxfp8_gemm_triton(x, w, mode, scale_mode)
        ref = mxfp8_gemm_ref(x, w, mode, scale_mode)
        assert y.shape == (M, N) and y.dtype == torch.bfloat16
        assert torch.isfinite(y).all() and rel(y, ref) < 1e-2, (M, rel(y, ref))


@cuda
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
def test_fused_activation_quantization_is_bit_exact(scale_mode):
    """With W = identity (exact in MXFP8), y = qdq(x): the kernel's in-register quantization must
    equal precision.mxfp8.quantize bit for bit, on many magnitudes and block maxima at 448*2^k."""
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    K = 256
    eye = MXFP8Tensor.quantize(torch.eye(K, device="cuda"), scale_mode)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, K, device="cuda", generator=g) * torch.exp2(torch.randint(-30, 30, (512, 1), device="cuda",
                                                                                     generator=g).float())
    x[::7, ::32] = 448 * torch.exp2(torch.randint(-20, 20, (74, 8), device="cuda", generator=g).float())
    x[3] = 0
    x = x.to(torch.bfloat16)
    y = mxfp8_gemm_triton(x, eye, "w8a8", scale_mode)
    assert torch.equal(y, fake_quant(x, scale_mode))


@cuda
def test_deterministic_and_rejects_bad_input():
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    w = MXFP8Tensor.quantize(torch.randn(576, 7168, device="cuda"))
    x = torch.randn(4, 7168, device="cuda", dtype=torch.bfloat16)
    first = mxfp8_gemm_triton(x, w)  # split-K: the last-arriving program sums partials in split order
    for _ in range(50):
        assert torch.equal(mxfp8_gemm_triton(x, w), first)
    with pytest.raises(TypeError, match="bf16/fp16"):
        mxfp8_gemm_triton(x.float(), w)
    with pytest.raises(ValueError, match="K="):
        mxfp8_gemm_triton(x[:, :100], w)


@cuda
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
def test_helper_kernels_are_exact(scale_mode):
    from mxroll.precision.kernels.triton_mxfp8_gemm import act_qdq_triton, dequant_triton
    g = torch.Generator(device="cuda").manual_seed(1)
    w = MXFP8Tensor.quantize(torch.randn(300, 1056, device="cuda", generator=g), scale_mode)
    assert torch.equal(dequant_triton(w), w.dequantize(torch.bfloat16))
    x = (torch.randn(77, 1056, device="cuda", generator=g) * 40).to(torch.bfloat16)
    assert torch.equal(act_qdq_triton(x, scale_mode), fake_quant(x, scale_mode))


@cuda
@pytest.mark.parametrize("tma", [False, True])
def test_big_weight_decode_configs(tma):
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton, pick_config
    g = torch.Generator(device="cuda").manual_seed(7)
    w = MXFP8Tensor.quantize(torch.randn(4160, 4096, device="cuda", generator=g) * 0.02)
    for M in (1, 5, 16):
        cfg = dict(pick_config(M, 4160, 4096), USE_TMA=tma)
        x = torch.randn(M, 4096, device="cuda", generator=g).to(torch.bfloat16)
        for mode in ("w8a8", "w8a16"):
            y = mxfp8_gemm_triton(x, w, mode, config=cfg)
            assert rel(y, mxfp8_gemm_ref(x, w, mode, "rceil")) < 1e-2


@cuda
@pytest.mark.parametrize("mma, swap", [("bf16", False), ("bf16", True), ("fp8", False), ("fp8", True)])
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
def test_mid_m_variants(mma, swap, scale_mode):
    """Every mid-M variant against the reference at ragged M/N/K (split-K included). The fp8 MMA
    accumulates each 32-block at reduced precision: looser bound, and reported by the benchmark."""
    from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton
    from mxroll.precision.kernels.triton_mxfp8_gemm_mid import mid_config
    g = torch.Generator(device="cuda").manual_seed(11)
    for N, K in [(576, 2048), (1000, 1504), (100, 96), (3072, 7168)]:
        w = MXFP8Tensor.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, scale_mode)
        for M in (17, 33, 64, 100, 256, 300, 1024):
            x = (torch.randn(M, K, device="cuda", generator=g) * 3).to(torch.bfloat16)
            modes = ("w8a8",) if mma == "fp8" else ("w8a8", "w8a16")
            for mode in modes:
                y = mxfp8_gemm_triton(x, w, mode, scale_mode, config=mid_config(M, N, K, mma, swap))
                ref = mxfp8_gemm_ref(x, w, mode, scale_mode)
                assert y.shape == (M, N) and torch.isfinite(y).all()
                assert rel(y, ref) < (1e-2 if mma == "fp8" else 5e-3), (N, K, M, mode, rel(y, ref))


@cuda
def test_mid_m_default_path_and_prequantized_activation():
    from mxroll.precision.kernels.triton_mxfp8_gemm import act_quant_triton, mxfp8_gemm_triton, pick_config
    from mxroll.precision.kernels.triton_mxfp8_gemm_mid import mid_config, mxfp8_gemm_mid
    assert pick_config(64, 3072, 2048)["PATH"] == "mid" and pick_config(16, 3072, 2048)["PATH"] == "fused"
    assert pick_config(2048, 3072, 2048)["PATH"] == "dequant"
    g = torch.Generator(device="cuda").manual_seed(12)
    w = MXFP8Tensor.quantize(torch.randn(576, 2048, device="cuda", generator=g) * 0.05)
    x = torch.randn(128, 2048, device="cuda", generator=g).to(torch.bfloat16)
    ref = mxfp8_gemm_ref(x, w, "w8a8", "rceil")
    y = mxfp8_gemm_triton(x, w)
    assert rel(y, ref) < 5e-3
    for _ in range(20):  # split-K reduction in split order: bitwise repeatable
        assert torch.equal(mxfp8_gemm_triton(x, w), y)
    cfg = mid_config(128, 576, 2048, "fp8")
    xq = act_quant_triton(x)
    assert torch.equal(mxfp8_gemm_mid(x, w, "w8a8", config=cfg, x_q=xq), mxfp8_gemm_mid(x, w, "w8a8", config=cfg))
    with pytest.raises(ValueError, match="w8a8"):
        mxfp8_gemm_mid(x, w, "w8a16", config=cfg)


@cuda
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
def test_act_quant_bytes(scale_mode):
    from mxroll.precision.kernels.triton_mxfp8_gemm import act_quant_triton
    from mxroll.precision.mxfp8 import quantize
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(77, 1056, device="cuda", generator=g) * torch.exp2(
        torch.randint(-30, 30, (77, 1), device="cuda", generator=g).float())
    x[::5, ::32] = 448 * torch.exp2(torch.randint(-20, 20, x[::5, ::32].shape, device="cuda", generator=g).float())
    x = x.to(torch.bfloat16)
    q = act_quant_triton(x, scale_mode)
    data, scale = quantize(x, 32, scale_mode)
    assert torch.equal(q.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(q.scale, scale)


@cuda
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_dense_bf16_copy_serves_gemms_above_16_tokens(mode):
    """`precision.linear.bf16_copy`: the exact dequantization, refreshed in place; GEMMs above COPY_MIN_M tokens
    run cuBLAS on it (bit-equal to the per-call dequantize path above 64 tokens), up to it the MXFP8 kernel, except
    for a small weight whose input is already quantized (w8a16 here): cuBLAS on the copy from 2 tokens (one token:
    the GEMV)."""
    from mxroll.precision import GemmConfig, linear
    from mxroll.precision.kernels import triton_gemv
    from mxroll.precision.kernels.triton_mxfp8_gemm import BIG_WEIGHT, COPY_MIN_M, act_qdq_triton, copy_serves
    from mxroll.precision.linear import bf16_copy
    g = torch.Generator(device="cuda").manual_seed(7)
    w = MXFP8Tensor.quantize(torch.randn(576, 2048, device="cuda", generator=g) * 0.05)
    gemm = GemmConfig(mode, "rceil", "triton", bf16_copy=True)
    assert bf16_copy(w, GemmConfig(mode, "rceil", "triton")) is None  # no copy unless asked
    copy = bf16_copy(w, gemm)
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, w.dequantize(torch.bfloat16))
    wc = MXFP8Tensor(w.data, w.scale, bf16_copy=copy)
    for M in (1, COPY_MIN_M, COPY_MIN_M + 1, 64, 65, 300):
        x = (torch.randn(M, 2048, device="cuda", generator=g) * 3).to(torch.bfloat16)
        y, y0 = linear(x, wc, gemm), linear(x, w, gemm)
        xa = act_qdq_triton(x) if mode == "w8a8" else x
        serves = copy_serves(M, 576, 2048, mode == "w8a8")
        assert serves == (M > COPY_MIN_M or mode == "w8a16")
        if M <= triton_gemv.SERVE_MAX_M:  # one token: the GEMV on the MXFP8 bytes, copy or not (test_gemv.py)
            assert torch.equal(y, triton_gemv.gemv_triton(x, w, act_mode=mode)) and torch.equal(y, y0), M
        elif not serves or M > 64:  # the MXFP8 kernel as before / the same cuBLAS GEMM on the same values
            assert torch.equal(y, y0), M
        if serves and M > triton_gemv.SERVE_MAX_M:
            assert torch.equal(y, torch.nn.functional.linear(xa, copy)), M
        assert rel(y, mxfp8_gemm_ref(x, w, mode, "rceil")) < 1e-2, M
    assert not copy_serves(1, 4096, BIG_WEIGHT // 4096, False)  # big weights: the MXFP8 kernel up to 16 tokens
    # a weight update: new bytes land in place, the copy is rebuilt at the same address
    w2 = MXFP8Tensor.quantize(torch.randn(576, 2048, device="cuda", generator=g) * 0.05)
    w.data.copy_(w2.data)
    w.scale.copy_(w2.scale)
    assert bf16_copy(w, gemm, out=copy) is copy and torch.equal(copy, w2.dequantize(torch.bfloat16))
    with pytest.raises(ValueError, match="out"):
        bf16_copy(w, gemm, out=torch.empty(576, 2047, dtype=torch.bfloat16, device="cuda"))
