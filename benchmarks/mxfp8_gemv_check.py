"""Decode-M MXFP8 GEMM check: the gemv kernel's variants vs the previous small-M kernel vs cuBLAS bf16.

Every moonlight and deepseek-v3 dense shape of benchmarks/mxfp8_gemm.py plus the shared experts, at
M in (1, 4, 16, 32, 64). Per row: correctness against the torch reference (rel. error, fraction of
bf16 outputs bitwise equal to the reference's, max difference in reference ulps; fresh inputs, output
memory poisoned with NaN first), time per call inside one CUDA graph of back-to-back launches over
inputs rotated past L2 (CUDA events around replays, after warm-up), achieved GB/s over the fp8 weight +
E8M0 scale bytes, the roofline time for those bytes at 4.3 TB/s, and the ratio vs cuBLAS bf16
(torch.matmul on the dequantized bf16 weight; > 1 = faster). "prev" is what shipped before the gemv
kernel for that M (the fused kernel at M <= 16, the mid kernel at 32/64); "*" marks the variant
`pick_config` picks now. A variant that fails to compile or run is reported and skipped. Ends with
the per-M geometric mean x cuBLAS of every variant over the shapes where all its rows are correct,
and the fastest correct variant per row. JSON: benchmarks/results/mxfp8_gemv_check.json.

    python benchmarks/mxfp8_gemv_check.py [--shapes PREFIX,...] [--ms 1,4,16] [--budget 100] [--jobs 12]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, time_graph, write_results  # noqa: E402
from benchmarks.mxfp8_gemm import SHAPES as GEMM_SHAPES  # noqa: E402
from mxroll.precision.kernels.mxfp8_gemm import mxfp8_gemm_ref  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import fused_config, mxfp8_gemm_triton, pick_config  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm_mid import mid_config  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemv import gemv_config, gemv_split  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

SHAPES = {**GEMM_SHAPES,  # shared experts: moonlight 2 x 1408, deepseek-v3 1 x 2048 (gate and up are separate)
          "moonlight.shared_gate": (2816, 2048), "moonlight.shared_down": (2048, 2816),
          "dsv3.shared_gate": (2048, 7168), "dsv3.shared_down": (7168, 2048)}
MS = (1, 4, 16, 32, 64)
HBM = 4.3e12  # H200 HBM3e bytes/s, the roofline


def variants(M: int, N: int, K: int) -> dict:
    """name -> config. The gemv variants per M: default first, then tile / split alternatives."""
    g = lambda inner=None, **o: gemv_config(M, N, K, inner, **o)  # noqa: E731
    out = {"prev": fused_config(M, N, K) if M <= 16 else mid_config(M, N, K)}
    if M <= 4:
        out.update(fma=g("fma"), fma_bn64=g("fma", BN=64), fma_bn16=g("fma", BN=16),
                   fma_bk512_w8=g("fma", BK=512, num_warps=8), fma_waves2=g("fma", WAVES=2),
                   fma_waves8=g("fma", WAVES=8, MAX_SPLIT=64), dot=g("dot"))
    elif M <= 16:
        out.update(dot=g("dot"), dot_bk256=g("dot", BK=256, NUM_STAGES=2), dot_bn32=g("dot", BN=32),
                   dot_bn128_w8=g("dot", BN=128, num_warps=8), dot_waves2=g("dot", WAVES=2),
                   dot_waves8=g("dot", WAVES=8, MAX_SPLIT=64), dot_xfp8=g("dot", X_FP8=True))
    else:
        out.update(dot=g("dot"), dot_xfp8=g("dot", X_FP8=True), dot_waves2=g("dot", WAVES=2),
                   dot_bn32=g("dot", BN=32))
    return out


def check(y: torch.Tensor, ref: torch.Tensor) -> dict:
    d, r = (y.float() - ref.float()).abs(), ref.float().abs()
    ulp = torch.exp2(torch.floor(torch.log2(r.clamp_min(1e-30))) - 7)  # bf16 spacing at |ref|
    return {"rel_err": (d.norm() / r.norm().clamp_min(1e-30)).item(), "bitwise_frac": (y == ref).float().mean().item(),
            "max_ulps": (d / ulp).max().item(), "finite": bool(torch.isfinite(y).all())}


def rows_for(name: str, N: int, K: int, M: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(N * 31 + K * 7 + M)
    w = MXFP8Tensor.quantize((torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16))
    x = (torch.randn(M, K, device="cuda", generator=g) * 2).to(torch.bfloat16)
    ref = mxfp8_gemm_ref(x, w, "w8a8", "rceil")
    w_bytes = N * K + N * K // 32
    roof = w_bytes / HBM
    wd = w.dequantize(torch.bfloat16)
    nb = copies_for(2 * N * K + 2 * M * K)
    wbs, xbs = [wd.clone() for _ in range(nb)], [x.clone() for _ in range(nb)]
    t_cub = time_graph([(lambda a=a, b=b: torch.matmul(a, b.t())) for a, b in zip(xbs, wbs)])
    del wbs, xbs, wd
    n = copies_for(w_bytes + 2 * M * K)
    ws = [MXFP8Tensor(w.data.clone(), w.scale.clone()) for _ in range(n)]
    xs = [x.clone() for _ in range(n)]
    picked = pick_config(M, N, K)
    base = {"shape": name, "N": N, "K": K, "M": M, "weight_MB": w_bytes / 1e6, "cublas_us": t_cub * 1e6,
            "roofline_us": roof * 1e6, "cublas_GBps": w_bytes * 2 / t_cub / 1e9}
    out = []
    for vname, cfg in variants(M, N, K).items():
        row = dict(base, variant=vname, config=dict(cfg), picked=cfg == picked)
        if cfg["PATH"] == "gemv":
            row["split"] = gemv_split(N, K, cfg)
        try:
            torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda")  # the allocator hands this block back
            y = mxfp8_gemm_triton(x, w, "w8a8", config=cfg)
            torch.cuda.synchronize()
            row.update(check(y, ref))
            strict = cfg["PATH"] == "gemv"  # bf16 equal but for rounding ties
            row["correct"] = row["finite"] and row["rel_err"] < 5e-3 and (
                not strict or (row["bitwise_frac"] > 0.99 and row["max_ulps"] <= 2))
            t = time_graph([(lambda a=a, b=b: mxfp8_gemm_triton(a, b, "w8a8", config=cfg)) for a, b in zip(xs, ws)])
            row.update(us=t * 1e6, GBps=w_bytes / t / 1e9, x_cublas=t_cub / t, frac_roofline=roof / t)
        except Exception as e:  # noqa: BLE001 - record, keep measuring the others
            row.update(correct=False, error=f"{type(e).__name__}: {e}"[:1500], trace=traceback.format_exc()[-2000:])
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        out.append(row)
    return out


def _warm(job: tuple[str, int]) -> list[str]:
    """Compile every variant of one (shape, M) in a worker process: Triton's on-disk cache then serves
    the timed run, and compilation (single-threaded per kernel) runs on all cores."""
    name, M = job
    N, K = SHAPES[name]
    w = MXFP8Tensor.quantize(torch.randn(N, K, device="cuda").to(torch.bfloat16))
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    failed = []
    for vname, cfg in variants(M, N, K).items():
        try:
            mxfp8_gemm_triton(x, w, "w8a8", config=cfg)
        except Exception as e:  # noqa: BLE001 - the timed run reports it
            failed.append(f"{vname}: {type(e).__name__}")
    torch.cuda.synchronize()
    return failed


def precompile(jobs: list[tuple[str, int]], workers: int) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_warm, j): j for j in jobs}
        for f in cf.as_completed(futs):
            try:
                bad = f.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker: the timed run reports the row
                bad = [f"worker: {type(e).__name__}: {e}"[:200]]
            if bad:
                print(f"precompile {futs[f]}: {bad}", flush=True)
    print(f"precompiled {len(jobs)} (shape, M) in {time.time() - t0:.0f} s with {workers} processes", flush=True)


def summary(rows: list[dict]) -> dict:
    out = {}
    for M in sorted({r["M"] for r in rows}):
        per = {}
        for r in rows:
            if r["M"] == M:
                per.setdefault(r["variant"], []).append(r)
        n_shapes = len({r["shape"] for r in rows if r["M"] == M})
        out[M] = dict(sorted(((v, math.exp(sum(math.log(r["x_cublas"]) for r in rs) / len(rs)))
                              for v, rs in per.items()
                              if len(rs) == n_shapes and all(r.get("correct") and "x_cublas" in r for r in rs)),
                             key=lambda kv: -kv[1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated shape names or prefixes")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--budget", type=float, default=100.0,
                    help="seconds for the timed part; later (M, shape) rows are skipped")
    ap.add_argument("--jobs", type=int, default=12, help="compile processes (0: compile in the timed loop)")
    ap.add_argument("--out", default="mxfp8_gemv_check")
    args = ap.parse_args()
    env = environment()
    print(f"{env['device']} ({env['sms']} SMs) torch {env['torch']} triton {env['triton']}; roofline "
          f"{HBM / 1e12:.1f} TB/s over fp8 W + scales", flush=True)
    names = list(SHAPES)
    if args.shapes:
        names = [s for s in SHAPES if any(s == p or s.startswith(p) for p in args.shapes.split(","))]
    ms = [int(m) for m in args.ms.split(",")] if args.ms else list(MS)
    if args.jobs:
        precompile([(name, M) for M in ms for name in names], args.jobs)
    t0 = time.time()
    payload = {"benchmark": "mxfp8_gemv_check", **env, "roofline_Bps": HBM, "rows": [], "skipped": []}
    rows = payload["rows"]
    print(f"{'shape':<22}{'M':>3} {'variant':<13}{'split':>8}{'us':>7}{'cuBLAS':>7}{'roof':>6}{'x_cub':>6}"
          f"{'GB/s':>6}{'%roof':>6}{'rel_err':>9}{'bitEq':>7}{'ulps':>5}")
    for M in ms:  # M outer: if the budget runs out, the largest M goes first
        for name in names:
            N, K = SHAPES[name]
            if time.time() - t0 > args.budget:
                payload["skipped"].append([name, M])
                continue
            try:
                new = rows_for(name, N, K, M)
            except Exception as e:  # noqa: BLE001 - e.g. the baseline itself failed
                new = [{"shape": name, "N": N, "K": K, "M": M, "variant": "all", "correct": False,
                        "error": f"{type(e).__name__}: {e}"[:1500]}]
            rows.extend(new)
            for r in new:
                tag = ("*" if r.get("picked") else " ") + r["variant"]
                split = f"{r['split'][0]}x{r['split'][1]}" if "split" in r else ""
                if "us" in r:
                    print(f"{name:<22}{M:>3} {tag:<13}{split:>8}{r['us']:>7.2f}{r['cublas_us']:>7.2f}"
                          f"{r['roofline_us']:>6.2f}{r['x_cublas']:>6.2f}{r['GBps']:>6.0f}"
                          f"{100 * r['frac_roofline']:>6.0f}{r['rel_err']:>9.1e}{r['bitwise_frac']:>7.4f}"
                          f"{r['max_ulps']:>5.0f}" + ("" if r["correct"] else "  WRONG"), flush=True)
                else:
                    print(f"{name:<22}{M:>3} {tag:<13} FAILED {r.get('error', '')[:300]}", flush=True)
            write_results(args.out, payload)
            torch.cuda.empty_cache()
    payload["geomean_x_cublas_by_M"] = summary([r for r in rows if r.get("variant") != "all"])
    best = {}
    for r in rows:
        if r.get("correct") and "us" in r:
            k = f"{r['shape']} M={r['M']}"
            if k not in best or r["us"] < best[k][1]:
                best[k] = (r["variant"], r["us"], r["x_cublas"])
    payload["best_per_row"] = best
    payload["seconds"] = time.time() - t0
    path = write_results(args.out, payload)
    print("\nper M, geomean x cuBLAS over shapes (variants with every row correct), best first:")
    for M, scores in payload["geomean_x_cublas_by_M"].items():
        print(f"  M={M:<3} " + "  ".join(f"{v} {s:.2f}" for v, s in scores.items()))
    print("\nfastest correct variant per row:")
    for k, (v, us, xc) in best.items():
        print(f"  {k:<32} {v:<13} {us:7.2f} us  x{xc:.2f}")
    bad = [r for r in rows if not r.get("correct")]
    print(f"\nwrote {path} in {payload['seconds']:.0f} s; {len(bad)} rows failed or wrong; "
          f"{len(payload['skipped'])} (shape, M) skipped by the budget")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
