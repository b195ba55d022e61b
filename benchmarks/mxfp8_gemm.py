"""MXFP8 GEMM (Triton sm90) vs cuBLAS bf16 on the dequantized weight, per path and variant; and
the fused RMSNorm + MXFP8 quantization vs torch RMSNorm followed by a separate quantize pass.

Shapes: the dense projections of the moonlight-16b-a3b and deepseek-v3 presets (kv_a_proj's N=576
included); M (tokens) from decode to prefill. Every row is checked against the torch reference in
the same run (fresh random inputs, output memory poisoned with NaN first) and timed per call inside
one CUDA graph of back-to-back launches over inputs rotated past L2 (events around the replays,
after warm-up). Per row: time, TFLOP/s, GB/s (fp8 W + scales + bf16 x + bf16 y, each once), ratio
vs cuBLAS bf16, error vs the reference, the path and config that ran. Mid M (17..1024) measures
every variant of the mid kernel side by side (bf16 / fp8 MMA, plain / swapped operands) plus the
previous fused config and dequant+cuBLAS, then prints the fastest correct variant per M. A row
that fails is recorded with its error and the run goes on; the JSON is rewritten after every row.

    python benchmarks/mxfp8_gemm.py [--quick] [--out NAME] [--shapes PREFIX,...] [--ms 64,256] [--no-norm]
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (copies_for, environment, measure_bf16_peak, measure_copy_bandwidth,  # noqa: E402
                               time_graph, write_results)
from mxroll.precision.kernels import triton_mxfp8_gemm_mid as mid  # noqa: E402
from mxroll.precision.kernels.mxfp8_gemm import fake_quant, mxfp8_gemm_ref  # noqa: E402
from mxroll.precision.kernels.rmsnorm_mxfp8 import normed_step_mismatch, rmsnorm_ref  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import (MID_MAX_M, MID_MIN_M, act_qdq_triton,  # noqa: E402
                                                        act_quant_triton, fused_config, mxfp8_gemm_triton,
                                                        pick_config)
from mxroll.precision.kernels.triton_rmsnorm_mxfp8 import rmsnorm_mxfp8_triton  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor, quantize  # noqa: E402

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
QUICK_SHAPES = ["moonlight.q_proj", "moonlight.kv_a_proj", "moonlight.mlp_down", "dsv3.kv_a_proj", "dsv3.q_b_proj"]
MS = [1, 32, 64, 128, 256, 512, 1024, 4096]
QUICK_MS = [1, 64, 256, 1024, 4096]
MID_VARIANTS = {  # name: config factory (M, N, K) -> config
    "mid_bf16": lambda M, N, K: mid.mid_config(M, N, K, "bf16", False),
    "mid_bf16_swap": lambda M, N, K: mid.mid_config(M, N, K, "bf16", True),
    "mid_fp8": lambda M, N, K: mid.mid_config(M, N, K, "fp8", False),
    "mid_fp8_swap": lambda M, N, K: mid.mid_config(M, N, K, "fp8", True),
    "fused_prev": lambda M, N, K: fused_config(M, N, K),
    "dequant": lambda M, N, K: dict(PATH="dequant"),
}
NORM_DIMS = {"moonlight.hidden": 2048, "dsv3.hidden": 7168, "dsv3.q_lora": 1536}
NORM_TS = [1, 64, 256, 1024, 4096]
QUICK_NORM_TS = [1, 256, 4096]


def errors(y, ref):
    """(‖y - ref‖ / ‖ref‖, max |y - ref| / max |ref|, all finite)."""
    d = (y.float() - ref.float())
    r = ref.float()
    return ((d.norm() / r.norm().clamp_min(1e-30)).item(), (d.abs().max() / r.abs().max().clamp_min(1e-30)).item(),
            bool(torch.isfinite(y).all()))


def poisoned(fn, shape, dtype):
    """Run fn right after freeing a NaN block of its output's size, so an unwritten output element
    shows up as NaN (the caching allocator hands the same block back)."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    return fn()


def compiled(jit_fn) -> dict:
    """id -> CompiledKernel of every specialization of a Triton kernel compiled so far."""
    out = {}
    try:
        for cache in jit_fn.device_caches.values():
            for k in cache[0].values():
                out[id(k)] = k
    except Exception:  # noqa: BLE001 - diagnostics only; Triton internals differ between versions
        pass
    return out


def describe(k) -> dict:
    """Registers, spills, shared memory and which MMA instructions the kernel uses (PTX)."""
    try:
        ptx = k.asm.get("ptx", "")
        return {"regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
                "num_warps": k.metadata.num_warps, "wgmma": ptx.count("wgmma.mma_async"),
                "mma_sync": ptx.count("mma.sync")}
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def gemm_rows(name, N, K, M, bw, peak):
    """cuBLAS bf16 baseline once, then each variant that applies at this M."""
    g = torch.Generator(device="cuda").manual_seed(N * 31 + K * 7 + M)
    w_hp = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float32).mul_(K ** -0.5).to(torch.bfloat16)
    w = MXFP8Tensor.quantize(w_hp)
    del w_hp
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
    ref = mxfp8_gemm_ref(x, w, "w8a8", "rceil")
    w_bytes = N * K + N * K // 32
    io_bytes = w_bytes + 2 * M * K + 2 * M * N
    flops = 2 * M * N * K
    wd = w.dequantize(torch.bfloat16)
    nb = copies_for(2 * N * K + 2 * M * K)
    wbs, xbs = [wd.clone() for _ in range(nb)], [x.clone() for _ in range(nb)]
    t_cub = time_graph([(lambda a=a, b=b: torch.nn.functional.linear(a, b)) for a, b in zip(xbs, wbs)])
    del wbs, xbs
    n = copies_for(w_bytes + 2 * M * K)
    ws = [MXFP8Tensor(w.data.clone(), w.scale.clone()) for _ in range(n)]
    xs = [x.clone() for _ in range(n)]
    variants = {"picked": pick_config(M, N, K)}
    if MID_MIN_M <= M <= MID_MAX_M:
        variants.update({v: f(M, N, K) for v, f in MID_VARIANTS.items()})
    base = {"shape": name, "N": N, "K": K, "M": M, "act_mode": "w8a8", "weight_MB": w_bytes / 1e6,
            "cublas_bf16_us": t_cub * 1e6, "cublas_tflops": flops / t_cub / 1e12,
            "floor_us": max(io_bytes / bw, flops / peak) * 1e6}
    rows = []
    for vname, cfg in variants.items():
        row = dict(base, variant=vname, path=cfg["PATH"], config=dict(cfg))
        try:
            before = compiled(mid._mid_kernel)
            y = poisoned(lambda: mxfp8_gemm_triton(x, w, "w8a8", config=cfg), (M, N), x.dtype)
            torch.cuda.synchronize()
            rel, mx, finite = errors(y, ref)
            row.update(rel_err=rel, max_rel_err=mx, bitwise_equal_frac=(y == ref).float().mean().item(),
                       correct=finite and rel < (1e-2 if cfg.get("MMA") == "fp8" else 5e-3))
            new = [k for i, k in compiled(mid._mid_kernel).items() if i not in before]
            if new:
                row["compiled"] = [describe(k) for k in new]
            t = time_graph([(lambda a=a, b=b: mxfp8_gemm_triton(a, b, "w8a8", config=cfg)) for a, b in zip(xs, ws)])
            row.update(us=t * 1e6, tflops=flops / t / 1e12, GBps=io_bytes / t / 1e9, x_cublas=t_cub / t,
                       frac_of_roofline=base["floor_us"] / 1e6 / t)
        except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the others
            row.update(correct=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        rows.append(row)
    del ws, xs
    return rows


def norm_rows(name, D, T):
    """Fused RMSNorm + MXFP8 vs torch RMSNorm then the GEMM's separate activation pass."""
    g = torch.Generator(device="cuda").manual_seed(D + T)
    x = (torch.randn(T, D, device="cuda", generator=g) * 4).to(torch.bfloat16)
    wn = (1 + 0.2 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    eps = 1e-6
    n = copies_for(2 * T * D * 3)
    xs = [x.clone() for _ in range(n)]
    variants = {
        "torch_rmsnorm": lambda a: rmsnorm_ref(a, wn, eps),
        "torch_rmsnorm+act_qdq": lambda a: act_qdq_triton(rmsnorm_ref(a, wn, eps)),
        "torch_rmsnorm+act_quant": lambda a: act_quant_triton(rmsnorm_ref(a, wn, eps)),
        "fused_normed+bytes": lambda a: rmsnorm_mxfp8_triton(a, wn, eps),
        "fused_normed+qdq": lambda a: rmsnorm_mxfp8_triton(a, wn, eps, quant=False, qdq=True),
        "fused_qdq_only": lambda a: rmsnorm_mxfp8_triton(a, wn, eps, normed=False, quant=False, qdq=True),
    }
    rows = []
    yr = rmsnorm_ref(x, wn, eps)
    for vname, fn in variants.items():
        row = {"norm": name, "D": D, "T": T, "variant": vname}
        try:
            if vname.startswith("fused"):
                y, q, d = poisoned(lambda: fn(x), (T, D), x.dtype)
                torch.cuda.synchronize()
                ok = True
                if y is not None:
                    # another fp32 sum order may round a normalized value one step the other way (which
                    # the weight can stretch past one ulp of the output): each output must be the weight
                    # times a neighbour of the reference's normalized value
                    ok &= not bool(normed_step_mismatch(y, x, wn, eps).any())
                    row["normed_ulp_diff_frac"] = (y != yr).float().mean().item()
                    if q is not None:
                        data, scale = quantize(y)
                        ok &= torch.equal(q.data.view(torch.uint8), data.view(torch.uint8)) and torch.equal(q.scale,
                                                                                                            scale)
                if d is not None and y is not None:
                    ok &= torch.equal(d, fake_quant(y, "rceil"))
                elif d is not None:  # normed not emitted: compare with the reference's, ulp flips allowed
                    ok &= bool((d == fake_quant(yr, "rceil")).float().mean() > 0.99)
                row["correct"] = ok
            else:
                fn(x)
                row["correct"] = True
            t = time_graph([(lambda a=a: fn(a)) for a in xs])
            row.update(us=t * 1e6)
        except Exception as e:  # noqa: BLE001
            row.update(correct=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "torch_rmsnorm+act_qdq" and "us" in r), None)
    for r in rows:
        if base and "us" in r:
            r["x_torch_plus_pass"] = base["us"] / r["us"]
    return rows


def best_by_m(rows) -> dict:
    """Per M: each variant's geometric-mean ratio vs cuBLAS over the shapes where all its rows are correct."""
    out = {}
    for M in sorted({r["M"] for r in rows}):
        per = {}
        for r in rows:
            if r["M"] == M and r["variant"] != "picked":
                per.setdefault(r["variant"], []).append(r)
        scores = {v: math.exp(sum(math.log(r["x_cublas"]) for r in rs) / len(rs)) for v, rs in per.items()
                  if all(r.get("correct") and "x_cublas" in r for r in rs)}
        if scores:
            out[M] = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 shapes, M in 1/64/256/1024/4096, fewer norm rows (~3 min)")
    ap.add_argument("--out", default="mxfp8_gemm")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names or prefixes (e.g. moonlight)")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--no-norm", action="store_true", help="skip the RMSNorm + quantization rows")
    args = ap.parse_args()
    env = environment()
    bw, peak = measure_copy_bandwidth(), measure_bf16_peak()
    print(f"{env['device']} torch {env['torch']} triton {env['triton']}: copy {bw / 1e9:.0f} GB/s, "
          f"bf16 MMA {peak / 1e12:.0f} TFLOP/s", flush=True)
    names = QUICK_SHAPES if args.quick else list(SHAPES)
    if args.shapes:
        pre = args.shapes.split(",")
        names = [s for s in SHAPES if any(s == p or s.startswith(p) for p in pre)]
    ms = [int(m) for m in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    payload = {"benchmark": "mxfp8_gemm", **env, "copy_GBps": bw / 1e9, "bf16_peak_TFLOPs": peak / 1e12,
               "rows": [], "norm_rows": []}
    rows = payload["rows"]
    print(f"{'shape':<20}{'M':>6} {'variant':<15}{'path':>8}{'rel_err':>9}{'max_err':>9}{'us':>9}{'cublas':>9}"
          f"{'x_cub':>7}{'TF/s':>6}{'GB/s':>6}")
    for name in names:
        N, K = SHAPES[name]
        for M in ms:
            try:
                new = gemm_rows(name, N, K, M, bw, peak)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in the baseline
                new = [{"shape": name, "N": N, "K": K, "M": M, "variant": "all", "correct": False,
                        "error": f"{type(e).__name__}: {e}"[:2000]}]
            rows.extend(new)
            for r in new:
                if "us" in r:
                    print(f"{name:<20}{M:>6} {r['variant']:<15}{r['path']:>8}{r['rel_err']:>9.1e}{r['max_rel_err']:>9.1e}"
                          f"{r['us']:>9.1f}{r['cublas_bf16_us']:>9.1f}{r['x_cublas']:>7.2f}{r['tflops']:>6.0f}"
                          f"{r['GBps']:>6.0f}" + ("" if r["correct"] else "  WRONG"), flush=True)
                else:
                    print(f"{name:<20}{M:>6} {r['variant']:<15} FAILED {r.get('error', '')[:200]}", flush=True)
            write_results(args.out, payload)
            torch.cuda.empty_cache()
    if not args.no_norm:
        print(f"\n{'norm':<18}{'T':>6} {'variant':<24}{'us':>8}{'x_sep':>7}")
        for name, D in NORM_DIMS.items():
            for T in (QUICK_NORM_TS if args.quick else NORM_TS):
                new = norm_rows(name, D, T)
                payload["norm_rows"].extend(new)
                for r in new:
                    print(f"{name:<18}{T:>6} {r['variant']:<24}" + (
                        f"{r['us']:>8.1f}{r.get('x_torch_plus_pass', 0):>7.2f}" + ("" if r["correct"] else "  WRONG")
                        if "us" in r else f" FAILED {r.get('error', '')[:200]}"), flush=True)
                write_results(args.out, payload)
    payload["best_by_M"] = best_by_m([r for r in rows if "M" in r and "variant" in r])
    path = write_results(args.out, payload)
    print("\nper M, geomean x cuBLAS over shapes (all rows correct), best first:")
    for M, scores in payload["best_by_M"].items():
        print(f"  M={M:<5} " + "  ".join(f"{v} {s:.2f}" for v, s in scores.items()))
    bad = [r for r in rows + payload["norm_rows"] if not r.get("correct")]
    print(f"wrote {path}; {len(bad)} rows failed or wrong")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
