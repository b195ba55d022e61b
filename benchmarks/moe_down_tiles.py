"""Fused-MoE down projection tile width: the down kernel's N tile (`BN_DOWN`) apart from gate_up's, MXFP8 and bf16
experts, moonlight-16b-a3b and deepseek-v3 shapes, 64..8192 tokens (the tile tiers only: no dequantize-once
workspace). "previous" is moe_config before BN_DOWN (one N tile for both kernels); "shipped" is today's moe_config.
Per row: one CUDA graph of four calls over different routings (two above 1024 tokens), median replay, per call; every
candidate's output compared bit for bit with the previous config's (the N tile does not change any element's
accumulation order), a candidate that differs is flagged BAD and never picked.

    python benchmarks/moe_down_tiles.py    (GPU, ~2 min)
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

TOKENS = {"moonlight-16b-a3b": (64, 128, 256, 512, 1024, 2048, 4096, 8192),
          "deepseek-v3": (64, 128, 256, 512, 1024, 2048, 4096, 8192)}


def candidates(prev: dict) -> dict:
    """Down N tiles around the previous config (gate_up's tile kept), and for 128-row tiles gate_up at N 128."""
    bn = prev["BN"]
    out = {f"down n{n}": {**prev, "BN_DOWN": n} for n in (64, 128, 256) if n != bn}
    if prev["BM"] == 128:
        out["gate_up n128 down n128"] = {**prev, "BN": 128, "BN_DOWN": 128}
        out["down n128 s4"] = {**prev, "BN_DOWN": 128, "num_stages": 4}
    return out


def sweep_shape(name: str) -> list[dict]:
    E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
    rows = []
    for T in TOKENS[name]:
        sets = [routed_tokens(T, D, E, K, g) for _ in range(4 if T <= 1024 else 2)]
        x, ids, w = sets[0]
        for quant, (w13, w2) in (("mxfp8", (w13q, w2q)), ("bf16", (w13b, w2b))):
            def run(cfg):
                us = time_graph([lambda s=s: fused_moe_triton(s[0], s[1], s[2], w13, w2, "w8a8", config=cfg)
                                 for s in sets]) * 1e6
                return us, fused_moe_triton(x, ids, w, w13, w2, "w8a8", config=cfg)

            shipped = moe_config(T, quant == "mxfp8", K, E, D)
            if shipped.get("GEMV"):
                continue
            prev = {k: v for k, v in shipped.items() if k != "BN_DOWN"}
            t_prev, y_prev = run(prev)
            res, same = {"previous": t_prev}, {}
            configs = {"shipped": shipped, **candidates(prev)}
            for k, cfg in configs.items():
                try:
                    res[k], y = run(cfg)
                    same[k] = bool(torch.equal(y, y_prev))
                except Exception as ex:  # a tile that does not compile: reported, not picked
                    same[k] = f"failed: {type(ex).__name__}: {str(ex)[:160]}"
            ok = {k: v for k, v in res.items() if same.get(k, True) is True}
            best = min(ok, key=ok.get)
            print(f"{name} {quant} T={T} BM={shipped['BM']}: " + "  ".join(
                f"{k} {v:.1f}" + ("" if same.get(k, True) is True else " BAD") for k, v in res.items())
                + f"  | shipped {t_prev / res['shipped']:.3f}x previous, best {best}", flush=True)
            rows.append(dict(shape=name, quant=quant, tokens=T, previous=prev, shipped=shipped, us=res,
                             bit_equal_to_previous=same, best=best, shipped_speedup=t_prev / res["shipped"]))
    return rows


def main():
    env = environment()
    rows = []
    for name in TOKENS:
        rows += sweep_shape(name)
        torch.cuda.empty_cache()
    path = write_results("moe_down_tiles", {"benchmark": "moe_down_tiles", **env, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
