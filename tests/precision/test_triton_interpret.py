"""Kernel logic on CPU through Triton's interpreter (indexing, masks, split-K, swapped operands,
block scales). Runs only when asked: `TRITON_INTERPRET=1 python -m pytest tests/precision/test_triton_interpret.py`
in an environment with triton (and numpy < 2.3, whose scalar conversions the interpreter needs).
The interpreter's fp32 -> e4m3/bf16 casts do not round to nearest even and its bf16 dot is wrong,
so these tests feed fp16 activations that are already MXFP8 values; rounding of the in-kernel
quantization is covered by the GPU tests (test_triton_gemm.py, test_rmsnorm_mxfp8.py)."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter tests: set TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")

from mxroll.precision.kernels.mxfp8_gemm import fake_quant, mxfp8_gemm_ref  # noqa: E402
from mxroll.precision.kernels.rmsnorm_mxfp8 import normed_step_mismatch, rmsnorm_ref  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import dequant_triton, fused_config, mxfp8_gemm_triton  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm_mid import mid_config, mxfp8_gemm_mid  # noqa: E402
from mxroll.precision.kernels.triton_rmsnorm_mxfp8 import add_rmsnorm_mxfp8_triton, rmsnorm_mxfp8_triton  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor, quantize  # noqa: E402


def setup(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = MXFP8Tensor.quantize(torch.randn(N, K, generator=g) * 0.5)  # fp16 keeps every dequantized value exact
    x = fake_quant((torch.randn(M, K, generator=g) * 3).half(), "rceil")
    return x, w, mxfp8_gemm_ref(x, w, "w8a16", "rceil")


@pytest.mark.parametrize("mma", ["bf16", "fp8"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("M, N, K", [(17, 96, 192), (40, 130, 96), (70, 64, 320)])
def test_mid_kernel(mma, swap, M, N, K):
    """The "bf16" variant runs its MMA in x's dtype (fp16 here); split-K is on (4 SMs assumed)."""
    x, w, ref = setup(M, N, K)
    cfg = mid_config(M, N, K, mma, swap)
    if mma == "fp8":
        y = mxfp8_gemm_mid(x, w, "w8a8", config=cfg, x_q=MXFP8Tensor.quantize(x))
    else:
        y = mxfp8_gemm_mid(x, w, "w8a16", config=cfg)
    assert torch.allclose(y.float(), ref.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("M", [3, 17])
def test_fused_kernel_after_refactor(M):
    x, w, ref = setup(M, 96, 192, 1)
    y = mxfp8_gemm_triton(x, w, "w8a16", config=dict(fused_config(M, 96, 192), USE_TMA=False))
    assert torch.allclose(y.float(), ref.float(), rtol=2e-3, atol=2e-3)
    assert torch.equal(dequant_triton(w, torch.float16), w.dequantize(torch.float16))


@pytest.mark.parametrize("D", [512, 576, 2048])
def test_rmsnorm_kernel_normed_output_and_scales(D):
    g = torch.Generator().manual_seed(D)
    x = (torch.randn(5, D, generator=g) * 3).half()
    w = (1 + 0.1 * torch.randn(D, generator=g)).half()
    y, q, _ = rmsnorm_mxfp8_triton(x, w, 1e-6)
    yr = rmsnorm_ref(x, w, 1e-6)
    assert ((y.float() - yr.float()).abs() <= 1e-3 * yr.float().abs()).all()
    assert torch.equal(q.scale, quantize(y)[1])  # scale bytes come from integer ops: exact here too


def test_rmsnorm_kernel_many_rows_flip_roundings_by_one_normalized_step():
    """What the H200 saw at T=4096, at a size the interpreter runs: with enough rows the kernel's sum
    order (numpy's here) flips some normalized values by one fp16 step, which the weight stretches
    beyond one step of the output; every output is still the weight times a neighbour of the
    reference's normalized value, and the scales are those of the kernel's own output."""
    g = torch.Generator().manual_seed(1024)
    x = (torch.randn(512, 512, generator=g) * 4).half()
    w = (1 + 0.2 * torch.randn(512, generator=g)).half()
    y, q, _ = rmsnorm_mxfp8_triton(x, w, 1e-6)
    yr = rmsnorm_ref(x, w, 1e-6)
    beyond_one_ulp = (y.float() - yr.float()).abs() > torch.finfo(torch.float16).eps * yr.float().abs()
    assert beyond_one_ulp.any()  # the case this test is about happens at this size
    assert not normed_step_mismatch(y, x, w, 1e-6).any() and (y != yr).float().mean() < 1e-3
    assert torch.equal(q.scale, quantize(y)[1])


def test_rmsnorm_kernel_residual_add():
    g = torch.Generator().manual_seed(5)
    x, dx = (torch.randn(6, 576, generator=g) * 3).half(), (torch.randn(6, 576, generator=g) * 3).half()
    w = (1 + 0.1 * torch.randn(576, generator=g)).half()
    y, q, d, s = add_rmsnorm_mxfp8_triton(x, dx, w, 1e-6, quant=True, qdq=True)
    assert torch.equal(s, x + dx)
    y1, q1, d1 = rmsnorm_mxfp8_triton(s, w, 1e-6, qdq=True)
    assert torch.equal(y, y1) and torch.equal(d, d1) and torch.equal(q.scale, q1.scale)
    assert not normed_step_mismatch(y, s, w, 1e-6).any()


@pytest.mark.parametrize("shared", [False, True])
def test_moe_combine_kernel_sum_order_and_shared_add(shared):
    """y[t] = sum over k in order (fp32), rounded; with the shared output: plus it, rounded again (fp16 here)."""
    from mxroll.precision.kernels.triton_moe import _combine_kernel
    g = torch.Generator().manual_seed(2)
    T, K, D = 3, 4, 1100  # D spans two 1024-wide programs
    p = torch.randn(T * K, D, generator=g)
    s = (torch.randn(T, D + 8, generator=g) * 4).half()[:, :D]  # a strided view
    y = torch.empty(T, D, dtype=torch.float16)
    _combine_kernel[(T, 2)](p, y, s, s.stride(0), K, D, BD=1024, SHARED=shared, PDL=False)
    acc = p.view(T, K, D)[:, 0].clone()
    for k in range(1, K):
        acc += p.view(T, K, D)[:, k]
    ref = acc.half() + s if shared else acc.half()
    assert torch.equal(y, ref)


def moe_case(T, E=8, K=3, D=128, F=96, seed=0):
    from mxroll.precision.moe import experts_ref
    from mxroll.precision.linear import GemmConfig
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]
    w = torch.rand(T, K, generator=g) * 2.5
    w13 = MXFP8Tensor.quantize(torch.randn(E, 2 * F, D, generator=g) / D ** 0.5)
    w2 = MXFP8Tensor.quantize(torch.randn(E, D, F, generator=g) / F ** 0.5)
    return (x, ids, w, w13, w2), experts_ref(x, ids, w, w13, w2, GemmConfig("w8a16"))


@pytest.mark.parametrize("D, F", [(128, 96), (352, 224), (1440, 1408), (4640, 64)])  # 4640: GATE_UP_MIN_ROWS
def test_moe_rows_gemv_contractions_not_powers_of_two(D, F):
    """The one-token MXFP8 MoE path (triton_moe_gemv: whole rows, a contraction padded to a power of two and masked
    past its end) at widths that are not powers of two (moonlight's F = 1408 among them): against the reference to
    the interpreter's truncating bf16 casts, and the same bits twice. (The w8a8 paths are compared on the GPU,
    test_moe.py: the interpreter's in-kernel quantize does not round as the GPU's does.)"""
    from mxroll.precision.kernels import triton_moe_gemv
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    args, ref = moe_case(1, D=D, F=F, seed=D)
    assert triton_moe_gemv.serves(1, True)
    y = fused_moe_triton(*args, "w8a16")
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-2
    assert torch.equal(fused_moe_triton(*args, "w8a16"), y)


@pytest.mark.parametrize("T", [2, 13])  # 6 pairs: one block per pair; 39 pairs: sorted blocks
def test_fused_moe_split_k_and_gemv(T):
    """Split-K indexing (partials by (token, k) row, arrival counters, a short last split) and the GEMV
    variant on pair and sorted blocks. The interpreter's bf16 dot is wrong, so only GEMV runs here
    (split-K on the dot path: the GPU tests); its bf16 casts truncate, hence the loose bound against the
    reference, and the split results are compared with the unsplit kernel's, which differ only by the fp32
    summation order (a dropped or doubled partial would be off by tens of percent)."""
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    args, ref = moe_case(T, seed=T)
    cfg = dict(BM=1, BN=32, BK=32, num_warps=4, num_stages=3, GEMV=True)
    y = fused_moe_triton(*args, "w8a16", config=cfg)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-2
    for bm, split_gu, split_down in ((1, 3, 2), (2, 4, 1), (2, 1, 3)):
        ys = fused_moe_triton(*args, "w8a16", config=dict(cfg, BM=bm, SPLIT_GU=split_gu, SPLIT_DOWN=split_down))
        assert ((ys.float() - y.float()).norm() / y.float().norm()).item() < 4e-3, (bm, split_gu, split_down)
        assert torch.equal(fused_moe_triton(*args, "w8a16", config=dict(cfg, BM=bm, SPLIT_GU=split_gu,
                                                                         SPLIT_DOWN=split_down)), ys)
