"""The router contract: fp32 logits, bias for selection only, scaling fused once."""
from __future__ import annotations

import pytest
import torch

from mxroll.model import ModelConfig
from mxroll.model.moe import Gate

transformers = pytest.importorskip("transformers")


def make(n_group, topk_group, norm, scale=2.5, E=16, k=4):
    from tests.conftest import BASE
    d = dict(BASE, model_type="deepseek_v3", n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
             topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale, first_k_dense_replace=0,
             q_lora_rank=None, num_hidden_layers=1, eos_token_id=1, n_shared_experts=1)
    return ModelConfig.from_dict(d), d


@pytest.mark.parametrize("n_group, topk_group, norm", [(1, 1, True), (4, 2, True), (4, 2, False), (8, 3, False)])
def test_gate_matches_hf_router(n_group, topk_group, norm):
    cfg, d = make(n_group, topk_group, norm)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k != "model_type"})
    hf_gate = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(hf_cfg)
    gate = Gate(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(16, 64, generator=g) / 8)
        gate.e_score_correction_bias.copy_(0.2 * torch.randn(16, generator=g))
        hf_gate.weight.copy_(gate.weight.float())
        hf_gate.e_score_correction_bias.copy_(gate.e_score_correction_bias)
    x = torch.randn(64, 64, generator=g).bfloat16()
    w, ids = gate(x)
    _, w_ref, ids_ref = hf_gate(x)
    order, order_ref = ids.sort(dim=-1), ids_ref.sort(dim=-1)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), rtol=1e-6, atol=1e-6)
    assert w.dtype == torch.float32


def test_scaling_factor_applied_exactly_once():
    cfg, _ = make(4, 2, True, scale=2.446)
    gate = Gate(cfg, torch.float32)
    torch.nn.init.normal_(gate.weight)
    w, _ = gate(torch.randn(32, 64))
    # normalized weights sum to 1; fused scaling makes it exactly routed_scaling_factor (not 1, not its square)
    assert torch.allclose(w.sum(-1), torch.full((32,), 2.446), atol=1e-5)


def test_bias_steers_selection_but_not_weights():
    cfg, _ = make(1, 1, False, scale=1.0, E=8, k=2)
    gate = Gate(cfg, torch.float32)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(16, 64)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 10.0, 10.0]))
    w, ids = gate(x)
    assert set(ids.flatten().tolist()) == {6, 7}
    scores = torch.sigmoid(x @ gate.weight.T)
    assert torch.allclose(w, scores.gather(1, ids))
