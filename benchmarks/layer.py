"""One moonlight-16b-a3b decoder layer (MLA attention + MoE, layer 1: the first MoE layer) at decode
batch 1, 64, 256: bf16 vs MXFP8 weights, each timed as a CUDA graph replay (CUDA events, L2 flushed
before every replay, median), next to its floor: weight bytes the B tokens touch (uniform routing)
plus the KV bytes attention reads, at 4.3 TB/s.

Variants: "bf16" (bf16 weights: cuBLAS projections, Triton fused MoE), "mxfp8" (the engine's w8a8
path: Triton MXFP8 GEMMs and fused MoE, input/post-attention norms quantizing for their GEMMs) and
"mxfp8_separate" (same weights, plain Triton norms, GEMMs quantize their own activations) and "mxfp8_no_copy"
(same weights without the dense weights' bf16 copies that the engine keeps: mid-M kernel / per-call dequantize).
Parts, each captured in its own graph: "layer" (both norms, attention projections + core, MoE),
"attn" (input norm, projections, FlashInfer MLA over the paged cache, o_proj), "attn_proj" (the same
with the attention core replaced by a cache write and a fixed output: projections alone), "moe"
(post-attention norm, router, routed + shared experts).
Weights: seeded random bf16 made on the GPU (model.dummy), MXFP8 by the recipe's quantization of the
same bf16 weights. Routing: the router runs (its cost counts) but every token's experts are replaced
by a uniform assignment (token t -> experts t*k .. t*k+k-1 mod E), identical for all variants.
Correctness in the same run: each graph's output equals its eager forward; mxfp8 equals
mxfp8_separate bit for bit; fast paths vs the torch reference path (torch GEMMs, norms, router,
reference experts) on the same weights and attention, relative error.

    python benchmarks/layer.py [--batches 1,64,256] [--context 1024] [--out NAME]   (GPU, ~1-2 min)
    python benchmarks/layer.py --cpu                                               (tiny shape, no graphs)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import capture_graph, environment, median_replay, rel_err, write_results  # noqa: E402
from mxroll import configs  # noqa: E402
from mxroll.model import ModelConfig  # noqa: E402
from mxroll.model.dummy import init_dummy_weights  # noqa: E402
from mxroll.model.kernels import ModelKernels, select_model_kernels  # noqa: E402
from mxroll.model.loader import build_model  # noqa: E402
from mxroll.precision import GemmConfig, Recipe  # noqa: E402
from mxroll.precision.layout import LayoutCache  # noqa: E402
from mxroll.rollout.attention import TorchPagedAttention  # noqa: E402
from mxroll.rollout.kv_cache import PagedLatentCache  # noqa: E402
from mxroll.rollout.step_inputs import StepInputs  # noqa: E402

PRESET = "moonlight-16b-a3b"
HBM_BPS = 4.3e12
LAYER = 1  # first MoE layer of the preset (first_k_dense_replace = 1)
PAGE = 64
FLUSH_BYTES = 256 << 20
TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=128,
            qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)


def layer_config(cpu: bool) -> ModelConfig:
    d = json.loads(configs.model_preset_path(PRESET).read_text())
    d.update(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024, bos_token_id=0, eos_token_id=1)
    return ModelConfig.from_dict({**d, **TINY} if cpu else d)


class UniformRoutes(nn.Module):
    """The router runs; its expert ids are replaced by a fixed uniform assignment (weights kept)."""

    def __init__(self, gate: nn.Module, ids_TK: torch.Tensor):
        super().__init__()
        self.gate, self.ids_TK = gate, ids_TK
        self.ids_TKS = None  # with the hosted shared experts' columns (built on the first, warm-up, call)

    def forward(self, x_TD, record=None, shared=0):
        w, ids = self.gate(x_TD, record, shared=shared)
        T, K = x_TD.shape[0], self.ids_TK.shape[1]
        if not shared:
            return w, self.ids_TK[:T]
        if self.ids_TKS is None:
            self.ids_TKS = torch.cat([self.ids_TK, ids[:1, K:].expand(self.ids_TK.shape[0], shared)], dim=1)
        return w, self.ids_TKS[:T]


class NoAttention:
    """Writes the step's latents and returns a fixed output: the projections without the attention core."""
    name = "none"

    def __init__(self, cache: PagedLatentCache, o_THV: torch.Tensor):
        self.cache, self.o_THV, self.step = cache, o_THV, None

    def begin(self, step, graph=None):
        self.step = step

    def graph_wrapper(self, batch_size):
        return None

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR):
        self.cache.write(mla, self.step.slots_T, kv_TC, k_pe_TR)
        return self.o_THV[:q_nope_THP.shape[0]]


class Row:  # what StepInputs.build reads from a scheduler row
    def __init__(self, tokens, pages, start, length):
        self.seq = type("Seq", (), {"tokens": tokens, "pages": pages})()
        self.start, self.length, self.num_samples = start, length, 1


def decode_step(B: int, context: int, device) -> StepInputs:
    """B decode rows, each with `context` - 1 cached tokens; row r owns pages r*P .. r*P + P - 1."""
    P = -(-context // PAGE)
    rows = [Row(list(range(context)), list(range(r * P, (r + 1) * P)), context - 1, 1) for r in range(B)]
    return StepInputs.build(rows, PAGE, torch.device(device))


def build(cfg, mode: str, device, gemm_backend: str, kernels: ModelKernels):
    """As the engine builds it: MXFP8 dense weights on the Triton backend keep their bf16 copies (postprocess)."""
    quant = None if mode == "bf16" else "mxfp8"
    gemm = GemmConfig("w8a8", "rceil", gemm_backend, bf16_copy=gemm_backend == "triton")
    m = build_model(cfg, torch.bfloat16, quant, Recipe(), gemm, kernels=kernels)
    return m.to_empty(device=device).eval()


def weight_bytes(cfg: ModelConfig, B: int, mxfp8: bool) -> dict:
    """Bytes of weights B decode tokens read in one MoE layer (uniform routing: min(E, B*k) experts)."""
    D, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q8 = 1 + 1 / 32 if mxfp8 else 2
    proj = (D * H * cfg.qk_head_dim + D * (C + R) + H * cfg.v_head_dim * D) * q8
    kv_b = C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 2  # always bf16 (recipe)
    touched = min(cfg.n_routed_experts, B * cfg.num_experts_per_tok)
    expert = 3 * D * cfg.moe_intermediate_size * q8
    moe = cfg.n_routed_experts * D * 2 + (touched + cfg.n_shared_experts) * expert
    return {"attn_proj": proj + kv_b, "moe": moe, "experts_touched": touched}


def time_graph_replays(fn, prepare, flush, replays: int) -> tuple[float, torch.Tensor]:
    """(median seconds per replay with L2 flushed before each, the graph's output) of fn captured alone."""
    g, out = capture_graph(fn, prepare)
    t = median_replay(g, replays, flush)
    result = (out[0] if isinstance(out, tuple) else out).clone()
    del g
    return t, result


def time_eager(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def parts(blk, x, delta, cos_sin, attn, proj_attn):
    """name -> closure of one forward; each returns the part's output (and the residual for the layer)."""
    def attn_part(backend):
        def run():
            h, hq, _ = blk.input_layernorm.add_for_gemm(x, delta)
            return blk.self_attn(h if hq is None else hq, cos_sin, backend, hq is not None)
        return run

    def moe():
        h, hq, _ = blk.post_attention_layernorm.add_for_gemm(x, delta)
        return blk.mlp(h, None, hq)

    return {"layer": lambda: blk(x, delta, cos_sin, attn, None)[1], "attn": attn_part(attn),
            "attn_proj": attn_part(proj_attn), "moe": moe}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="tiny shape on the CPU, eager timing, torch attention")
    ap.add_argument("--batches", default=None, help="default 1,64,256 (GPU), 1,4,16 (--cpu)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per row")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default="layer")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cpu = args.cpu or not torch.cuda.is_available()
    device = "cpu" if cpu else "cuda"
    batches = [int(b) for b in (args.batches or ("1,4,16" if cpu else "1,64,256")).split(",")]
    context = min(args.context, 128) if cpu else args.context
    cfg = layer_config(cpu)
    torch.manual_seed(0)
    notes = []
    # the engine's choice of small-op kernels (Triton on CUDA: norm, router, rope, latent cache write, silu*up)
    fast_kernels, kernels_why = select_model_kernels(torch.device(device), torch.bfloat16, None, None, None,
                                                     cfg.n_routed_experts, cfg.n_group or 1)
    notes.append(f"model kernels: {kernels_why}")
    gemm_backend = "torch" if cpu else "triton"
    models = {mode: build(cfg, mode, device, gemm_backend, fast_kernels) for mode in ("bf16", "mxfp8")}
    refs = {mode: build(cfg, mode, device, "torch", ModelKernels("torch", "torch")) for mode in ("bf16", "mxfp8")}
    layouts = LayoutCache()
    for mode, m in models.items():
        init_dummy_weights(m, seed=0)
        m.postprocess(layouts)
        refs[mode].load_state_dict(m.state_dict())
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    ids = (torch.arange(max(batches) * K, device=device) % E).view(-1, K)
    for m in (*models.values(), *refs.values()):
        m.layers[LAYER].mlp.gate = UniformRoutes(m.layers[LAYER].mlp.gate, ids)
    fused = sum(1 for mod in models["mxfp8"].layers[LAYER].modules() if getattr(mod, "qdq_mode", None))
    print(f"{PRESET} layer {LAYER} on {device}: mxfp8 norms quantizing for their GEMMs: {fused}", flush=True)

    P = -(-context // PAGE)
    cache = PagedLatentCache(cfg, max(batches) * P + 1, PAGE, torch.bfloat16, torch.device(device))
    cache.ckv_LPGC.normal_()
    cache.kpe_LPGR.normal_()
    o_fixed = torch.randn(max(batches), cfg.num_attention_heads, cfg.v_head_dim, device=device, dtype=torch.bfloat16)
    proj_attn = NoAttention(cache, o_fixed)
    attn_name = "torch"
    if cpu:
        attn = TorchPagedAttention(cache)
    else:
        try:
            from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention
            attn = FlashInferAttention(cache, cfg.num_attention_heads, cfg.softmax_scale, P + 1)
            attn_name = "flashinfer"
        except Exception as e:  # noqa: BLE001 - no FlashInfer: the attention core is left out, and said so
            attn, attn_name = proj_attn, "none"
            notes.append(f"FlashInfer unavailable ({type(e).__name__}: {e}); 'layer' and 'attn' exclude the "
                         "attention core (cache write + fixed output)")
    flush_buf = None if cpu else torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    ref_attn = attn if attn_name != "none" else proj_attn

    payload = {"benchmark": "layer", "preset": PRESET, "layer": LAYER, "device_kind": device, "context": context,
               "page_size": PAGE, "attention": attn_name, "hbm_Bps_floor": HBM_BPS, "fused_norms_mxfp8": fused,
               "routing": "router runs; ids replaced by token t -> experts t*k..t*k+k-1 mod E (uniform)",
               "timing": "CUDA graph per part, L2 flushed (256 MiB write) before each replay, median" if not cpu
               else "eager, perf_counter (CPU, tiny shape: not a measurement)",
               "rows": [], "checks": [], "notes": notes}
    if not cpu:
        payload.update(environment())
    variants = [("bf16", models["bf16"], None), ("mxfp8", models["mxfp8"], None)]
    if fused:
        variants.append(("mxfp8_separate", models["mxfp8"], "separate"))
    if any(getattr(mod, "weight_bf16", None) is not None for mod in models["mxfp8"].modules()):
        variants.append(("mxfp8_no_copy", models["mxfp8"], "no_copy"))
    for B in batches:
        step = decode_step(B, context, device)
        g = torch.Generator(device).manual_seed(B)
        x = torch.randn(B, cfg.hidden_size, device=device, generator=g).to(torch.bfloat16)
        delta = torch.randn(B, cfg.hidden_size, device=device, generator=g).to(torch.bfloat16)
        cos_sin = models["bf16"].rope.cos_sin(step.pos_T)
        gp = attn.graph_wrapper(B) if attn_name == "flashinfer" else None

        def prepare(step=step, gp=gp):
            if gp is not None:  # (re)plans into this size's buffers: the plan workspace is shared by all sizes
                attn.begin(step, gp)
            else:
                attn.begin(step)
            proj_attn.begin(step)

        layer_out = {}
        for vname, m, switch in variants:
            blk = m.layers[LAYER]
            norms = (blk.input_layernorm, blk.post_attention_layernorm)
            saved = [n.qdq_mode for n in norms]
            if switch == "separate":
                for n in norms:
                    n.qdq_mode = None
            if switch == "no_copy":  # the dense GEMMs without their bf16 copies (mid-M kernel / dequantize)
                m.drop_derived()
            wb = weight_bytes(cfg, B, vname != "bf16")
            kv_bytes = B * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
            floors = {"attn_proj": wb["attn_proj"], "attn": wb["attn_proj"] + kv_bytes, "moe": wb["moe"],
                      "layer": wb["attn_proj"] + wb["moe"] + (kv_bytes if attn_name != "none" else 0)}
            for pname, fn in parts(blk, x, delta, cos_sin, attn, proj_attn).items():
                row = {"variant": vname, "B": B, "part": pname, "floor_bytes": floors[pname],
                       "floor_us": floors[pname] / HBM_BPS * 1e6, "experts_touched": wb["experts_touched"]}
                try:
                    prepare()
                    with torch.inference_mode():
                        eager = fn()
                        eager = (eager[0] if isinstance(eager, tuple) else eager).clone()
                    if cpu:
                        with torch.inference_mode():
                            t = time_eager(fn, 2)
                        row["graph_equals_eager"] = None
                    else:
                        t, out = time_graph_replays(fn, prepare, lambda: flush_buf.add_(1), args.replays)
                        row["graph_equals_eager"] = bool(torch.equal(out, eager))
                    row.update(us=t * 1e6, x_floor=t * 1e6 / row["floor_us"])
                    if pname == "layer":
                        layer_out[vname] = eager
                except Exception as e:  # noqa: BLE001 - report the variant, keep going
                    row.update(error=f"{type(e).__name__}: {e}"[:1500], trace=traceback.format_exc()[-2500:])
                payload["rows"].append(row)
                print(f"{vname:<15}{B:>5} {pname:<10}" + (f"{row['us']:>9.1f} us  floor {row['floor_us']:>7.1f} us"
                      f"  x{row['x_floor']:.2f}" + ("" if row.get("graph_equals_eager") in (True, None)
                                                   else "  GRAPH != EAGER") if "us" in row
                      else f"  FAILED {row['error'][:200]}"), flush=True)
            for n, s in zip(norms, saved):
                n.qdq_mode = s
            if switch == "no_copy":
                m.postprocess(layouts)
        check = {"B": B}
        if "mxfp8" in layer_out and "mxfp8_separate" in layer_out:
            check["mxfp8_fused_equals_separate"] = bool(torch.equal(layer_out["mxfp8"], layer_out["mxfp8_separate"]))
        if "mxfp8" in layer_out and "mxfp8_no_copy" in layer_out:  # equal bits expected above 64 tokens
            check["mxfp8_copy_equals_no_copy"] = bool(torch.equal(layer_out["mxfp8"], layer_out["mxfp8_no_copy"]))
            check["mxfp8_copy_rel_diff_vs_no_copy"] = rel_err(layer_out["mxfp8"], layer_out["mxfp8_no_copy"])
        try:
            prepare()
            with torch.inference_mode():
                for mode in ("bf16", "mxfp8"):
                    ref = refs[mode].layers[LAYER](x, delta, cos_sin, ref_attn, None)[1]
                    if mode in layer_out:
                        check[f"{mode}_rel_err_vs_torch_reference"] = rel_err(layer_out[mode], ref)
                if "mxfp8" in layer_out:
                    check["mxfp8_rel_diff_vs_bf16"] = rel_err(layer_out["mxfp8"], layer_out["bf16"])
        except Exception as e:  # noqa: BLE001
            check["reference_error"] = f"{type(e).__name__}: {e}"[:1500]
        payload["checks"].append(check)
        print("  checks:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in check.items()}, flush=True)

    print(f"\nus per replay (x floor); floors in us at {HBM_BPS / 1e12:.1f} TB/s")
    print(f"{'B':>5} {'part':<10}" + "".join(f"{v[0]:>16}" for v in variants) + f"{'floor bf16':>12}{'floor mx':>10}")
    for B in batches:
        for pname in ("layer", "attn", "attn_proj", "moe"):
            rs = {r["variant"]: r for r in payload["rows"] if r["B"] == B and r["part"] == pname}
            cells = "".join(f"{rs[v[0]]['us']:>9.1f} ({rs[v[0]]['x_floor']:>4.1f}x)" if "us" in rs.get(v[0], {})
                            else f"{'failed':>16}" for v in variants)
            fl = [rs[v]["floor_us"] for v in ("bf16", "mxfp8") if v in rs]
            print(f"{B:>5} {pname:<10}{cells}" + "".join(f"{f:>11.1f} " for f in fl))
    payload["wall_s"] = time.perf_counter() - t_start
    bad = [r for r in payload["rows"] if "error" in r or r.get("graph_equals_eager") is False]
    print(f"\n{len(bad)} failed/mismatched rows; wall {payload['wall_s']:.0f} s")
    if not cpu:
        path = write_results(args.out, payload)
        print("wrote", path)
    else:
        print(json.dumps(payload["checks"], indent=1))


if __name__ == "__main__":
    main()
