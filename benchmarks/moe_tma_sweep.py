"""MXFP8 fused-MoE tiles at 64..4096 tokens: the register-loaded 64 x 128 weight tiles that moe_config picked until
2026-12-01 ("previous") against tensor-descriptor (TMA) weight loads with other tile widths, at the same tile height
(rows per expert decide it, moe_tile_sweep.py), moonlight-16b-a3b and deepseek-v3 shapes, uniform and (moonlight)
uneven routing (`benchmarks.moe.routed_tokens`). "shipped" is today's moe_config. Per row: one CUDA graph of four
calls over different routings (two above 1024 tokens), median replay, per call; each candidate's output against
the previous config's (relative error; > 1e-3 is flagged BAD and never picked).

    python benchmarks/moe_tma_sweep.py    (GPU, ~1 min)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, time_graph, write_results  # noqa: E402
from benchmarks.moe import routed_tokens, shape_experts  # noqa: E402
from mxroll.precision.kernels.moe_config import moe_config  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton  # noqa: E402

CASES = {"moonlight-16b-a3b": [(64, 0), (128, 0), (256, 0), (256, 0.9), (512, 0), (1024, 0), (1024, 0.9), (2048, 0),
                               (4096, 0)],
         "deepseek-v3": [(64, 0), (128, 0), (256, 0), (512, 0), (1024, 0), (2048, 0), (4096, 0)]}
SHORT = {"n128k64w4": dict(BN=128, BK=64, num_warps=4), "n64k64w4": dict(BN=64, BK=64, num_warps=4),
         "n128k64w8": dict(BN=128, BK=64, num_warps=8), "n128k128w4": dict(BN=128, BK=128, num_warps=4),
         "n128k64w4s4": dict(BN=128, BK=64, num_warps=4, num_stages=4)}
TALL = {"n64k64w8": dict(BN=64, BK=64, num_warps=8), "n128k64w8": dict(BN=128, BK=64, num_warps=8),
        "n128k64w8s4": dict(BN=128, BK=64, num_warps=8, num_stages=4), "n64k128w8": dict(BN=64, BK=128, num_warps=8)}


def previous(bm: int) -> dict:
    if bm < 128:
        return dict(BM=bm, BN=64, BK=128, num_warps=4, num_stages=3)
    return dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3)


def sweep_shape(name: str, cases) -> list[dict]:
    E, K, D, F_, g, (_, _, w13q, w2q) = shape_experts(name)
    rows = []
    for T, skew in cases:
        sets = [routed_tokens(T, D, E, K, g, skew) for _ in range(4 if T <= 1024 else 2)]
        x, ids, w = sets[0]

        def run(cfg):
            us = time_graph([lambda s=s: fused_moe_triton(s[0], s[1], s[2], w13q, w2q, "w8a8", config=cfg)
                             for s in sets]) * 1e6
            return us, fused_moe_triton(x, ids, w, w13q, w2q, "w8a8", config=cfg).float()

        shipped = moe_config(T, True, K, E)
        bm = shipped["BM"]
        t_prev, y_prev = run(previous(bm))
        res = {"previous": t_prev}
        errs = {}
        configs = {"shipped": shipped}
        configs.update({f"{k} tma": {"BM": bm, "num_stages": 3, "USE_TMA": True, **c}
                        for k, c in (SHORT if bm < 128 else TALL).items()})
        for k, cfg in configs.items():
            res[k], y = run(cfg)
            errs[k] = ((y - y_prev).norm() / y_prev.norm()).item()
        ok = {k: v for k, v in res.items() if errs.get(k, 0.0) <= 1e-3}
        best = min(ok, key=ok.get)
        print(f"{name} T={T} {'uneven' if skew else 'uniform'} BM={bm}: " + "  ".join(
            f"{k} {v:.1f}" + (" BAD" if errs.get(k, 0.0) > 1e-3 else "") for k, v in res.items())
            + f"  | shipped {t_prev / res['shipped']:.3f}x previous, best {best}", flush=True)
        rows.append(dict(shape=name, tokens=T, skew=skew, BM=bm, us=res, rel_err_vs_previous=errs, best=best,
                         shipped_speedup=t_prev / res["shipped"]))
    return rows


def main():
    env = environment()
    rows = []
    for name, cases in CASES.items():
        rows += sweep_shape(name, cases)
        torch.cuda.empty_cache()
    path = write_results("moe_tma_sweep", {"benchmark": "moe_tma_sweep", **env, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
