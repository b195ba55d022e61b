"""MXFP8 fused MoE at prefill sizes: the MXFP8 tiles `moe_config` picks ("shipped"), 256-row and other tile
variants, and dequantize-once (every expert dequantized into a bf16 workspace by `dequant_triton`, then the bf16
tiles: "dequant + bf16 tiles" = the pass + "bf16 on dequantized"), against bf16 experts, same run. Behind
`moe_config.dequant_once` (results/moe_prefill_tiles_20261201_*.json). Per row: one CUDA graph of two calls over
different routings, median replay, per call; each variant's output compared bit for bit with the shipped tiles'.

    python benchmarks/moe_prefill_tiles.py moonlight-16b-a3b|deepseek-v3    (GPU; deepseek-v3 needs ~100 GB)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, time_graph, write_results  # noqa: E402
from benchmarks.moe import routed_tokens, shape_experts  # noqa: E402
from mxroll.precision.kernels.moe_config import moe_config  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import dequant_triton  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

TOKENS = {"moonlight-16b-a3b": (2048, 4096, 8192, 16384), "deepseek-v3": (2048, 4096, 8192)}
VARIANTS = {"m256n64w8": dict(BM=256, BN=64, BK=64, num_warps=8, num_stages=3, USE_TMA=True),
            "m256n64w8s2": dict(BM=256, BN=64, BK=64, num_warps=8, num_stages=2, USE_TMA=True),
            "m256n32w8": dict(BM=256, BN=32, BK=64, num_warps=8, num_stages=3, USE_TMA=True),
            "m128n64w4": dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=3, USE_TMA=True)}


def main(name: str) -> None:
    env = environment()
    E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
    d13, d2 = torch.empty_like(w13b).view(-1, D), torch.empty_like(w2b).view(-1, F_)
    m13 = MXFP8Tensor(w13q.data.view(-1, D), w13q.scale.view(-1, D // 32))
    m2 = MXFP8Tensor(w2q.data.view(-1, F_), w2q.scale.view(-1, F_ // 32))

    def dequant():
        dequant_triton(m13, out=d13)
        dequant_triton(m2, out=d2)

    deq_us = time_graph([dequant]) * 1e6
    exact = all(bool(torch.equal(d13.view_as(w13b)[sl], MXFP8Tensor(w13q.data[sl], w13q.scale[sl]).dequantize()))
                for sl in (slice(0, 4), slice(-4, None)))  # the last experts sit past 2^31 elements on deepseek-v3
    rows = []
    for T in TOKENS[name]:
        sets = [routed_tokens(T, D, E, K, g) for _ in range(2)]
        x, ids, w = sets[0]

        def run(w13, w2, cfg):
            return time_graph([lambda s=s: fused_moe_triton(s[0], s[1], s[2], w13, w2, "w8a8", config=cfg)
                               for s in sets]) * 1e6

        y0 = fused_moe_triton(x, ids, w, w13q, w2q, "w8a8")
        res, equal = {"shipped": run(w13q, w2q, None)}, {}
        for k, cfg in VARIANTS.items():
            res[k] = run(w13q, w2q, cfg)
            equal[k] = bool(torch.equal(fused_moe_triton(x, ids, w, w13q, w2q, "w8a8", config=cfg), y0))
        res["bf16"] = run(w13b, w2b, None)
        res["bf16 on dequantized"] = run(d13.view_as(w13b), d2.view_as(w2b), None)
        res["dequant pass"] = deq_us
        res["dequant + bf16 tiles"] = deq_us + res["bf16 on dequantized"]
        print(f"{name} T={T} shipped BM={moe_config(T, True, K, E)['BM']}: "
              + "  ".join(f"{k} {v:.1f}" for k, v in res.items()) + f" | bits {equal} | dequant exact {exact}",
              flush=True)
        rows.append(dict(shape=name, tokens=T, us=res, bits_equal_shipped=equal, dequant_exact=exact))
    path = write_results(f"moe_prefill_tiles_{name}", {"benchmark": "moe_prefill_tiles", **env, "rows": rows})
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in TOKENS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(TOKENS)}")
    main(sys.argv[1])
