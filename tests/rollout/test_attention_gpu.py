"""On a CUDA GPU: FlashInfer's MLA paged attention against the torch reference backend over the same
paged cache (shuffled pages, rows of varying lengths crossing page boundaries, decode and extend
rows mixed), and CUDA-graph decode against eager decode."""
from __future__ import annotations

import json

import pytest
import torch

from mxroll import configs
from mxroll.model import ModelConfig
from mxroll.model.mla import MLA
from mxroll.rollout.attention import TorchPagedAttention
from mxroll.rollout.kv_cache import PagedLatentCache
from mxroll.rollout.step_inputs import StepInputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
flashinfer = pytest.importorskip("flashinfer") if torch.cuda.is_available() else None


def moonlight_attention_cfg() -> ModelConfig:
    d = json.loads(configs.model_preset_path("moonlight-16b-a3b").read_text())
    return ModelConfig.from_dict(dict(d, num_hidden_layers=2, first_k_dense_replace=2, vocab_size=1024,
                                      bos_token_id=0, eos_token_id=1))


class Row:  # what StepInputs.build reads from a scheduler row
    def __init__(self, tokens, pages, start, length):
        self.seq = type("Seq", (), {"tokens": tokens, "pages": pages})()
        self.start, self.length, self.num_samples = start, length, 1


def paged_case(page_size, shapes, seed):
    """An MLA layer, a shuffled paged cache and one step of rows (cached length, new tokens) with its inputs."""
    cfg = moonlight_attention_cfg()
    torch.manual_seed(seed)
    mla = MLA(cfg, torch.bfloat16, layer=1).cuda()
    with torch.no_grad():
        for p in mla.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) / p.shape[-1] ** 0.5)
    n_pages = sum(-(-(c + n) // page_size) for c, n in shapes) + 8
    cache = PagedLatentCache(cfg, n_pages, page_size, torch.bfloat16, torch.device("cuda"))
    cache.ckv_LPGC.normal_()
    cache.kpe_LPGR.normal_()
    perm = torch.randperm(n_pages - 1).tolist()  # shuffled, non-contiguous pages
    rows, used = [], 0
    for cached, new in shapes:
        k = -(-(cached + new) // page_size)
        rows.append(Row(list(range(cached + new)), perm[used:used + k], cached, new))
        used += k
    step = StepInputs.build(rows, page_size, torch.device("cuda"))
    T, H = step.num_tokens, cfg.num_attention_heads
    q_nope = torch.randn(T, H, cfg.qk_nope_head_dim, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(T, H, cfg.qk_rope_head_dim, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(T, cfg.kv_lora_rank, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(T, cfg.qk_rope_head_dim, device="cuda", dtype=torch.bfloat16)
    return cfg, mla, cache, step, (q_nope, q_pe, kv, k_pe)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_flashinfer_mla_matches_torch_reference(page_size):
    from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention

    # (cached length before this step, new tokens): decode rows, extend chunks, page boundaries
    shapes = [(0, 1), (5, 1), (page_size - 1, 1), (page_size, 1), (63, 2), (130, 37), (0, 70), (300, 1), (1000, 16)]
    cfg, mla, cache, step, (q_nope, q_pe, kv, k_pe) = paged_case(page_size, shapes, page_size)
    H = cfg.num_attention_heads
    ref_attn = TorchPagedAttention(cache)
    ref_attn.begin(step)
    with torch.inference_mode():
        ref = ref_attn.forward(mla, q_nope, q_pe, kv, k_pe)
        fi = FlashInferAttention(cache, H, cfg.softmax_scale, max_pages_per_seq=64)
        fi.begin(step)
        got = fi.forward(mla, q_nope, q_pe, kv, k_pe).float()
        # the kernel reads q_lat through its strides: the same bits as from a contiguous copy of it
        ckv, kpe = cache.layer(mla.layer)
        o_lat = fi.wrapper.run(mla.absorb(q_nope).contiguous(), q_pe.contiguous(), ckv, kpe)
        assert torch.equal(got, mla.unabsorb(o_lat).float())
    err = ((got - ref).norm() / ref.norm()).item()
    worst = (got - ref).abs().max().item()
    print(f"page_size={page_size}: rel err {err:.2e}, max abs {worst:.3e}")
    assert err < 1e-2, err  # bf16 q/latent and bf16 probabilities in the kernel vs fp32 reference


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_decode_matches_torch_reference(page_size):
    """Decode rows through the FlashInfer backend with Triton decode on: eagerly and through a graph's fixed
    buffers (what a captured graph reads), against the torch reference; prefill steps still use FlashInfer."""
    from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention

    shapes = [(0, 1), (5, 1), (page_size - 1, 1), (page_size, 1), (300, 1), (1500, 1), (63, 1)]
    cfg, mla, cache, step, (q_nope, q_pe, kv, k_pe) = paged_case(page_size, shapes, 3 + page_size)
    H = cfg.num_attention_heads
    assert step.is_decode
    ref_attn = TorchPagedAttention(cache)
    ref_attn.begin(step)
    with torch.inference_mode():
        ref = ref_attn.forward(mla, q_nope, q_pe, kv, k_pe)
        attn = FlashInferAttention(cache, H, cfg.softmax_scale, max_pages_per_seq=1600 // page_size + 2,
                                   triton_decode_rows=64)
        attn.begin(step)
        assert attn.triton is not None and attn.triton[1] > 1
        eager = attn.forward(mla, q_nope, q_pe, kv, k_pe).float()
        graph = attn.graph_wrapper(len(shapes))
        attn.begin(step, graph)
        assert attn.triton[0] is graph.buffers and "Triton" in attn.plan_paths[len(shapes)]
        buffered = attn.forward(mla, q_nope, q_pe, kv, k_pe).float()
        fi = FlashInferAttention(cache, H, cfg.softmax_scale, max_pages_per_seq=1600 // page_size + 2)
        fi.begin(step)
        flash = fi.forward(mla, q_nope, q_pe, kv, k_pe).float()
    assert torch.equal(eager, buffered)
    err = ((eager - ref).norm() / ref.norm()).item()
    fi_err = ((flash - ref).norm() / ref.norm()).item()
    print(f"page_size={page_size}: Triton rel err {err:.2e}, FlashInfer {fi_err:.2e}")
    assert err < 1e-2 and err < 2 * fi_err + 1e-3, (err, fi_err)


def test_small_decode_rope_in_the_latent_store_gives_the_separate_bits(monkeypatch):
    """MLA.forward over a small decode batch on the Triton kernels: with the rope fused into the latent store +
    absorb launch (`fuses_rope`), the output and the cache are the bits of the separate rope kernel's path."""
    from mxroll.model.kernels import ModelKernels
    from mxroll.rollout.attention import flashinfer_mla
    from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention

    shapes = [(0, 1), (5, 1), (15, 1), (16, 1), (300, 1), (63, 1)]
    cfg, ref_mla, cache, step, _ = paged_case(16, shapes, 11)
    kernels = ModelKernels(norm="triton", rope="triton", latent="triton")
    mla = MLA(cfg, torch.bfloat16, layer=1, kernels=kernels).cuda()
    mla.load_state_dict(ref_mla.state_dict())
    T, H = step.num_tokens, cfg.num_attention_heads
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    cos_sin = mla_rope(cfg, torch.tensor([c for c, _ in shapes], device="cuda"))
    outs = []
    for fused in (True, False):
        monkeypatch.setattr(flashinfer_mla, "FUSED_SMALL_DECODE_ROPE", fused)
        cache.ckv_LPGC.zero_()
        cache.kpe_LPGR.zero_()
        attn = FlashInferAttention(cache, H, cfg.softmax_scale, max_pages_per_seq=32, triton_decode_rows=64)
        attn.begin(step)
        assert attn.fuses_rope() == fused
        with torch.inference_mode():
            outs.append((mla(x, cos_sin, attn), cache.ckv_LPGC.clone(), cache.kpe_LPGR.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][2].abs().sum() > 0  # the rope keys were stored


def mla_rope(cfg: ModelConfig, pos_T: torch.Tensor):
    from mxroll.model.rope import Rope
    return Rope(cfg).cos_sin(pos_T)
