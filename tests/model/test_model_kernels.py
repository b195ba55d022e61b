"""Triton RMSNorm and router top-k against their torch references (model.ops). Runs on a CUDA GPU,
or on CPU under TRITON_INTERPRET=1 (the Triton interpreter); skipped otherwise."""
from __future__ import annotations

import pytest
import torch

from mxroll.model.ops import add_rmsnorm, rmsnorm_ref, route_topk_ref
from tests.kernel_device import kernel_device

pytest.importorskip("triton")
DEVICE, LOW = kernel_device()
ULP = 2 ** -7 if LOW == torch.bfloat16 else 2 ** -10


@pytest.mark.parametrize("D", [512, 2048, 96])
def test_rmsnorm_triton_matches_reference(D):
    from mxroll.model.kernels.triton_norm import rmsnorm_triton

    g = torch.Generator().manual_seed(D)
    base = torch.randn(7, D + 64, generator=g).to(DEVICE, LOW) * 3
    x = base[:, :D]  # a split view: rows strided, as the latent is in MLA
    w = (torch.rand(D, generator=g) + 0.5).to(DEVICE, LOW)
    got, ref = rmsnorm_triton(x, w, 1e-5).float(), rmsnorm_ref(x, w, 1e-5).float()
    # same roundings; only the fp32 sum order differs, which can move a value by one bf16 step at most
    ulp = ref.abs().clamp_min(1e-3) * ULP
    assert ((got - ref).abs() <= ulp).all()
    assert (got == ref).float().mean() > 0.99


def test_add_rmsnorm_triton_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g).to(DEVICE, LOW)
    d = torch.randn(5, 256, generator=g).to(DEVICE, LOW)
    w = torch.rand(256, generator=g).to(DEVICE, LOW)
    h, s = add_rmsnorm(x, d, w, 1e-6, backend="triton")
    h_ref, s_ref = add_rmsnorm(x, d, w, 1e-6, backend="torch")
    assert torch.equal(s, s_ref)  # the residual stream: x + delta rounded once, exactly as torch adds
    assert ((h.float() - h_ref.float()).abs() <= h_ref.float().abs().clamp_min(1e-3) * ULP).all()
    h0, s0 = add_rmsnorm(x, None, w, 1e-6, backend="triton")
    assert s0 is x and h0.shape == x.shape


@pytest.mark.parametrize("E,n_group,topk_group,k,norm", [(64, 1, 1, 6, True), (256, 8, 4, 8, True),
                                                          (32, 4, 2, 3, False)])
def test_route_topk_triton_matches_reference(E, n_group, topk_group, k, norm):
    from mxroll.model.kernels.triton_router import route_topk_triton

    g = torch.Generator().manual_seed(E)
    scores = torch.randn(33, E, generator=g).sigmoid().to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE)
    w, ids = route_topk_triton(scores, bias, k, n_group, topk_group, norm, 2.5)
    w_ref, ids_ref = route_topk_ref(scores, bias, k, n_group, topk_group, norm, 2.5)
    assert ids.dtype == ids_ref.dtype == torch.int64
    assert torch.equal(ids, ids_ref)  # same experts in the same slot order
    torch.testing.assert_close(w, w_ref, rtol=5e-7, atol=0)  # the normalizing sum's order


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_topk_writes_the_recorders_rows(backend):
    """With a route recorder's rows the router's own weights land there and its ids as int32 (the Triton kernel
    stores them itself: no copy kernels); rows past T and other layers stay as they were."""
    from mxroll.model.moe import RouteRecorder
    from mxroll.model.ops import route_topk

    g = torch.Generator().manual_seed(3)
    T, E, k = 5, 64, 6
    scores = torch.randn(T, E, generator=g).sigmoid().to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE)
    rec = RouteRecorder(2, T + 3, k, DEVICE)
    rec.ids.fill_(-7)
    rec.weights.fill_(-1.0)
    w0, ids0 = route_topk(scores, bias, k, 1, 1, True, 2.5, backend)
    w, ids = route_topk(scores, bias, k, 1, 1, True, 2.5, backend, rec.rows(1, T))
    assert torch.equal(w, w0) and torch.equal(ids, ids0) and ids.dtype == torch.int64
    assert torch.equal(rec.weights[1, :T], w0) and torch.equal(rec.ids[1, :T], ids0.to(torch.int32))
    assert (rec.ids[0] == -7).all() and (rec.ids[1, T:] == -7).all() and (rec.weights[1, T:] == -1).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shared,record", [(1, False), (2, True), (3, True)])
def test_route_topk_shared_columns(backend, shared, record):
    """`shared`: S columns after the K routed ones, experts E..E+S-1 with weight 1 (a fused MoE's hosted shared
    experts); the routed columns as without them, and a recorder gets the routed ones only."""
    from mxroll.model.moe import RouteRecorder
    from mxroll.model.ops import route_topk

    g = torch.Generator().manual_seed(shared)
    T, E, k = 6, 64, 6
    scores = torch.randn(T, E, generator=g).sigmoid().to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE)
    w0, ids0 = route_topk(scores, bias, k, 4, 2, True, 2.5, backend)
    rec = RouteRecorder(1, T, k, DEVICE) if record else None
    w, ids = route_topk(scores, bias, k, 4, 2, True, 2.5, backend, rec.rows(0, T) if record else None, shared=shared)
    assert w.shape == ids.shape == (T, k + shared) and w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(w[:, :k], w0) and torch.equal(ids[:, :k], ids0)
    assert torch.equal(ids[:, k:].cpu(), torch.arange(E, E + shared).expand(T, shared))
    assert (w[:, k:] == 1).all()
    if record:
        assert torch.equal(rec.weights[0], w0) and torch.equal(rec.ids[0], ids0.to(torch.int32))


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter has no libdevice expf")
@pytest.mark.parametrize("shape", [(1, 2816), (5, 1408), (3, 100)])
@pytest.mark.parametrize("halves", [False, True])
def test_silu_mul_triton_is_bit_identical(shape, halves):
    """libdevice expf, an IEEE division and torch's two roundings: F.silu(g) * u bit for bit; also on the two
    column halves of one fused gate_up output (row stride 2F), with and without the MXFP8 quantize-dequantize."""
    from mxroll.model.ops import silu_mul, silu_mul_ref

    g = torch.Generator().manual_seed(shape[1])
    T, F_ = shape
    gu = (torch.randn(T, 2 * F_, generator=g) * 3).to(DEVICE, LOW)
    gate, up = gu.split(F_, dim=-1) if halves else (gu[:, :F_].contiguous(), gu[:, F_:].contiguous())
    gate[0, :4] = torch.tensor([0.0, -30.0, 30.0, -0.5])  # zero, saturated tails
    got, ref = silu_mul(gate, up, "triton"), silu_mul_ref(gate, up)
    assert got.dtype == LOW and got.shape == gate.shape and got.is_contiguous() and torch.equal(got, ref)
    if F_ % 32 == 0:
        assert torch.equal(silu_mul(gate, up, "triton", "rceil"), silu_mul(gate, up, "torch", "rceil"))


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter has no libdevice expf")
@pytest.mark.parametrize("E,n_group,topk_group,k", [(64, 1, 1, 6), (256, 8, 4, 8)])
def test_route_topk_triton_sigmoid_is_torchs(E, n_group, topk_group, k):
    """The router kernel's own sigmoid of the logits: the same scores as torch's sigmoid, so the same ids and
    weights bit for bit."""
    from mxroll.model.kernels.triton_router import route_topk_triton

    g = torch.Generator().manual_seed(E + k)
    logits = (torch.randn(257, E, generator=g) * 4).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE)
    w, ids = route_topk_triton(logits, bias, k, n_group, topk_group, True, 2.5, sigmoid=True)
    w0, ids0 = route_topk_triton(logits.sigmoid(), bias, k, n_group, topk_group, True, 2.5)
    assert torch.equal(ids, ids0) and torch.equal(w, w0)


def test_route_topk_torch_sigmoid_flag():
    from mxroll.model.ops import route_topk

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(9, 32, generator=g) * 4).to(DEVICE)
    bias = (torch.randn(32, generator=g) * 0.1).to(DEVICE)
    got = route_topk(logits, bias, 3, 4, 2, False, 2.5, "torch", sigmoid=True)
    ref = route_topk_ref(logits.sigmoid(), bias, 3, 4, 2, False, 2.5)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(route_topk(logits, bias, 3, 4, 2, False, 2.5, "torch")[0], ref[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter has no libdevice expf")
@pytest.mark.parametrize("scale_mode", ["rceil", "floor"])
@pytest.mark.parametrize("shape", [(1, 1408), (7, 2816), (3, 96)])
def test_silu_mul_with_mxfp8_qdq_is_the_two_pass_bits(shape, scale_mode):
    """silu*up with the MXFP8 quantize-dequantize for a w8a8 down projection, in one kernel: the bits of the
    separate activation pass over the torch silu*up, and of the torch reference's fake quantization."""
    from mxroll.model.ops import silu_mul, silu_mul_ref
    from mxroll.precision.kernels.triton_mxfp8_gemm import act_qdq_triton
    from mxroll.precision.qat import fake_quant_mxfp8

    g = torch.Generator().manual_seed(shape[0] * shape[1])
    gate = (torch.randn(*shape, generator=g) * 3).to(DEVICE, LOW)
    up = (torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[1])).to(DEVICE, LOW)  # spread block maxima
    got = silu_mul(gate, up, "triton", scale_mode)
    assert torch.equal(got, act_qdq_triton(silu_mul_ref(gate, up), scale_mode))
    assert torch.equal(got, silu_mul(gate, up, "torch", scale_mode))
    assert torch.equal(got, fake_quant_mxfp8(silu_mul_ref(gate, up), scale_mode))
    assert not torch.equal(got, silu_mul(gate, up, "triton"))  # the quantization is really applied


@pytest.mark.parametrize("T,D,E,n_group,topk_group,k,shared,record", [
    (1, 2048, 64, 1, 1, 6, 2, True), (4, 2048, 64, 1, 1, 6, 0, False), (3, 7168, 256, 8, 4, 8, 1, True),
    (2, 100, 64, 4, 2, 6, 0, True)])
def test_gate_route_is_the_logits_gemm_then_the_router(T, D, E, n_group, topk_group, k, shared, record):
    """The logits GEMV inside the routing launch (one program per expert, the last to arrive routes): the
    router's choices and weights on the fp32 logits of the same operands (the logits' sum order differs: the
    weights to fp32 rounding). On the GPU with the sigmoid; the interpreter has no libdevice expf, so there the
    kernel routes the raw logits."""
    from mxroll.model.kernels.triton_router import gate_route_triton
    from mxroll.model.moe import RouteRecorder

    g = torch.Generator().manual_seed(T * D + E)
    x = torch.randn(T, D, generator=g).to(DEVICE, LOW)
    gate = (torch.randn(E, D, generator=g) * 0.05).to(DEVICE, LOW)
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE)
    sigmoid = DEVICE == "cuda"
    logits = x.float() @ gate.float().T
    w_ref, ids_ref = route_topk_ref(logits.sigmoid() if sigmoid else logits, bias, k, n_group, topk_group, True,
                                    2.5)
    rec = RouteRecorder(1, T, k, DEVICE) if record else None
    for _ in range(2):  # the arrival counter is left at zero for the next launch
        w, ids = gate_route_triton(x, gate, bias, k, n_group, topk_group, True, 2.5,
                                   rec.rows(0, T) if record else None, sigmoid=sigmoid, shared=shared)
        assert w.shape == ids.shape == (T, k + shared) and ids.dtype == torch.int64
        assert torch.equal(ids[:, :k], ids_ref)
        torch.testing.assert_close(w[:, :k], w_ref, rtol=2e-6, atol=0)
        assert torch.equal(ids[:, k:].cpu(), torch.arange(E, E + shared).expand(T, shared)) and (w[:, k:] == 1).all()
        if record:
            assert torch.equal(rec.weights[0], w[:, :k]) and torch.equal(rec.ids[0], ids_ref.to(torch.int32))


@pytest.mark.skipif(DEVICE != "cuda", reason="the Gate's Triton backend runs on CUDA")
@pytest.mark.parametrize("T", [1, 2, 4, 5, 33])
def test_gate_topk_dispatch(T):
    """model.ops.gate_topk "triton": the fused launch up to FUSED_GATE_MAX_TOKENS tokens, cuBLAS logits + the
    routing kernel above; both pick the torch path's experts on these inputs, weights to fp32 rounding."""
    from mxroll.model.kernels.triton_router import FUSED_GATE_MAX_TOKENS
    from mxroll.model.ops import gate_topk

    assert FUSED_GATE_MAX_TOKENS == 1
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 2048, generator=g).to(DEVICE, LOW)
    gate = (torch.randn(64, 2048, generator=g) * 0.05).to(DEVICE, LOW)
    bias = (torch.randn(64, generator=g) * 0.1).to(DEVICE)
    w_t, ids_t = gate_topk(x, gate, bias, 6, 1, 1, True, 2.5, "torch", shared=2)
    w, ids = gate_topk(x, gate, bias, 6, 1, 1, True, 2.5, "triton", shared=2)
    assert torch.equal(ids, ids_t)
    torch.testing.assert_close(w, w_t, rtol=2e-6, atol=0)
