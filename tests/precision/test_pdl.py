"""Programmatic dependent launch (precision.kernels.pdl): off where it cannot run; on sm90 a chain of the decode
step's small kernels captured in a CUDA graph gives the same bits launched with PDL as launched serially."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from mxroll.precision.kernels import pdl  # noqa: E402


def test_pdl_is_off_on_cpu():
    assert pdl.pdl_args(torch.zeros(1)) == {"PDL": False}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs an sm90+ GPU")
def test_pdl_chain_in_a_graph_matches_serial_launches(monkeypatch):
    from mxroll.model.kernels.triton_norm import add_rmsnorm_triton
    from mxroll.model.kernels.triton_router import route_topk_triton
    from mxroll.precision.kernels.triton_moe import fused_moe_triton

    assert pdl.pdl_args(torch.zeros(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
    g = torch.Generator(device="cuda").manual_seed(0)
    T, D, F, E, K = 3, 256, 128, 8, 2
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, D, generator=g, **bf)
    delta = torch.randn(T, D, generator=g, **bf)
    norm_w = torch.rand(D, generator=g, **bf) + 0.5
    router = torch.randn(E, D, generator=g, device="cuda") * 0.1
    bias = torch.zeros(E, device="cuda")
    w13 = torch.randn(E, 2 * F, D, generator=g, **bf) * 0.05
    w2 = torch.randn(E, D, F, generator=g, **bf) * 0.05

    def chain():
        h, s = add_rmsnorm_triton(x, delta, norm_w, 1e-6)
        weights, ids = route_topk_triton(h.float() @ router.T, bias, K, 1, 1, True, 2.5, sigmoid=True)
        y = fused_moe_triton(h, ids, weights, w13, w2)
        return add_rmsnorm_triton(s, y, norm_w, 1e-6)

    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", enabled)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        outs.append([t.clone() for t in out])
    for serial, launched in zip(*outs):
        assert torch.equal(serial, launched)
