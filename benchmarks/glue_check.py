"""Glue kernels of one moonlight decoder layer (layer 1: MLA + MoE) in the decode path, before vs after their
removal, in one process on the same weights, cache and inputs.

"old": the latent's norm kernel and two index copies into the cache (`ModelKernels.latent` "torch"), torch's
silu and multiply (`act` "torch"), torch's sigmoid of the router logits, the route recorder's two copy kernels
and the shared experts' separate add (the MoE forward as it was, restored on the instance). "new": one latent
cache-write kernel, one silu*up kernel, the sigmoid inside the router kernel, the router writing the
recorder's rows, the shared add in the MoE combine pass.
Modes: bf16 weights, MXFP8 weights (w8a8, fused input norms), and MXFP8 with the latent quantize-dequantized
(a checkpoint whose kv_b_proj input the trainer quantized). Routes are recorded, as the engine's decode
graphs always do.

Reports, per mode and batch: (a) bit-equality new vs old of the layer output, the layer's cache pages and the
recorded routes (eager), and of each graph replay's output vs its eager run; (b) kernels per layer, counted
with torch.profiler over graph replays, with the per-name difference; (c) layer time as a CUDA graph replay
(CUDA events after warm-up, median; L2 flushed before each replay as in benchmarks/layer.py, and warm).
Kernel checks on many rows: the latent write vs triton_norm (+ fake_quant), silu*up vs torch.

    python benchmarks/glue_check.py [--batches 1,64,256] [--context 1024] [--replays 30] [--out glue_check]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import types
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import capture_graph, environment, median_replay, write_results  # noqa: E402
from benchmarks.layer import FLUSH_BYTES, LAYER, PAGE, PRESET, build, decode_step, layer_config  # noqa: E402
from mxroll.model.dummy import init_dummy_weights  # noqa: E402
from mxroll.model.kernels import ModelKernels  # noqa: E402
from mxroll.model.moe import MLP, RouteRecorder  # noqa: E402
from mxroll.model.ops import route_topk  # noqa: E402
from mxroll.precision import linear  # noqa: E402
from mxroll.rollout.kv_cache import PagedLatentCache  # noqa: E402

NEW = ModelKernels(norm="triton", router="triton", rope="triton", latent="triton", act="triton")


def old_gate(gate, x_TD):
    """Gate.forward before this change (Triton backend): torch's sigmoid kernel between the GEMM and top-k."""
    logits_TE = linear(x_TD, gate.weight, out_dtype=torch.float32)
    return route_topk(logits_TE.sigmoid(), gate.e_score_correction_bias, gate.top_k, gate.n_group, gate.topk_group,
                      gate.norm_topk_prob, gate.routed_scaling_factor, gate.backend)


def old_moe_forward(self, x_TD, routes=None, x_qdq_TD=None):
    """MoE.forward before this change: recorder copies after the router, the shared experts added by torch."""
    weights_TK, ids_TK = old_gate(self.gate, x_TD)
    if routes is not None:
        T = ids_TK.shape[0]
        routes.ids[self.moe_index, :T].copy_(ids_TK)
        routes.weights[self.moe_index, :T].copy_(weights_TK)
    y = self.experts(x_TD if x_qdq_TD is None else x_qdq_TD, ids_TK, weights_TK, x_qdq_TD is not None)
    return y + self.shared_experts(x_TD, None, x_qdq_TD) if self.shared_experts is not None else y


def set_path(model, old: bool) -> None:
    """Switch every block between the old glue and the model's own (attributes decided at construction from
    `model.kernels`, flipped here for the comparison only)."""
    for blk in model.layers:
        blk.self_attn.latent_backend = "torch" if old else model.kernels.latent
        for m in blk.modules():
            if isinstance(m, MLP):
                m.act_backend = "torch" if old else model.kernels.act
        if blk.mlp.__class__.__name__ == "MoE":
            if old:
                blk.mlp.forward = types.MethodType(old_moe_forward, blk.mlp)
            elif "forward" in blk.mlp.__dict__:
                del blk.mlp.forward


def kernels_of(g, replays: int = 3) -> Counter:
    from torch.profiler import ProfilerActivity, profile
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return Counter({k: v / replays for k, v in names.items()})


def kernel_checks(cfg) -> dict:
    """The new kernels on many random rows against what they replace."""
    from mxroll.model.kernels.triton_act import silu_mul_triton
    from mxroll.model.kernels.triton_latent import store_latent_triton
    from mxroll.model.kernels.triton_norm import rmsnorm_triton
    from mxroll.precision.kernels.mxfp8_gemm import fake_quant
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    C, R, T = cfg.kv_lora_rank, cfg.qk_rope_head_dim, 8192
    proj = torch.randn(T, C + R, device="cuda", generator=g).mul_(3).to(torch.bfloat16)
    k_pe = torch.randn(T, R, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.rand(C, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    slots = torch.randperm(2 * T, device="cuda", generator=g)[:T]
    normed = rmsnorm_triton(proj[:, :C], w, cfg.rms_norm_eps)
    for mode in (None, "rceil", "floor"):
        ckv = torch.zeros(2 * T, C, device="cuda", dtype=torch.bfloat16)
        kpe = torch.zeros(2 * T, R, device="cuda", dtype=torch.bfloat16)
        store_latent_triton(ckv, kpe, slots, proj[:, :C], k_pe, w, cfg.rms_norm_eps, mode)
        ref = normed if mode is None else fake_quant(normed, mode)
        out[f"latent_write_{mode or 'plain'}_mismatches"] = int((ckv[slots] != ref).sum())
        out[f"latent_write_{mode or 'plain'}_kpe_equal"] = bool(torch.equal(kpe[slots], k_pe))
    from mxroll.model.kernels.triton_router import route_topk_triton
    logits = torch.randn(T, cfg.n_routed_experts, device="cuda", generator=g) * 3
    bias = torch.randn(cfg.n_routed_experts, device="cuda", generator=g) * 0.1
    args = (bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    w1, i1 = route_topk_triton(logits, *args, sigmoid=True)
    w0, i0 = route_topk_triton(logits.sigmoid(), *args)
    out["router_sigmoid_id_mismatches"] = int((i1 != i0).sum())
    out["router_sigmoid_weight_mismatches"] = int((w1 != w0).sum())
    for scale in (1.0, 4.0, 30.0):
        gate = (torch.randn(4096, 2816, device="cuda", generator=g) * scale).to(torch.bfloat16)
        up = torch.randn(4096, 2816, device="cuda", generator=g).to(torch.bfloat16)
        ref = torch.nn.functional.silu(gate) * up
        out[f"silu_mul_x{scale:g}_mismatches"] = int((silu_mul_triton(gate, up) != ref).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="glue_check")
    args = ap.parse_args()
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = layer_config(False)
    payload = {"benchmark": "glue_check", "preset": PRESET, "layer": LAYER, "context": args.context, "page_size": PAGE,
               "timing": "CUDA graph of the layer, median of replays (us); cold: L2 flushed before each replay",
               "rows": [], "notes": []}
    payload.update(environment())
    try:
        payload["kernel_checks"] = kernel_checks(cfg)
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        payload["kernel_checks"] = {"error": f"{type(e).__name__}: {e}"[:1500], "trace": traceback.format_exc()[-2000:]}
    print("kernel checks:", payload["kernel_checks"], flush=True)

    from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention
    P = -(-args.context // PAGE)
    cache = PagedLatentCache(cfg, max(batches) * P + 1, PAGE, torch.bfloat16, torch.device("cuda"))
    cache.ckv_LPGC.normal_()
    cache.kpe_LPGR.normal_()
    init = (cache.ckv_LPGC[LAYER].clone(), cache.kpe_LPGR[LAYER].clone())
    attn = FlashInferAttention(cache, cfg.num_attention_heads, cfg.softmax_scale, P + 1)
    flush_buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    models = {}
    for mode in ("bf16", "mxfp8"):
        m = build(cfg, mode, "cuda", "triton", NEW)
        init_dummy_weights(m, seed=0)
        models[mode] = m
    modes = [("bf16", "bf16", None), ("mxfp8", "mxfp8", None), ("mxfp8_latent_qdq", "mxfp8", "rceil")]
    graphs = {B: attn.graph_wrapper(B) for B in batches}
    for mname, wmode, qdq in modes:
        model = models[wmode]
        blk = model.layers[LAYER]
        blk.self_attn.latent_qdq = qdq
        for B in batches:
            step = decode_step(B, args.context, "cuda")
            g = torch.Generator("cuda").manual_seed(B)
            x = torch.randn(B, cfg.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            delta = torch.randn(B, cfg.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            cos_sin = model.rope.cos_sin(step.pos_T)
            rec = RouteRecorder(len(model.moe_layers), B, cfg.num_experts_per_tok, "cuda")

            def prepare(step=step, gp=graphs[B]):
                attn.begin(step, gp)

            def fn(x=x, delta=delta, cos_sin=cos_sin, rec=rec, blk=blk):
                return blk(x, delta, cos_sin, attn, rec)[1]

            seen = {}
            for variant in ("old", "new"):
                row = {"mode": mname, "B": B, "variant": variant}
                try:
                    set_path(model, variant == "old")
                    cache.ckv_LPGC[LAYER].copy_(init[0])
                    cache.kpe_LPGR[LAYER].copy_(init[1])
                    rec.ids.zero_()
                    rec.weights.zero_()
                    prepare()
                    with torch.inference_mode():
                        eager = fn().clone()
                    seen[variant] = (eager, cache.ckv_LPGC[LAYER].clone(), cache.kpe_LPGR[LAYER].clone(),
                                     rec.ids.clone(), rec.weights.clone())
                    graph, out = capture_graph(fn, prepare)
                    graph.replay()
                    torch.cuda.synchronize()
                    row["graph_equals_eager"] = bool(torch.equal(out, eager))
                    names = kernels_of(graph)
                    row["kernels"] = sum(names.values())
                    row["kernel_names"] = dict(sorted(names.items()))
                    row["us_cold"] = 1e6 * median_replay(graph, args.replays, lambda: flush_buf.add_(1), warmup=3)
                    row["us_warm"] = 1e6 * median_replay(graph, args.replays, warmup=3)
                    del graph
                except Exception as e:  # noqa: BLE001 - report the variant, keep going
                    row.update(error=f"{type(e).__name__}: {e}"[:1500], trace=traceback.format_exc()[-2500:])
                finally:
                    set_path(model, False)
                payload["rows"].append(row)
                print(f"{mname:<17}{B:>5} {variant:<4}" + (
                    f" kernels {row['kernels']:>5.1f}  cold {row['us_cold']:>7.1f} us  warm {row['us_warm']:>7.1f} us"
                    f"  graph==eager {row['graph_equals_eager']}" if "error" not in row
                    else f" FAILED {row['error'][:300]}"), flush=True)
            if len(seen) == 2:
                o, n = seen["old"], seen["new"]
                eq = {k: bool(torch.equal(a, b)) for k, a, b in zip(("output", "ckv", "kpe", "route_ids", "route_weights"),
                                                                   o, n)}
                eq["ckv_written"] = not torch.equal(n[1], init[0])
                payload["rows"][-1]["new_equals_old"] = eq
                print(f"{'':<22} new == old: {eq}", flush=True)
        blk.self_attn.latent_qdq = None

    print("\nkernels per layer and time (us, cold / warm)")
    print(f"{'mode':<17}{'B':>5}{'old k':>7}{'new k':>7}{'old cold':>10}{'new cold':>10}{'old warm':>10}{'new warm':>10}"
          "  bit-equal")
    for mname, _, _ in modes:
        for B in batches:
            rs = {r["variant"]: r for r in payload["rows"] if r["mode"] == mname and r["B"] == B}
            if any("error" in r for r in rs.values()) or len(rs) < 2:
                print(f"{mname:<17}{B:>5}  failed")
                continue
            o, n = rs["old"], rs["new"]
            eq = n.get("new_equals_old", {})
            ok = all(eq.values()) and o["graph_equals_eager"] and n["graph_equals_eager"]
            print(f"{mname:<17}{B:>5}{o['kernels']:>7.0f}{n['kernels']:>7.0f}{o['us_cold']:>10.1f}{n['us_cold']:>10.1f}"
                  f"{o['us_warm']:>10.1f}{n['us_warm']:>10.1f}  {ok}")
    for mname in ("bf16", "mxfp8"):
        rs = {r["variant"]: r for r in payload["rows"] if r["mode"] == mname and r["B"] == batches[0]}
        if len(rs) == 2 and all("kernel_names" in r for r in rs.values()):
            o, n = Counter(rs["old"]["kernel_names"]), Counter(rs["new"]["kernel_names"])
            print(f"\n{mname} B={batches[0]}: kernels only in old (count): "
                  f"{ {k[:70]: v for k, v in (o - n).items()} }\n  only in new: { {k[:70]: v for k, v in (n - o).items()} }")
            print(f"  all new kernels: { {k[:60]: v for k, v in n.items()} }")
    payload["wall_s"] = time.perf_counter() - t0
    bad = [r for r in payload["rows"] if "error" in r or r.get("graph_equals_eager") is False
           or not all(r.get("new_equals_old", {True: True}).values())]
    print(f"\n{len(bad)} failed/mismatched rows; wall {payload['wall_s']:.0f} s")
    print("wrote", write_results(args.out, payload))


if __name__ == "__main__":
    main()
