"""model.ops references and the kernel choice (CPU)."""
from __future__ import annotations

import pytest
import torch

from mxroll.model.kernels import ModelKernels, select_model_kernels
from mxroll.model.ops import add_rmsnorm, rmsnorm, rope, rope_ref, route_topk_ref


def test_add_rmsnorm_reference_is_add_then_norm():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(4, 64, generator=g).bfloat16(), torch.randn(4, 64, generator=g).bfloat16()
    w = torch.rand(64, generator=g).bfloat16()
    h, s = add_rmsnorm(x, d, w, 1e-6)
    assert torch.equal(s, x + d)
    xf = s.float()
    assert torch.equal(h, w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16))
    assert torch.equal(rmsnorm(s, w, 1e-6), h)
    h0, s0 = add_rmsnorm(x, None, w, 1e-6)
    assert s0 is x and torch.equal(h0, rmsnorm(x, w, 1e-6))


def test_route_topk_reference_groups_and_scaling():
    # 2 groups of 4; group scores (top-2 sums with bias): g0 = 0.9 + 0.8, g1 = 0.7 + 0.1 -> only g0 may be chosen
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.1, 0.7, 0.1, 0.05, 0.0]])
    bias = torch.zeros(8)
    w, ids = route_topk_ref(scores, bias, 3, 2, 1, True, 2.0)
    assert ids.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.8, 0.2]]) / 1.9 * 2.0)
    # the bias steers the choice, the weights stay the unbiased scores
    w, ids = route_topk_ref(scores, torch.tensor([0, 0, 0, 5.0, 0, 0, 0, 0]), 1, 1, 1, False, 1.0)
    assert ids.tolist() == [[3]] and w.tolist() == [[pytest.approx(0.1)]]


def test_kernel_choice_on_cpu_and_errors():
    k, why = select_model_kernels(torch.device("cpu"), torch.float32, None, None, None, 64, 1)
    assert k == ModelKernels("torch", "torch", "torch") and "rope: torch" in why
    for i in range(3):
        with pytest.raises(ValueError, match="CUDA"):
            select_model_kernels(torch.device("cpu"), torch.float32, *[None] * i, "triton", *[None] * (2 - i), 64, 1)
    with pytest.raises(ValueError, match="supported"):
        ModelKernels(norm="fast")
    with pytest.raises(ValueError, match="rope kernel"):
        ModelKernels(rope="flashinfer")


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_reference_rotates_pairs(interleave):
    # an independent rotation: pair j of head h is (a, b) -> (a cos - b sin, b cos + a sin), written [firsts | seconds]
    g = torch.Generator().manual_seed(0)
    T, H, R = 3, 2, 8
    q_pe, k_pe = torch.randn(T, H, R, generator=g), torch.randn(T, R, generator=g)
    angle = torch.rand(T, R // 2, generator=g) * 6
    cos, sin = angle.cos(), angle.sin()
    q, k = rope(q_pe, k_pe, (cos, sin), interleave)
    for x, y in ((q_pe, q), (k_pe[:, None], k[:, None])):
        pairs = x.view(T, -1, R // 2, 2) if interleave else x.view(T, -1, 2, R // 2).transpose(-1, -2)
        a, b = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, None], sin[:, None]
        torch.testing.assert_close(y, torch.cat([a * c - b * s, b * c + a * s], dim=-1), rtol=0, atol=1e-6)
    assert torch.equal(q, rope_ref(q_pe, k_pe, (cos, sin), interleave)[0])
