"""Fused MoE (Triton sm90, bf16 and MXFP8 experts) vs torch._grouped_mm bf16, a per-expert loop,
and the roofline; plus weight post-processing (cached layout gathers) first vs cached.

Roofline: bytes of the experts actually touched (fp8 + E8M0 scales, or bf16) + activations
(x read, y write) over measured copy bandwidth, or 2*T*K*3*F*D FLOPs over the measured bf16
peak, whichever is larger. MXFP8 at prefill sizes (`moe_config.dequant_once`) also runs as the engine runs it: the
experts dequantized once into a bf16 workspace, then the bf16 tiles (`engine_us`; `fused_us` stays the MXFP8
tiles). Routing: K distinct uniformly random experts per token; moonlight also at
64 / 256 / 1024 tokens with uneven routing (`routed_tokens`' skew), the spread the engine's decode steps show.

    python benchmarks/moe.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (environment, measure_bf16_peak, measure_copy_bandwidth, time_events,  # noqa: E402
                               time_graph, write_results)
from mxroll.precision import GemmConfig, MXFP8Tensor  # noqa: E402
from mxroll.precision.kernels.moe_align import align_block_size  # noqa: E402
from mxroll.precision.kernels.moe_config import dequant_once  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton  # noqa: E402
from mxroll.precision.layout import LayoutCache  # noqa: E402
from mxroll.precision.moe import experts_ref  # noqa: E402

SHAPES = {"moonlight-16b-a3b": dict(E=64, K=6, D=2048, F=1408), "deepseek-v3": dict(E=256, K=8, D=7168, F=2048)}
TOKENS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]  # decode batches 1..1024 (issue 10), prefill 4096+
SKEW, SKEW_TOKENS = 0.9, [64, 256, 1024]  # moonlight again with uneven routing (`routed_tokens`)


def quantize_chunked(w, chunk=16):
    """MXFP8 of stacked experts, a few experts at a time (the fp32 temporary of all of
    deepseek-v3's experts would not fit next to them)."""
    parts = [MXFP8Tensor.quantize(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)]
    return MXFP8Tensor(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]))


def expert_weights(E, D, F_, g):
    """Seeded bf16 experts (w13 [E, 2F, D], w2 [E, D, F]) and their MXFP8 quantization."""
    w13b = (torch.randn(E, 2 * F_, D, device="cuda", generator=g) / D ** 0.5).to(torch.bfloat16)
    w2b = (torch.randn(E, D, F_, device="cuda", generator=g) / F_ ** 0.5).to(torch.bfloat16)
    return w13b, w2b, quantize_chunked(w13b), quantize_chunked(w2b)


def shape_experts(name: str):
    """(E, K, D, F, generator, (w13 bf16, w2 bf16, w13 MXFP8, w2 MXFP8)) of a SHAPES entry; the generator, seeded 0,
    has drawn the weights and goes on to draw the tokens (`routed_tokens`)."""
    s = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    return s["E"], s["K"], s["D"], s["F"], g, expert_weights(s["E"], s["D"], s["F"], g)


def routed_tokens(T, D, E, K, g, skew: float = 0.0):
    """x [T, D] bf16, K distinct experts per token, top-k weights in [0, 2.5). skew 0: uniformly random experts;
    skew > 0: Gumbel top-k over expert popularity logits ~ N(0, skew), uneven like the engine's decode steps on
    dummy weights (moonlight, batch 256: busiest expert 73-152 rows against a mean of 24, decode_profile.py
    --routes); 0.9 gives a similar spread."""
    x = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    noise = torch.rand(T, E, device="cuda", generator=g)
    if skew > 0:
        pop = torch.randn(E, device="cuda", generator=g) * skew
        ids = (pop - torch.log(-torch.log(noise.clamp_min(1e-12)))).topk(K, dim=1).indices
    else:
        ids = noise.argsort(dim=1)[:, :K]
    return x, ids, torch.rand(T, K, device="cuda", generator=g) * 2.5


def routing_sets(T, D, E, K, g, n: int = 4):
    """n routings of T tokens (one CUDA graph replays them in turn, so the touched experts are not all
    L2-resident from the previous call) and the average number of distinct experts each touches."""
    sets = [routed_tokens(T, D, E, K, g) for _ in range(n)]
    return sets, sum(int(torch.unique(ids).numel()) for _, ids, _ in sets) / n


def experts_floor_us(touched: float, T: int, D: int, F: int, mxfp8: bool, bw: float) -> float:
    """Bytes of the touched experts (fp8 + E8M0 scales, or bf16) plus x read and y written, over bw, in us."""
    return (touched * 3 * F * D * ((1 + 1 / 32) if mxfp8 else 2) + 4 * T * D) / bw * 1e6


def grouped_mm_moe(x, ids, w, w13, w2):
    """bf16 baseline: sort rows by expert (groups padded to 16), two torch._grouped_mm, combine."""
    T, K = ids.shape
    E = w13.shape[0]
    al = align_block_size(ids, E, 16)
    valid = al.sorted_ids < T * K
    rows = torch.where(valid, al.sorted_ids, 0).long()
    xs = x[rows // K] * valid[:, None]
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, al.block_expert.long(), torch.full_like(al.block_expert, 16))[:E]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)
    y = y.float() * (w.reshape(-1)[rows] * valid)[:, None]
    out = torch.zeros(T * K + 1, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_copy_(0, torch.where(valid, al.sorted_ids.long(), T * K), y)
    return out[:-1].view(T, K, -1).sum(1).to(x.dtype)


def bench(name, E, K, D, F_, T, quant, w13b, w2b, w13q, w2q, bw, peak, skew=0.0):
    g = torch.Generator(device="cuda").manual_seed(T)
    x, ids, w = routed_tokens(T, D, E, K, g, skew)
    w13, w2 = (w13q, w2q) if quant else (w13b, w2b)
    ws = (torch.empty(3 * E * F_ * D, dtype=torch.bfloat16, device="cuda") if quant and dequant_once(T, K, E)
          else None)
    y = fused_moe_triton(x, ids, w, w13, w2, "w8a8", workspace=ws)
    ref = experts_ref(x, ids, w, w13, w2, GemmConfig("w8a8"))
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    t_fused = time_graph([lambda: fused_moe_triton(x, ids, w, w13, w2, "w8a8")] * 4)
    t_engine = time_graph([lambda: fused_moe_triton(x, ids, w, w13, w2, "w8a8", workspace=ws)] * 4) if ws is not None \
        else t_fused
    t_gmm = time_graph([lambda: grouped_mm_moe(x, ids, w, w13b, w2b)] * 4)
    t_loop = time_events(lambda: experts_ref(x, ids, w, w13b, w2b), iters=5, warmup=1)
    touched = int(torch.unique(ids).numel())
    per_expert = 3 * F_ * D * (1 + 1 / 32) if quant else 3 * F_ * D * 2
    nbytes = touched * per_expert + 2 * T * D * 2
    floor = max(nbytes / bw, 2 * T * K * 3 * F_ * D / peak)
    rows_max = int(torch.bincount(ids.reshape(-1), minlength=E).max())
    return {"shape": name, "tokens": T, "routing": f"skew {skew}" if skew else "uniform",
            "max_rows_per_expert": rows_max, "mean_rows_per_expert": T * K / E,
            "experts_dtype": "mxfp8" if quant else "bf16", "act_mode": "w8a8" if quant else "-",
            "rel_err": err, "correct": err < 1e-2, "fused_us": t_fused * 1e6, "engine_us": t_engine * 1e6,
            "engine_path": "dequant once + bf16 tiles" if t_engine is not t_fused else "tiles",
            "grouped_mm_bf16_us": t_gmm * 1e6, "loop_bf16_us": t_loop * 1e6, "speedup_vs_grouped_mm": t_gmm / t_fused,
            "engine_speedup_vs_grouped_mm": t_gmm / t_engine, "floor_us": floor * 1e6,
            "frac_of_roofline": floor / t_fused, "experts_touched": touched}


def postprocess_timing():
    """Scale re-layout (128x4 swizzle, what the sm100 kernels consume) for every MXFP8 weight of
    a moonlight-16b-a3b layer set: a fresh cache (builds indices) vs the warm cache (gather only)."""
    E, D, F_, shared = 64, 2048, 1408, 2
    shapes = [(3072, D // 32), (576, D // 32), (2048, 2048 // 32)]  # q_proj, kv_a_proj, o_proj
    layers = [shapes + [(11264, D // 32)] * 2 + [(D, 11264 // 32)]]  # dense layer 0
    moe = shapes + [(E, 2 * F_, D // 32), (E, D, F_ // 32), (shared * F_, D // 32), (shared * F_, D // 32),
                    (D, shared * F_ // 32)]
    layers += [moe] * 26
    tensors = [[torch.randint(0, 255, s, dtype=torch.uint8, device="cuda") for s in layer] for layer in layers]
    outs = {}

    def run(cache):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for li, layer in enumerate(tensors):
            for ti, t in enumerate(layer):
                outs[li, ti] = cache.apply("scale_128x4", t, out=outs.get((li, ti)))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    cache = LayoutCache()
    first = run(cache)
    builds = cache.builds
    cached = min(run(cache) for _ in range(3))
    return {"tensors": sum(len(x) for x in tensors), "bytes": sum(t.numel() for layer in tensors for t in layer),
            "first_ms": first * 1e3, "cached_ms": cached * 1e3, "speedup": first / cached, "indices_built": builds,
            "indices_built_after_cached_calls": cache.builds - builds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    env = environment()
    bw, peak = measure_copy_bandwidth(), measure_bf16_peak()
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s, bf16 {peak / 1e12:.0f} TFLOP/s")
    rows = []
    print(f"{'shape':<18}{'T':>6}{'routing':>9}{'experts':>8}{'err':>9}{'fused_us':>10}{'gmm_us':>9}{'loop_us':>10}"
          f"{'x_gmm':>7}{'%roof':>7}  engine path")
    for name in SHAPES:
        E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
        cases = [(T, 0.0) for T in ([1, 16, 4096] if args.quick else TOKENS)]
        if name == "moonlight-16b-a3b" and not args.quick:
            cases += [(T, SKEW) for T in SKEW_TOKENS]
        for T, skew in cases:
            for quant in (False, True):
                r = bench(name, E, K, D, F_, T, quant, w13b, w2b, w13q, w2q, bw, peak, skew)
                rows.append(r)
                print(f"{name:<18}{T:>6}{'skew' if skew else 'uniform':>9}{r['experts_dtype']:>8}{r['rel_err']:>9.1e}"
                      f"{r['fused_us']:>10.1f}{r['grouped_mm_bf16_us']:>9.1f}{r['loop_bf16_us']:>10.1f}"
                      f"{r['speedup_vs_grouped_mm']:>7.2f}{100 * r['frac_of_roofline']:>7.0f}"
                      + (f"  dequant once {r['engine_us']:.1f} us ({r['engine_speedup_vs_grouped_mm']:.2f}x gmm)"
                         if r["engine_path"] != "tiles" else "")
                      + ("" if r["correct"] else "  WRONG"), flush=True)
        del w13b, w2b, w13q, w2q
        torch.cuda.empty_cache()
    post = postprocess_timing()
    print(f"post-processing, moonlight layer set ({post['tensors']} scale tensors, {post['bytes'] / 1e6:.0f} MB): "
          f"first {post['first_ms']:.1f} ms, cached {post['cached_ms']:.2f} ms ({post['speedup']:.0f}x), "
          f"indices built {post['indices_built']}, then {post['indices_built_after_cached_calls']}")
    path = write_results("moe", {"benchmark": "moe", **env, "copy_GBps": bw / 1e9, "bf16_peak_TFLOPs": peak / 1e12,
                                 "rows": rows, "postprocess": post})
    print(f"wrote {path}")
    if not all(r["correct"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
