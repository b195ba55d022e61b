"""MXFP8 GEMM (Triton sm90) vs cuBLAS bf16 on the dequantized weight, and the HBM roofline.

Shapes: the dense projections of the moonlight-16b-a3b and deepseek-v3 presets; M (tokens) from
decode to prefill. Per shape and M: correctness against the torch reference in the same run,
per-call time inside one CUDA graph of back-to-back launches over rotating inputs (> L2), and
single-launch latency. Floor = bytes (fp8 W + E8M0 scales + bf16 x + bf16 y) / measured copy
bandwidth, or 2MNK / measured bf16 MMA peak, whichever is larger.

    python benchmarks/mxfp8_gemm.py [--quick] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (copies_for, environment, measure_bf16_peak, measure_copy_bandwidth,  # noqa: E402
                               time_events, time_graph, write_results)
from mxroll.precision.kernels.mxfp8_gemm import mxfp8_gemm_ref  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton, pick_config  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

SHAPES = {  # name: (N, K) for y[M, N] = x[M, K] @ W[N, K]^T
    "moonlight.q_proj": (3072, 2048),
    "moonlight.kv_a_proj": (576, 2048),
    "moonlight.o_proj": (2048, 2048),
    "moonlight.mlp_gate": (11264, 2048),
    "moonlight.mlp_down": (2048, 11264),
    "dsv3.q_a_proj": (1536, 7168),
    "dsv3.q_b_proj": (24576, 1536),
    "dsv3.kv_a_proj": (576, 7168),
    "dsv3.o_proj": (7168, 16384),
    "dsv3.mlp_gate": (18432, 7168),
    "dsv3.mlp_down": (7168, 18432),
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384]


def bench_shape(name, N, K, M, bw, peak, act_mode="w8a8"):
    g = torch.Generator(device="cuda").manual_seed(N * 31 + K * 7 + M)
    w_hp = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float32).mul_(K ** -0.5).to(torch.bfloat16)
    w = MXFP8Tensor.quantize(w_hp)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
    # correctness in the same run (fresh random data, poisoned output via torch.empty reuse is n/a)
    y = mxfp8_gemm_triton(x, w, act_mode)
    ref = mxfp8_gemm_ref(x, w, act_mode, "rceil")
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    ok = rel < 1e-2 and bool(torch.isfinite(y).all())
    w_bytes = N * K + N * K // 32
    io_bytes = w_bytes + 2 * M * K + 2 * M * N
    n = copies_for(w_bytes + 2 * M * K)
    ws = [MXFP8Tensor(w.data.clone(), w.scale.clone()) for _ in range(n)]
    xs = [x.clone() for _ in range(n)]
    wd = w.dequantize(torch.bfloat16)
    nb = copies_for(2 * N * K + 2 * M * K)
    wbs = [wd.clone() for _ in range(nb)]
    xbs = [x.clone() for _ in range(nb)]
    t_tri = time_graph([(lambda a=a, b=b: mxfp8_gemm_triton(a, b, act_mode)) for a, b in zip(xs, ws)])
    t_cub = time_graph([(lambda a=a, b=b: torch.nn.functional.linear(a, b)) for a, b in zip(xbs, wbs)])
    lat_tri = time_events(lambda: mxfp8_gemm_triton(x, w, act_mode))
    lat_cub = time_events(lambda: torch.nn.functional.linear(x, wd))
    floor = max(io_bytes / bw, 2 * M * N * K / peak)
    cfg = pick_config(M, N, K)
    del ws, xs, wbs, xbs
    return {"shape": name, "N": N, "K": K, "M": M, "act_mode": act_mode, "rel_err": rel, "correct": ok,
            "weight_MB": w_bytes / 1e6, "triton_us": t_tri * 1e6, "cublas_bf16_us": t_cub * 1e6,
            "speedup_vs_cublas": t_cub / t_tri, "floor_us": floor * 1e6, "frac_of_roofline": floor / t_tri,
            "hbm_frac": io_bytes / bw / t_tri, "triton_tflops": 2 * M * N * K / t_tri / 1e12,
            "cublas_tflops": 2 * M * N * K / t_cub / 1e12, "triton_latency_us": lat_tri * 1e6,
            "cublas_latency_us": lat_cub * 1e6,
            "config": {k: v for k, v in cfg.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes and M values")
    ap.add_argument("--out", default="mxfp8_gemm")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of shape names")
    args = ap.parse_args()
    env = environment()
    bw, peak = measure_copy_bandwidth(), measure_bf16_peak()
    print(f"{env['device']} torch {env['torch']} triton {env['triton']}: copy {bw / 1e9:.0f} GB/s, "
          f"bf16 MMA {peak / 1e12:.0f} TFLOP/s")
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or k in args.shapes.split(",")}
    ms = [1, 16, 256, 4096] if args.quick else MS
    rows = []
    hdr = (f"{'shape':<20}{'M':>6}{'mode':>6}{'err':>9}{'triton_us':>10}{'cublas_us':>10}{'x_cublas':>9}"
           f"{'%roof':>7}{'TF/s':>7}{'lat_us':>8}")
    print(hdr)
    for name, (N, K) in shapes.items():
        for M in ms:
            modes = ["w8a8", "w8a16"] if M in (1, 16, 4096) else ["w8a8"]
            for mode in modes:
                r = bench_shape(name, N, K, M, bw, peak, mode)
                rows.append(r)
                print(f"{name:<20}{M:>6}{mode:>6}{r['rel_err']:>9.1e}{r['triton_us']:>10.1f}{r['cublas_bf16_us']:>10.1f}"
                      f"{r['speedup_vs_cublas']:>9.2f}{100 * r['frac_of_roofline']:>7.0f}{r['triton_tflops']:>7.0f}"
                      f"{r['triton_latency_us']:>8.1f}" + ("" if r["correct"] else "  WRONG"), flush=True)
            torch.cuda.empty_cache()
    path = write_results(args.out, {"benchmark": "mxfp8_gemm", **env, "copy_GBps": bw / 1e9,
                                    "bf16_peak_TFLOPs": peak / 1e12, "rows": rows})
    print(f"wrote {path}")
    if not all(r["correct"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
