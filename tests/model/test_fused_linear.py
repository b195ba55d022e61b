"""FusedLinear: projections of one input as one GEMM over a stacked buffer the parts' Parameters are views of."""
from __future__ import annotations

import json

import pytest
import torch

from mxroll import configs
from mxroll.model import load_model
from mxroll.model.synthetic import make_checkpoint
from mxroll.model.layers import Linear, fuse_linears
from mxroll.model.trainable import build_trainable_model
from mxroll.precision.layout import LayoutCache


def fused_modules(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "FusedLinear"]


def logits(model, ids):
    return model.sequence_logits(ids, torch.arange(len(ids)), model.new_cache(64))


def views_of_buffer(f) -> bool:
    ok = all(p.weight.data_ptr() == v.data_ptr() for p, v in zip(f.parts, f.weight.split(f.sizes)))
    if f.weight_scale_inv is not None:
        ok &= all(p.weight_scale_inv.data_ptr() == v.data_ptr()
                  for p, v in zip(f.parts, f.weight_scale_inv.split(f.sizes)))
    return ok


@pytest.fixture(scope="module")
def no_qlora_checkpoint(tmp_path_factory):
    cfg = {**json.loads(configs.model_preset_path("tiny").read_text()), "q_lora_rank": None}
    return make_checkpoint(cfg, tmp_path_factory.mktemp("noqlora"), seed=1, dtype="float32", progress=False)


@pytest.mark.parametrize("quantization", [None, "mxfp8"])
@pytest.mark.parametrize("q_lora", [True, False])
def test_fused_projections_follow_the_parts(tiny_checkpoint, no_qlora_checkpoint, quantization, q_lora):
    """q_proj (no q_lora, moonlight) or q_a_proj (deepseek-v3) with kv_a_proj_with_mqa; gate with up."""
    model = load_model(tiny_checkpoint if q_lora else no_qlora_checkpoint, progress=False, quantization=quantization)
    ids = torch.tensor([5, 17, 3, 99, 42, 7])
    before = logits(model, ids)  # not postprocessed yet: the parts run one by one
    names = {name for name, _ in fused_modules(model)}
    layers = model.cfg.num_hidden_layers
    assert {f"layers.{i}.self_attn.fused_qkv_a_proj_with_mqa" for i in range(layers)} <= names
    assert f"layers.{layers - 1}.mlp.shared_experts.gate_up_proj" in names
    assert "layers.0.mlp.gate_up_proj" in names  # the dense layer's MLP
    params = dict(model.named_parameters())
    model.postprocess(LayoutCache())
    assert dict(model.named_parameters()).keys() == params.keys()  # checkpoint names unchanged, no new ones
    for _, f in fused_modules(model):
        assert views_of_buffer(f) and f.weight.shape[0] == sum(f.sizes)
        assert (f.weight_scale_inv is not None) == (quantization == "mxfp8")
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    # an in-place write into a part (a weight update) is what the fused GEMM reads; postprocess keeps the buffer
    attn = model.layers[1].self_attn
    f = attn.fused_qkv_a_proj_with_mqa
    assert f.parts[0] is (attn.q_a_proj if q_lora else attn.q_proj)
    buf = f.weight.data_ptr()
    kv_a = attn.kv_a_proj_with_mqa
    new = torch.roll(kv_a.weight.detach(), 1, dims=0).clone()
    with torch.no_grad():
        kv_a.weight.copy_(new)
    model.postprocess(LayoutCache())
    assert f.weight.data_ptr() == buf and torch.equal(f.weight[-kv_a.out_features:], new)
    x = torch.randn(3, kv_a.in_features)
    q, kv = f(x)
    assert torch.equal(kv, kv_a(x))


def test_weights_moved_away_and_back_are_stacked_again(tiny_checkpoint):
    """release/resume_memory_occupation move each Parameter on its own: the next postprocess stacks them again."""
    model = load_model(tiny_checkpoint, progress=False)
    model.postprocess(LayoutCache())
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    ref = logits(model, ids)
    model.drop_derived()
    for p in model.parameters():
        p.data = p.data.clone()  # each part on storage of its own, as after a move to host and back
    f = model.layers[0].self_attn.fused_qkv_a_proj_with_mqa
    assert f.weight is None
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)  # parts one by one meanwhile
    model.postprocess(LayoutCache())
    assert views_of_buffer(f)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=0)


def test_parts_that_cannot_share_a_gemm_stay_apart(tiny_checkpoint):
    a, b = Linear(64, 32, torch.float32), Linear(64, 16, torch.float32)
    assert fuse_linears([a, b]) is not None
    assert fuse_linears([Linear(64, 32, torch.float32), Linear(64, 16, torch.bfloat16)]) is None  # storage
    assert fuse_linears([Linear(64, 32, torch.float32), Linear(48, 16, torch.float32)]) is None  # inputs
    trainer = build_trainable_model(tiny_checkpoint)  # fake-quantized masters keep their own GEMMs
    assert not fused_modules(trainer)


@pytest.fixture(scope="module")
def two_shared_checkpoint(tmp_path_factory):
    cfg = {**json.loads(configs.model_preset_path("tiny").read_text()), "n_shared_experts": 2}
    return make_checkpoint(cfg, tmp_path_factory.mktemp("shared2"), seed=2, dtype="float32", progress=False)


@pytest.mark.parametrize("quantization", [None, "mxfp8"])
def test_shared_experts_hosted_as_extra_experts(two_shared_checkpoint, quantization):
    """Shared-experts fusion (the Triton MoE's; here through the reference experts on CPU): the same logits, the
    routed Parameters views of the stacked buffers, the shared copy refreshed by postprocess after an update."""
    model = load_model(two_shared_checkpoint, progress=False, quantization=quantization)
    moes = [b.mlp for b in model.layers if hasattr(b.mlp, "experts")]
    assert moes and all(m.experts.hosted is None for m in moes)  # the reference GEMM backend: not by default
    model.postprocess(LayoutCache())
    ids = torch.tensor([3, 141, 59, 26, 5, 35, 8, 97])
    ref = logits(model, ids)
    for m in moes:
        assert m.experts.can_host(m.shared_experts)
        m.experts.host_shared(m.shared_experts)
        m.shared_fusion_max_tokens = 1 << 20
    model.postprocess(LayoutCache())
    ex = moes[-1].experts
    assert ex.S == 2 and ex.w13_all.shape[0] == ex.E + 2 and ex.w13_weight.data_ptr() == ex.w13_all.data_ptr()
    assert (ex.w13_scale_all is not None) == (quantization == "mxfp8") and ex.shared_nbytes > 0
    gate = moes[-1].shared_experts.gate_proj.weight
    assert torch.equal(ex.w13_all[ex.E + 1, :ex.F].view(torch.uint8), gate[ex.F:].view(torch.uint8))
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    # a routed and a shared weight updated in place: the stacked buffers follow
    shared_up = moes[-1].shared_experts.up_proj.weight
    with torch.no_grad():
        ex.w2_weight[1].view(torch.uint8).zero_()
        raw = shared_up.detach().view(torch.uint8)  # bytes: fp8 has no roll
        raw.copy_(torch.roll(raw.clone(), 1, dims=0))
    model.postprocess(LayoutCache())
    assert not ex.w2_all[1].view(torch.uint8).any()
    assert torch.equal(ex.w13_all[ex.E, ex.F:].view(torch.uint8), shared_up[:ex.F].view(torch.uint8))
    for m in moes:
        m.shared_fusion_max_tokens = 0
    unfused = logits(model, ids)
    for m in moes:
        m.shared_fusion_max_tokens = 1 << 20
    torch.testing.assert_close(logits(model, ids), unfused, rtol=1e-4, atol=1e-4)
    model.drop_derived()
    assert ex.w13_all is None and torch.equal(logits(model, ids), unfused)  # back to the MLP until postprocess
