"""A norm that quantizes its own output for the MXFP8 GEMMs it feeds (input_layernorm -> q / kv_a
projections, post_attention_layernorm -> experts / MLP): when it is chosen, that the plumbing hands each
GEMM the right tensor (one quantize-dequantize shared by q and kv_a; the router keeps the plain normed
output; down projections still quantize their own input), and on a GPU that the layer's numbers equal the
separate path's with the activations equal to precision.mxfp8.quantize of the same normed values."""
from __future__ import annotations

import pytest
import torch

from mxroll.model.config import ModelConfig
from mxroll.model.dummy import init_dummy_weights, pin_routing
from mxroll.model.kernels import ModelKernels
from mxroll.model.layers import RMSNorm, fused_norm_quant
from mxroll.model.loader import build_model
from mxroll.precision import GemmConfig, MXFP8Tensor, Recipe, linear
from mxroll.precision.kernels.mxfp8_gemm import fake_quant
from mxroll.precision.kernels.rmsnorm_mxfp8 import rmsnorm_ref
from mxroll.precision.moe import experts_ref
from tests.conftest import BASE, MXFP8_CONFIG

TRITON = GemmConfig("w8a8", "rceil", "triton")


def cfg() -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **MXFP8_CONFIG, "model_type": "deepseek_v3"})


def model(gemm=TRITON, kernels=ModelKernels("triton", "torch"), recipe=Recipe(), device="meta"):
    m = build_model(cfg(), torch.bfloat16, "mxfp8", recipe, gemm, kernels=kernels)
    return m if device == "meta" else m.to_empty(device=device)


def modes(m) -> list[tuple[str | None, str | None, bool]]:
    return [(b.input_layernorm.qdq_mode, b.post_attention_layernorm.qdq_mode, b.post_attention_layernorm.keep_normed)
            for b in m.layers]


def test_decision_fuses_only_the_triton_w8a8_mxfp8_path():
    # layer 0 dense (MLP: no plain normed output needed), layers 1-2 MoE (the router needs it)
    assert modes(model()) == [("rceil", "rceil", False), ("rceil", "rceil", True), ("rceil", "rceil", True)]
    assert modes(model(recipe=Recipe(scale_mode="floor"), gemm=GemmConfig("w8a8", "floor", "triton")))[1][:2] == (
        "floor", "floor")
    separate = [(None, None, False), (None, None, True), (None, None, True)]
    assert modes(model(gemm=GemmConfig())) == separate  # the torch reference GEMMs
    assert modes(model(kernels=ModelKernels("torch", "torch"))) == separate  # the reference norm
    assert modes(model(kernels=ModelKernels("flashinfer", "torch"))) == separate  # other norm roundings
    assert modes(model(recipe=Recipe("w8a16"), gemm=GemmConfig("w8a16", "rceil", "triton"))) == separate
    # one high-precision consumer keeps its norm plain; the other norm still fuses
    hp = modes(model(recipe=Recipe(high_precision=("kv_b_proj", "kv_a_proj_with_mqa"))))
    assert [h[:2] for h in hp] == [(None, "rceil")] * 3
    hp = modes(model(recipe=Recipe(high_precision=("kv_b_proj", "shared_experts"))))
    assert [h[:2] for h in hp] == [("rceil", "rceil"), ("rceil", None), ("rceil", None)]
    assert fused_norm_quant("triton", []) is None


def test_gemms_on_a_quantize_dequantized_input_equal_w8a8_on_the_raw_one():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 64, generator=g) * 3).to(torch.bfloat16)
    w = MXFP8Tensor.quantize(torch.randn(40, 64, generator=g) * 0.1)
    xq = fake_quant(x, "rceil")
    assert torch.equal(linear(xq, w, GemmConfig(), x_qdq=True), linear(x, w, GemmConfig()))
    assert not torch.equal(linear(x, w, GemmConfig(), x_qdq=True), linear(x, w, GemmConfig()))  # the flag acts
    with pytest.raises(TypeError, match="x_qdq"):
        linear(xq, torch.randn(40, 64).to(torch.bfloat16), x_qdq=True)
    w13 = MXFP8Tensor.quantize(torch.randn(4, 64, 64, generator=g) * 0.1)
    w2 = MXFP8Tensor.quantize(torch.randn(4, 64, 32, generator=g) * 0.1)
    ids = torch.randint(0, 4, (9, 2), generator=g)
    wts = torch.rand(9, 2, generator=g)
    assert torch.equal(experts_ref(xq, ids, wts, w13, w2, GemmConfig(), x_qdq=True),
                       experts_ref(x, ids, wts, w13, w2, GemmConfig()))


def forward_logits(m, ids):
    return m.sequence_logits(ids, torch.arange(len(ids), device=ids.device), m.new_cache(len(ids), mode="naive"))


def record_inputs(m, names):
    seen = {}
    for name in names:
        m.get_submodule(name).register_forward_pre_hook(lambda mod, args, n=name: seen.setdefault(n, args[0]))
    return seen


WATCH = ["layers.1.self_attn.q_a_proj", "layers.1.self_attn.kv_a_proj_with_mqa", "layers.1.mlp.gate",
         "layers.1.mlp.shared_experts.gate_proj", "layers.1.mlp.shared_experts.down_proj"]


def test_block_plumbing_on_cpu(monkeypatch):
    """The fused kernel's job done by torch (norm, then the recipe's quantize-dequantize) on the reference
    GEMMs: logits equal the plain path's, q and kv_a get one shared quantize-dequantized tensor, the router
    the plain normed one."""
    calls = []

    def torch_fused(x, delta, w, eps, scale_mode, normed):
        s = x if delta is None else x + delta
        h = rmsnorm_ref(s, w, eps)
        calls.append(normed)
        return (h if normed else None), fake_quant(h, scale_mode), s

    monkeypatch.setattr("mxroll.model.layers.add_rmsnorm_qdq", torch_fused)
    m = model(gemm=GemmConfig(), kernels=ModelKernels("torch", "torch"), device="cpu")
    init_dummy_weights(m, 0)
    ids = torch.arange(3, 10)
    plain_seen = record_inputs(m, WATCH)
    plain = forward_logits(m, ids)
    for b in m.layers:  # the same weights with the fused path chosen (a test-only switch)
        b.input_layernorm.qdq_mode = b.post_attention_layernorm.qdq_mode = "rceil"
    for h in list(m.modules()):
        h._forward_pre_hooks.clear()
    seen = record_inputs(m, WATCH)
    fused = forward_logits(m, ids)
    assert calls == [False, False, False, True, False, True]
    assert torch.equal(fused, plain)
    q, kv = seen["layers.1.self_attn.q_a_proj"], seen["layers.1.self_attn.kv_a_proj_with_mqa"]
    assert q is kv and torch.equal(q, fake_quant(plain_seen["layers.1.self_attn.q_a_proj"], "rceil"))
    assert torch.equal(seen["layers.1.mlp.gate"], plain_seen["layers.1.mlp.gate"])  # plain normed
    assert torch.equal(seen["layers.1.mlp.shared_experts.gate_proj"],
                       fake_quant(plain_seen["layers.1.mlp.gate"], "rceil"))
    down = "layers.1.mlp.shared_experts.down_proj"  # h: the GEMM quantizes it itself, on both paths
    assert torch.equal(seen[down], plain_seen[down])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Triton MXFP8 GEMM backend runs on sm90")
@pytest.mark.parametrize("T", [3, 40, 300])  # the GEMMs' fused, mid and dequant paths
def test_fused_norm_path_equals_separate_path_on_gpu(T):
    m = model(device="cuda")
    init_dummy_weights(m, 0)
    pin_routing(m)
    ids = torch.randint(3, 290, (T,), device="cuda", generator=torch.Generator("cuda").manual_seed(T))
    seen = record_inputs(m, WATCH)
    fused = forward_logits(m, ids)
    for b in m.layers:  # the same weights on the separate path (Triton norm, GEMMs quantize their input)
        assert isinstance(b.input_layernorm, RMSNorm) and b.input_layernorm.qdq_mode == "rceil"
        b.input_layernorm.qdq_mode = b.post_attention_layernorm.qdq_mode = None
    for h in list(m.modules()):
        h._forward_pre_hooks.clear()
    plain_seen = record_inputs(m, WATCH)
    plain = forward_logits(m, ids)
    assert torch.equal(fused, plain)
    q, kv = seen["layers.1.self_attn.q_a_proj"], seen["layers.1.self_attn.kv_a_proj_with_mqa"]
    h = plain_seen["layers.1.self_attn.q_a_proj"]  # the Triton norm's output, which the GEMMs quantized
    assert q is kv and torch.equal(q, MXFP8Tensor.quantize(h).dequantize(torch.bfloat16))
    assert torch.equal(seen["layers.1.mlp.gate"], plain_seen["layers.1.mlp.gate"])
    assert torch.equal(seen["layers.1.mlp.shared_experts.gate_proj"],
                       MXFP8Tensor.quantize(plain_seen["layers.1.mlp.gate"]).dequantize(torch.bfloat16))
