"""MXFP8 fused-MoE tiles shorter than 128 rows with grouped blocks (`GROUP`): the first block of each GROUP
consecutive blocks of an expert's run multiplies all of them, dequantizing each weight tile once for the group
instead of once per block. Uneven routing gives busy experts several blocks (the engine's decode steps on dummy
weights: busiest expert 3-6x the mean), each of which dequantized the expert's weights again.

Cases: moonlight-16b-a3b and deepseek-v3 at the token counts whose tiles are 16 / 32 / 64 rows, uniform and uneven
(`benchmarks.moe.routed_tokens`' skew). Variants per tile height: the shipped config, neighbours with GROUP 1 / 2 / 4
and other widths / warps, and the bf16 experts' shipped tiles (the same-run baseline MXFP8 should not lose to). Per
row: one CUDA graph of four calls over different routings, median replay, per call. Every variant is checked in the
same run: against `experts_ref` (relative error) and for bit-equality with the shipped config (GROUP changes no bit:
each block keeps its own accumulator over the same K steps; other warps may change the MMA's order).
`--baseline-module PATH`: also time an older `triton_moe.py` (loaded as a sibling module) on the shipped config.

    python benchmarks/moe_group_sweep.py [--baseline-module PATH] [--out NAME]    (GPU, ~2 min)
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from benchmarks.moe import experts_floor_us, routed_tokens, shape_experts  # noqa: E402
from mxroll.precision import GemmConfig  # noqa: E402
from mxroll.precision.kernels.moe_config import moe_config  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton  # noqa: E402
from mxroll.precision.moe import experts_ref  # noqa: E402

CASES = {"moonlight-16b-a3b": [(128, 0), (128, 0.9), (256, 0), (256, 0.9), (512, 0), (512, 0.9)],
         "deepseek-v3": [(256, 0), (512, 0), (512, 0.9), (1024, 0), (1024, 0.9)]}
VARIANTS = {  # by the shipped tile height: name -> overrides of the shipped config
    16: {"g2": dict(GROUP=2), "g4 n64": dict(GROUP=4, BN=64)},
    32: {"g2 n64": dict(GROUP=2, BN=64), "bm16 g2": dict(BM=16, GROUP=2), "bm16 g4 n64": dict(BM=16, GROUP=4, BN=64)},
    64: {"g2 n64": dict(GROUP=2, BN=64), "bm32": dict(BM=32), "bm32 n64": dict(BM=32, BN=64),
         "bm32 g2 n64": dict(BM=32, GROUP=2, BN=64), "bm16 g2": dict(BM=16, GROUP=2),
         "bm16 g4 n64": dict(BM=16, GROUP=4, BN=64)},
}


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("mxroll.precision.kernels._baseline_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fused_moe_triton


def sweep(name: str, cases, bw: float, baseline=None) -> list[dict]:
    E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
    rows = []
    for T, skew in cases:
        sets = [routed_tokens(T, D, E, K, g, skew) for _ in range(4)]
        x, ids, w = sets[0]
        shipped = moe_config(T, True, K, E, D)

        def run(cfg, fn=fused_moe_triton, w13=w13q, w2=w2q):
            us = time_graph([lambda s=s: fn(s[0], s[1], s[2], w13, w2, "w8a8", config=cfg) for s in sets]) * 1e6
            return us, fn(x, ids, w, w13, w2, "w8a8", config=cfg)

        ref = experts_ref(x, ids, w, w13q, w2q, GemmConfig("w8a8")).float()
        t_ship, y_ship = run(shipped)
        configs = {f"{k}": dict(shipped, **v) for k, v in VARIANTS[shipped["BM"]].items()}
        res = {"shipped": t_ship}
        checks = {"shipped": dict(rel_err=((y_ship.float() - ref).norm() / ref.norm()).item(), bits=True)}
        if baseline is not None:
            res["baseline code"], y = run(shipped, baseline)
            checks["baseline code"] = dict(rel_err=((y.float() - ref).norm() / ref.norm()).item(),
                                           bits=torch.equal(y, y_ship))
        for k, cfg in configs.items():
            res[k], y = run(cfg)
            checks[k] = dict(rel_err=((y.float() - ref).norm() / ref.norm()).item(), bits=torch.equal(y, y_ship),
                             same_twice=torch.equal(y, fused_moe_triton(x, ids, w, w13q, w2q, "w8a8", config=cfg)))
        res["bf16 experts"], _ = run(moe_config(T, False, K, E, D), w13=w13b, w2=w2b)
        touched = sum(int(torch.unique(s[1]).numel()) for s in sets) / len(sets)
        floor = experts_floor_us(touched, T, D, F_, True, bw)
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        ok = {k: v for k, v in res.items() if k == "bf16 experts" or checks[k]["rel_err"] < 1e-2}
        best = min((k for k in ok if k != "bf16 experts"), key=ok.get)
        print(f"{name} T={T} {'uneven' if skew else 'uniform'} BM={shipped['BM']} (rows/expert max {int(counts.max())}"
              f" mean {T * K / E:.0f}; floor {floor:.0f} us): " + "  ".join(
                  f"{k} {v:.1f}" + ("" if k == "bf16 experts" or checks[k]["bits"] else "*")
                  + ("" if k in ok else " BAD") for k, v in res.items())
              + f"  | best {best} {t_ship / res[best]:.3f}x shipped, {res['bf16 experts'] / res[best]:.3f}x bf16",
              flush=True)
        rows.append(dict(shape=name, tokens=T, skew=skew, BM=shipped["BM"], shipped=shipped, configs=configs, us=res,
                         checks=checks, floor_us=floor, frac_of_floor={k: floor / v for k, v in res.items()},
                         max_rows_per_expert=int(counts.max()), mean_rows_per_expert=T * K / E, best=best))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=list(CASES))
    ap.add_argument("--baseline-module", default=None)
    ap.add_argument("--out", default="moe_group_sweep")
    args = ap.parse_args()
    env = environment()
    bw = measure_copy_bandwidth()
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s; us per call (* = not the shipped config's bits)", flush=True)
    baseline = load_baseline(args.baseline_module) if args.baseline_module else None
    rows = []
    for name in args.shapes:
        rows += sweep(name, CASES[name], bw, baseline)
        torch.cuda.empty_cache()
    path = write_results(args.out, {"benchmark": "moe_group_sweep", **env, "copy_GBps": bw / 1e9,
                                    "baseline_module": args.baseline_module, "rows": rows})
    print(f"wrote {path}")
    if not all(c["rel_err"] < 1e-2 for r in rows for c in r["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
