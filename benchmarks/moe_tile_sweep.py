"""Fused MoE tile height (BM, the rows of one expert a program multiplies) against the average number of rows
per expert, r = tokens * top_k / experts, for MXFP8 and bf16 experts on moonlight-16b-a3b (64 experts, top-6)
and deepseek-v3 (256 experts, top-8) shapes. moe_config picks tiles by r: the same token count gives 4x more
rows per expert on moonlight than on deepseek-v3, and a tile much taller than r multiplies padding while one
much shorter dequantizes (MXFP8) or re-reads each weight tile once per extra block.

Every config is checked in the same run (error against `experts_ref`, determinism); timing is one CUDA graph of
four calls on four different routings, median replay; floor_us: distinct experts' bytes over the measured copy
bandwidth, per call.

    python benchmarks/moe_tile_sweep.py [--shapes ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (environment, measure_copy_bandwidth, rel_err, time_graph,  # noqa: E402
                               write_results)
from benchmarks.moe import experts_floor_us, routing_sets, shape_experts  # noqa: E402
from mxroll.precision import GemmConfig  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton, moe_config  # noqa: E402
from mxroll.precision.moe import experts_ref  # noqa: E402

ROUTINGS = 4
TOKENS = {"moonlight-16b-a3b": [128, 256, 512, 1024, 2048], "deepseek-v3": [128, 256, 512, 1024, 2048, 4096]}
TILES = {"bm16": dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3),
         "bm32": dict(BM=32, BN=64, BK=128, num_warps=4, num_stages=3),
         "bm64": dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=3),
         "bm128_bn64": dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
         "bm128_bn128": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)}


def tiles(r: float, quant: bool) -> dict:
    """Candidates around r (a tile more than 4x taller or shorter than r is not tried)."""
    out = {"shipped": None}
    for name, cfg in TILES.items():
        if name == "bm128_bn128" and quant:  # register dequantization of two 128-wide tiles: spills
            continue
        if cfg["BM"] <= 4 * r and cfg["BM"] >= r / 4:
            out[name] = cfg
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=list(TOKENS))
    args = ap.parse_args()
    env = environment()
    bw = measure_copy_bandwidth()
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s; us per call", flush=True)
    rows, best = [], []
    for name in args.shapes:
        E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
        for T in TOKENS[name]:
            r_avg = T * K / E
            sets, touched = routing_sets(T, D, E, K, g, ROUTINGS)
            x0, ids0, tw0 = sets[0]
            for quant, (a, b) in (("mxfp8", (w13q, w2q)), ("bf16", (w13b, w2b))):
                ref = experts_ref(x0, ids0, tw0, a, b, GemmConfig("w8a8"))
                floor_us = experts_floor_us(touched, T, D, F_, quant == "mxfp8", bw)
                line = []
                for vname, cfg in tiles(r_avg, quant == "mxfp8").items():
                    try:
                        y = fused_moe_triton(x0, ids0, tw0, a, b, "w8a8", config=cfg)
                        again = fused_moe_triton(x0, ids0, tw0, a, b, "w8a8", config=cfg)
                        t = time_graph([lambda xs=xs, a=a, b=b, c=cfg: fused_moe_triton(*xs, a, b, "w8a8", config=c)
                                        for xs in sets])
                    except Exception as ex:  # noqa: BLE001 - a config that fails is reported, not fatal
                        print(f"  {name} T={T} {quant} {vname}: failed {type(ex).__name__}: {str(ex)[:160]}",
                              flush=True)
                        continue
                    row = dict(shape=name, T=T, rows_per_expert=r_avg, experts=quant, variant=vname,
                               config=cfg or moe_config(T, quant == "mxfp8", K, E), us=t * 1e6, floor_us=floor_us,
                               err_ref=rel_err(y, ref), deterministic=bool(torch.equal(y, again)))
                    row["ok"] = row["deterministic"] and row["err_ref"] < 1e-2 and bool(torch.isfinite(y).all())
                    rows.append(row)
                    line.append(row)
                good = [x for x in line if x["ok"]]
                top = min(good, key=lambda x: x["us"])
                ship = next(x for x in line if x["variant"] == "shipped")
                best.append(dict(shape=name, T=T, rows_per_expert=r_avg, experts=quant, best=top["variant"],
                                 best_us=top["us"], shipped_us=ship["us"], floor_us=floor_us))
                print(f"{name:<18}T={T:<5}r={r_avg:<6.1f}{quant:<6} floor {floor_us:7.1f}  " + "  ".join(
                    f"{x['variant']}={x['us']:.1f}" + ("" if x["ok"] else "!BAD") for x in line)
                    + f"  -> {top['variant']} ({ship['us'] / top['us']:.2f}x shipped)", flush=True)
        del w13b, w2b, w13q, w2q
        torch.cuda.empty_cache()
    print("\nbest per case; bf16/mxfp8 = bf16 experts' best time over MXFP8's best")
    for q in best:
        if q["experts"] == "mxfp8":
            b = next(x for x in best if x["shape"] == q["shape"] and x["T"] == q["T"] and x["experts"] == "bf16")
            print(f"  {q['shape']:<18}T={q['T']:<5}r={q['rows_per_expert']:<6.1f} "
                  f"mxfp8 {q['best']:<12}{q['best_us']:8.1f}"
                  f"  bf16 {b['best']:<12}{b['best_us']:8.1f}  bf16/mxfp8 {b['best_us'] / q['best_us']:.2f}x")
    path = write_results("moe_tile_sweep", {"benchmark": "moe_tile_sweep", **env, "copy_GBps": bw / 1e9,
                                            "routings_per_graph": ROUTINGS, "rows": rows, "best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
