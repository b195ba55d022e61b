"""Triton MLA rope against the torch reference (model.ops.rope_ref): bit-identical, on the strided views
MLA.forward hands it. Runs on a CUDA GPU, or on CPU under TRITON_INTERPRET=1; skipped otherwise."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mxroll import configs
from mxroll.model import ModelConfig
from mxroll.model.kernels import ModelKernels
from mxroll.model.mla import MLA
from mxroll.model.ops import rope, rope_ref
from mxroll.model.rope import Rope
from tests.kernel_device import kernel_device

pytest.importorskip("triton")
DEVICE, LOW = kernel_device()


def tiny_cfg(interleave: bool) -> ModelConfig:
    cfg = ModelConfig.from_file(configs.model_preset_path("tiny"))  # YaRN rope, so cos/sin carry a scale != 1
    return dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, interleave=interleave))


def mla_views(T: int, H: int, P: int, R: int, C: int, dtype: torch.dtype, seed: int):
    """q_pe and k_pe exactly as MLA.forward slices them out of the two projections' outputs."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H * (P + R), generator=g) * 4).to(DEVICE, dtype)
    kv = (torch.randn(T, C + R, generator=g) * 4).to(DEVICE, dtype)
    _, q_pe_THR = q.view(T, H, -1).split([P, R], dim=-1)
    _, k_pe_TR = kv.split([C, R], dim=-1)
    return q_pe_THR, k_pe_TR


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", ["low", torch.float32])
@pytest.mark.parametrize("H,P,R,C", [(3, 16, 8, 32), (16, 128, 64, 512)])  # odd head count; moonlight's shape
def test_rope_triton_is_bit_identical(interleave, T, dtype, H, P, R, C):
    dtype = LOW if dtype == "low" else dtype
    cfg = dataclasses.replace(tiny_cfg(interleave), qk_rope_head_dim=R)
    q_pe, k_pe = mla_views(T, H, P, R, C, dtype, seed=T + R)
    assert q_pe.stride()[1:] == (P + R, 1) and q_pe.storage_offset() == P and k_pe.storage_offset() == C
    pos = torch.tensor([0, 7, 511, 1000, 4093][:T], device=DEVICE)
    cos_sin = Rope(cfg).cos_sin(pos)
    q, k = rope(q_pe, k_pe, cos_sin, interleave, backend="triton")
    q_ref, k_ref = rope_ref(q_pe, k_pe, cos_sin, interleave)
    assert q.dtype == k.dtype == dtype and q.is_contiguous() and k.is_contiguous()
    assert q.shape == (T, H, R) and k.shape == (T, R)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    if T > 1:  # the rotation is not the identity: a later position moves the values
        assert not torch.equal(q[1:], q_pe[1:].contiguous())


class Capture:
    """An attention backend that keeps what MLA hands it and attends to nothing."""

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR):
        self.q_pe, self.k_pe, self.kv = q_pe_THR, k_pe_TR, kv_TC
        return torch.zeros(q_nope_THP.shape[0], mla.n_heads, mla.v_dim, device=q_nope_THP.device)


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_forward_rope_backends_agree(interleave):
    cfg = tiny_cfg(interleave)
    mods = [MLA(cfg, torch.float32, kernels=ModelKernels(rope=r)).to(DEVICE) for r in ("torch", "triton")]
    with torch.no_grad():
        for p in mods[0].parameters():
            p.normal_(generator=torch.Generator(device=DEVICE).manual_seed(p.numel()))
        mods[1].load_state_dict(mods[0].state_dict())
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cos_sin = Rope(cfg).cos_sin(torch.arange(100, 105, device=DEVICE))
    seen = []
    for m in mods:
        seen.append(Capture())
        m(x, cos_sin, seen[-1])
    ref, got = seen
    assert torch.equal(got.q_pe, ref.q_pe) and torch.equal(got.k_pe, ref.k_pe) and torch.equal(got.kv, ref.kv)
