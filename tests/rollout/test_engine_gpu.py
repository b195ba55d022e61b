"""Engine on a CUDA GPU: MXFP8 weights through the Triton backend agree with the torch reference."""
from __future__ import annotations

import json

import pytest
import torch

from mxroll import configs
from mxroll.model.dummy import pin_routing
from mxroll.model.layers import FusedLinear, Linear
from mxroll.model.loader import iter_checkpoint
from mxroll.model.synthetic import make_checkpoint
from mxroll.precision import MXFP8Tensor
from mxroll.rollout import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="needs an sm90 GPU")


def test_triton_engine_matches_torch_reference(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = make_checkpoint(cfg, tmp_path / "tiny8", seed=0, mxfp8=True, progress=False)
    # the Triton GEMM backend against the torch reference: with the shared experts in their own GEMMs, as the
    # reference runs them (their fusion into the MoE kernel rounds differently, which MXFP8 w8a8 amplifies through
    # this random model's layers to 2.8e-2; test_shared_fusion_gpu.py checks it layer by layer)
    fast = Engine(model_path=str(path), device="cuda", progress=False, max_total_tokens=4096,
                  disable_shared_experts_fusion=True)
    ref = Engine(model_path=str(path), device="cuda", progress=False, gemm_backend="torch", max_total_tokens=4096)
    assert fast.get_model_info()["gemm_backend"] == "triton" and fast.get_model_info()["dtype"] == "bfloat16"
    ids = torch.arange(3, 60, device="cuda")  # tiny model (latent 32): torch attention on both
    a = fast.model.sequence_logits(ids, torch.arange(len(ids), device="cuda"), fast.model.new_cache(64))
    b = ref.model.sequence_logits(ids, torch.arange(len(ids), device="cuda"), ref.model.new_cache(64))
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    out = fast.generate(prompt="hello", sampling_params={"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
                        return_logprob=True)
    assert out["meta_info"]["completion_tokens"] == 16
    fast.shutdown()
    ref.shutdown()


def test_dense_bf16_copies_follow_updates_and_memory_release(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = make_checkpoint(cfg, tmp_path / "tiny8", seed=0, mxfp8=True, progress=False)
    e = Engine(model_path=str(path), device="cuda", progress=False, max_total_tokens=4096)
    lin = [m for m in e.model.modules() if getattr(m, "weight_bf16", None) is not None]
    fused = [m for m in lin if isinstance(m, FusedLinear)]
    # every MXFP8 projection is served by a copy: its own, or the one of the GEMM it is fused into
    parts = {id(p) for f in fused for p in f.parts}
    mx = [m for m in e.model.modules() if isinstance(m, Linear) and m.weight_scale_inv is not None]
    assert fused and all((m in lin) != (id(m) in parts) for m in mx)
    assert e.get_model_info()["mxfp8_dense_bf16_copies"] == len(lin)
    assert all(torch.equal(m.weight_bf16, m.qweight.dequantize(torch.bfloat16)) for m in lin)
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    before = e.generate(prompt="hello", sampling_params=params)["output_ids"]
    e.release_memory_occupation(tags=["weights"])
    assert all(m.weight_bf16 is None for m in lin)
    e.resume_memory_occupation(tags=["weights"])
    assert all(torch.equal(m.weight_bf16, m.qweight.dequantize(torch.bfloat16)) for m in lin)
    assert e.generate(prompt="hello", sampling_params=params)["output_ids"] == before
    # a weight update (rows of one MXFP8 projection reversed) rebuilds the copies in place
    state = dict(iter_checkpoint(path, progress=False))
    name = next(n[:-len(".weight")] for n in state if n.endswith("layers.0.self_attn.o_proj.weight"))
    target = dict(e.model.named_modules())[name.removeprefix("model.")]
    ptr = target.weight_bf16.data_ptr()
    # ... and so does one of the projections fused with q_a_proj (the stacked copy, at its address)
    kv_a = next(n[:-len(".weight")] for n in state if n.endswith("layers.0.self_attn.kv_a_proj_with_mqa.weight"))
    f = e.model.layers[0].self_attn.fused_qkv_a_proj_with_mqa
    fptr = f.weight_bf16.data_ptr()
    e.update_weights_from_tensor([(n + s, torch.flip(state[n + s], dims=[0])) for n in (name, kv_a)
                                  for s in (".weight", ".weight_scale_inv")])
    assert f.weight_bf16.data_ptr() == fptr and torch.equal(f.weight_bf16, f.qweight.dequantize(torch.bfloat16))
    assert torch.equal(f.weight_bf16[-f.sizes[1]:].cpu(), torch.flip(MXFP8Tensor(
        state[kv_a + ".weight"], state[kv_a + ".weight_scale_inv"]).dequantize(torch.bfloat16), dims=[0]))
    assert target.weight_bf16.data_ptr() == ptr
    assert torch.equal(target.weight_bf16, target.qweight.dequantize(torch.bfloat16))
    assert torch.equal(target.weight_bf16.cpu(), torch.flip(MXFP8Tensor(state[name + ".weight"], state[
        name + ".weight_scale_inv"]).dequantize(torch.bfloat16), dims=[0]))
    e.shutdown()
    off = Engine(model_path=str(path), device="cuda", progress=False, max_total_tokens=4096,
                 mxfp8_dense_bf16_copy=False)
    assert off.get_model_info()["mxfp8_dense_bf16_copies"] == 0
    assert all(getattr(m, "weight_bf16", None) is None for m in off.model.modules())
    off.shutdown()


def small_moonlight(tmp_path, layers: int = 3):
    """Moonlight's widths (FlashInfer MLA dims 512/64, 16 heads, 64 experts top-6) at a few layers."""
    d = json.loads(configs.model_preset_path("moonlight-16b-a3b").read_text())
    d.update(num_hidden_layers=layers, vocab_size=4096, bos_token_id=0, eos_token_id=1)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return str(tmp_path)


W8A8_DRIFT = ("measured on an H100 (2026-11-25): with MXFP8 w8a8 the fast path's bf16 accumulation order flips "
              "activation scales/roundings against the torch reference; 0/4 greedy sequences equal and 0.31 max "
              "logprob difference on equal tokens. Exact agreement needs the planned deterministic mode (DESIGN.md).")


@pytest.mark.parametrize("quantization", [None, pytest.param("mxfp8", marks=pytest.mark.xfail(reason=W8A8_DRIFT))])
def test_fast_engine_matches_reference_engine(tmp_path, quantization):
    """FlashInfer attention + CUDA graphs + Triton GEMMs vs the torch reference path, same weights."""
    path = small_moonlight(tmp_path / "m")
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, quantization=quantization,
                  max_total_tokens=1 << 15)
    fast = Engine(**common)
    info = fast.get_model_info()
    assert info["attention_backend"] == "flashinfer" and fast.runner.graphs is not None
    ref = Engine(**common, attention_backend="torch", gemm_backend="torch", disable_cuda_graph=True,
                 norm_backend="torch", router_backend="torch", rope_backend="torch")
    assert all(b.mlp.experts.hosted is not None for b in fast.model.layers[1:])  # shared experts in the fused MoE
    assert all(b.mlp.experts.hosted is None for b in ref.model.layers[1:])
    for e in (fast, ref):  # random-weight MoE routes near ties everywhere: pin the routes so that the
        pin_routing(e.model)  # comparison measures the kernels, not chaotic expert flips
    prompts = [torch.randint(2, 4096, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 33, 64)]
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    a = fast.generate(input_ids=prompts, sampling_params=greedy, return_logprob=True)
    b = ref.generate(input_ids=prompts, sampling_params=greedy, return_logprob=True, top_logprobs_num=2)
    # Compare while both sequences share their context (up to the first differing token): logprobs agree
    # within bf16 noise, and a differing greedy token is a near-tie of the reference (its top-2 within noise).
    diffs, ties, equal = [], [], 0
    for x, y in zip(a, b):
        xs, ys = x["output_ids"], y["output_ids"]
        first = next((i for i, (s_, t_) in enumerate(zip(xs, ys)) if s_ != t_), len(xs))
        equal += first == len(xs)
        lx, ly = x["meta_info"]["output_token_logprobs"], y["meta_info"]["output_token_logprobs"]
        diffs += [abs(lx[i][0] - ly[i][0]) for i in range(first)]
        if first < len(xs):
            top = y["meta_info"]["output_top_logprobs"][first]
            ties.append((xs[first] in [t[1] for t in top], top[0][0] - top[1][0]))
    print(f"{quantization}: {equal}/4 greedy sequences equal, max |logprob diff| while the context is shared "
          f"{max(diffs):.3e} over {len(diffs)} tokens; divergences (fast token in ref top-2, ref top-2 gap): {ties}")
    # bf16 noise: against an fp32 reference of the same weights this 3-layer model's bf16 fast path is off by
    # 1.4e-2..1.5e-2 mean / 0.06..0.11 max |logprob| per token, with or without the shared experts fused into
    # the MoE kernel alike (benchmarks/results/fusion_accuracy.json, H200 2026-12-01)
    assert max(diffs) < 0.08
    assert all(in_top2 and gap < 0.1 for in_top2, gap in ties), "a differing greedy token must be a near-tie"
    # the same request alone and inside a batch of 64 (graph sizes differ): report, and equal tokens expected
    alone = fast.generate(input_ids=prompts[1], sampling_params=greedy)["output_ids"]
    crowd = fast.generate(input_ids=[prompts[1]] + ([p[::-1] for p in prompts] * 16)[:63], sampling_params=greedy)
    print("alone vs in a batch of 64: equal" if crowd[0]["output_ids"] == alone else "alone vs batch differ")
    fast.shutdown()
    ref.shutdown()


@pytest.mark.parametrize("quantization", [None, "mxfp8"])
def test_shared_experts_fusion_switch(tmp_path, quantization):
    """disable_shared_experts_fusion keeps the shared MLP's own GEMMs; both ways give the same first-token
    logprobs within bf16 noise (the fused kernel sums the shared output in fp32 with the routed ones)."""
    path = small_moonlight(tmp_path / "m", layers=2)
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, quantization=quantization,
                  max_total_tokens=1 << 14)
    prompts = [torch.randint(2, 4096, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 40)]
    one = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    outs = []
    for disable in (False, True):
        e = Engine(**common, disable_shared_experts_fusion=disable)
        hosted = e.model.layers[1].mlp.experts.hosted
        assert (hosted is None) == disable
        pin_routing(e.model)
        outs.append(e.generate(input_ids=prompts, sampling_params=one, return_logprob=True))
        e.shutdown()
    pairs = [(x["meta_info"]["output_token_logprobs"][0], y["meta_info"]["output_token_logprobs"][0])
             for x, y in zip(*outs)]
    assert any(lx[1] == ly[1] for lx, ly in pairs), pairs
    assert all(abs(lx[0] - ly[0]) < 0.05 for lx, ly in pairs if lx[1] == ly[1]), pairs


def test_moe_prefill_dequant_switch(tmp_path):
    """MXFP8 experts: a prefill chunk of >= 512 rows an expert dequantizes them once into a workspace the layers
    share (dropped and made again with the weights' memory); the first-token logprobs match the MXFP8 tiles'
    (disable_moe_prefill_dequant) within bf16 noise."""
    path = small_moonlight(tmp_path / "m", layers=2)
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, quantization="mxfp8",
                  max_total_tokens=1 << 14)
    # two prompts in one 8192-token chunk: 5600 tokens, 525 rows an expert (64 experts, top-6)
    prompts = [torch.randint(2, 4096, (2800,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 2)]
    one = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    outs = []
    for disable in (False, True):
        e = Engine(**common, disable_moe_prefill_dequant=disable)
        experts = e.model.layers[1].mlp.experts
        assert (experts.workspace is None) == disable
        assert e.get_model_info()["moe_dequant_workspace_bytes"] == (0 if disable else 2 * experts.workspace_numel)
        if not disable:
            assert experts.workspace.numel() == experts.workspace_numel
            e.release_memory_occupation(["weights"])
            assert experts.workspace is None
            e.resume_memory_occupation(["weights"])
            assert experts.workspace is not None
        pin_routing(e.model)
        outs.append(e.generate(input_ids=prompts, sampling_params=one, return_logprob=True))
        e.shutdown()
    pairs = [(x["meta_info"]["output_token_logprobs"][0], y["meta_info"]["output_token_logprobs"][0])
             for x, y in zip(*outs)]
    print("dequant-once vs MXFP8 tiles, first tokens:", pairs)
    assert any(lx[1] == ly[1] for lx, ly in pairs), pairs
    assert all(abs(lx[0] - ly[0]) < 0.05 for lx, ly in pairs if lx[1] == ly[1]), pairs


def test_decode_graphs_captured_at_start_or_on_first_use(tmp_path):
    """By default every decode graph size is captured at start-up (and again when the KV cache comes back);
    cuda_graph_lazy_capture leaves each to the first step of its size. Both decode the same greedy tokens."""
    path = small_moonlight(tmp_path / "m", layers=2)
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, max_total_tokens=1 << 14,
                  max_running_requests=16)
    start = Engine(**common)
    lazy = Engine(**common, cuda_graph_lazy_capture=True)
    sizes = start.runner.graphs.sizes
    assert sizes == [1, 2, 4, 8, 16] and sorted(start.runner.graphs.graphs) == sizes
    assert lazy.runner.graphs.sizes == sizes and not lazy.runner.graphs.graphs
    prompts = [torch.randint(2, 4096, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 30)]
    greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    a = [o["output_ids"] for o in start.generate(input_ids=prompts, sampling_params=greedy)]
    assert [o["output_ids"] for o in lazy.generate(input_ids=prompts, sampling_params=greedy)] == a
    captured = set(lazy.runner.graphs.graphs)  # the sizes its steps used: three rows pad to 4
    assert 4 in captured and captured < set(sizes), captured
    start.release_memory_occupation(["kv_cache"])
    assert start.runner.graphs is None
    start.resume_memory_occupation(["kv_cache"])
    assert sorted(start.runner.graphs.graphs) == sizes
    assert [o["output_ids"] for o in start.generate(input_ids=prompts, sampling_params=greedy)] == a
    start.shutdown()
    lazy.shutdown()


def test_moe_bf16_copies_follow_updates_and_memory_release(tmp_path):
    """mxfp8_moe_bf16_copy: every MXFP8 expert stack keeps exact bf16 copies (refilled at the same addresses by a
    weight update, dropped and rebuilt with the weights' memory; no dequantize-once workspace then); a prefill chunk
    of 64+ rows an expert runs on them and gives the bits of the engine that dequantizes into its workspace."""
    path = small_moonlight(tmp_path / "m", layers=2)
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, quantization="mxfp8",
                  max_total_tokens=1 << 14)
    e = Engine(**common, mxfp8_moe_bf16_copy=True)
    stacks = [m for m in e.model.modules() if getattr(m, "bf16_copy", None) is not None]

    def exact(m):
        return all(torch.equal(c, MXFP8Tensor(getattr(m, n), getattr(m, n + "_scale_inv")).dequantize(torch.bfloat16))
                   for c, n in zip(m.bf16_copy, ("w13_weight", "w2_weight")))

    assert stacks and all(exact(m) and m.workspace is None for m in stacks)
    info = e.get_model_info()
    assert info["moe_bf16_copy_bytes"] == sum(2 * m.workspace_numel for m in stacks)
    assert info["moe_dequant_workspace_bytes"] == 0
    prompts = [torch.randint(2, 4096, (2800,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 2)]
    params = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
    ref = Engine(**common)  # MXFP8 tiles, and one dequantize-once workspace for the 5600-token chunk
    assert ref.get_model_info()["moe_bf16_copy_bytes"] == 0 and ref.get_model_info()["moe_dequant_workspace_bytes"]
    a = e.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    b = ref.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    assert [x["meta_info"]["output_token_logprobs"] for x in a] == [x["meta_info"]["output_token_logprobs"] for x in b]
    ref.shutdown()
    # a weight update (expert 5's gate rows reversed) refills the copy in place
    m = stacks[0]
    layer = next(i for i, b in enumerate(e.model.layers) if getattr(b.mlp, "experts", None) is m)
    F_ = m.F
    name = f"model.layers.{layer}.mlp.experts.5.gate_proj.weight"
    w = m.w13_weight[5, :F_].view(torch.uint8).flip(0).view(torch.float8_e4m3fn).clone()
    s = m.w13_weight_scale_inv[5, :F_].flip(0).clone()
    ptrs = [c.data_ptr() for c in m.bf16_copy]
    e.update_weights_from_tensor([(name, w), (name + "_scale_inv", s)])
    assert [c.data_ptr() for c in m.bf16_copy] == ptrs and exact(m)
    assert torch.equal(m.bf16_copy[0][5, :F_], MXFP8Tensor(w, s).dequantize(torch.bfloat16))
    e.release_memory_occupation(tags=["weights"])
    assert all(m.bf16_copy is None for m in stacks)
    e.resume_memory_occupation(tags=["weights"])
    assert all(m.bf16_copy is not None and exact(m) and m.workspace is None for m in stacks)
    e.shutdown()


def test_moe_bf16_copies_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    """When the copies would not fit in free device memory, attaching them raises an error naming the option and
    the sizes, attaches nothing, and the engine serves on its MXFP8 tiles as before."""
    from mxroll.model.moe import attach_bf16_copies
    e = Engine(model_path=small_moonlight(tmp_path / "m", layers=2), load_format="dummy", device="cuda",
               progress=False, quantization="mxfp8", max_total_tokens=1 << 12)
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    before = e.generate(input_ids=[[5, 6, 7, 8]], sampling_params=params)[0]["output_ids"]
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (256 << 20, total))
    with pytest.raises(ValueError, match=r"mxfp8_moe_bf16_copy: bf16 copies of 1 MXFP8 expert stacks need 1\.0\d GiB; "
                                         r"0\.25 GiB of device memory is free"):
        attach_bf16_copies(e.model, True)
    monkeypatch.undo()
    assert all(getattr(m, "bf16_copy", None) is None for m in e.model.modules())
    assert e.generate(input_ids=[[5, 6, 7, 8]], sampling_params=params)[0]["output_ids"] == before
    e.shutdown()


def test_prefix_cache_on_flashinfer_matches_a_fresh_prefill(tmp_path):
    """enable_prefix_caching with FlashInfer MLA and CUDA graphs: a second turn starts after the first turn's cached
    pages and agrees with an engine that prefills it all (bf16 noise; a differing greedy token is reported)."""
    path = small_moonlight(tmp_path / "m")
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, max_total_tokens=1 << 14)
    cached, fresh = Engine(**common, enable_prefix_caching=True), Engine(**common)
    for e in (cached, fresh):
        pin_routing(e.model)
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    turn1 = torch.randint(2, 4096, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    first = cached.generate(input_ids=turn1, sampling_params=greedy)
    turn2 = turn1 + first["output_ids"] + [5, 6, 7]
    a = cached.generate(input_ids=turn2, sampling_params=greedy, return_logprob=True)
    b = fresh.generate(input_ids=turn2, sampling_params=greedy, return_logprob=True)
    assert a["meta_info"]["cached_tokens"] == (70 + 15) // 16 * 16 and b["meta_info"]["cached_tokens"] == 0
    xs, ys = a["output_ids"], b["output_ids"]
    first_diff = next((i for i, (s_, t_) in enumerate(zip(xs, ys)) if s_ != t_), len(xs))
    lx, ly = a["meta_info"]["output_token_logprobs"], b["meta_info"]["output_token_logprobs"]
    diff = max(abs(lx[i][0] - ly[i][0]) for i in range(max(first_diff, 1)))
    print(f"prefix cache: {first_diff}/{len(xs)} greedy tokens equal, max |logprob diff| {diff:.3e}")
    assert diff < 0.08
    cached.shutdown()
    fresh.shutdown()


def test_prompt_token_logprobs_on_the_fast_path(tmp_path):
    """logprob_start_len=0 on FlashInfer + Triton GEMMs (a chunked prompt, the scoring step eager) against the torch
    reference engine: bf16 noise."""
    path = small_moonlight(tmp_path / "m")
    common = dict(model_path=path, load_format="dummy", device="cuda", progress=False, max_total_tokens=1 << 14,
                  chunked_prefill_size=64)
    fast = Engine(**common)
    ref = Engine(**common, attention_backend="torch", gemm_backend="torch", disable_cuda_graph=True,
                 norm_backend="torch", router_backend="torch", rope_backend="torch")
    for e in (fast, ref):
        pin_routing(e.model)
    prompt = torch.randint(2, 4096, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    a, b = fast.generate(**kw), ref.generate(**kw)
    la = [lp for lp, _, _ in a["meta_info"]["input_token_logprobs"][1:]]
    lb = [lp for lp, _, _ in b["meta_info"]["input_token_logprobs"][1:]]
    assert len(la) == len(lb) == 149
    diff = max(abs(x - y) for x, y in zip(la, lb))
    print(f"prompt-token logprobs, fast vs reference: max |diff| {diff:.3e} over 149 tokens")
    assert diff < 0.08
    fast.shutdown()
    ref.shutdown()
