"""Tile sweep for the fused MoE kernels at prefill sizes (feeds `moe_config`).

    python benchmarks/moe_sweep.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, time_graph, write_results  # noqa: E402
from benchmarks.moe import grouped_mm_moe, routed_tokens, shape_experts  # noqa: E402
from mxroll.precision import GemmConfig  # noqa: E402
from mxroll.precision.kernels.triton_moe import fused_moe_triton  # noqa: E402
from mxroll.precision.moe import experts_ref  # noqa: E402

CONFIGS = {
    "64x64x64": dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
    "128x64x64": dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=3),
    "128x64x64_w8": dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
    "64x128x64": dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
    "128x128x64_w8": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    "64x64x128": dict(BM=64, BN=64, BK=128, num_warps=4, num_stages=3),
    "128x64x128_w8": dict(BM=128, BN=64, BK=128, num_warps=8, num_stages=3),
    "64x64x64_st4": dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4),
}


def main():
    env = environment()
    rows = []
    for name in ("moonlight-16b-a3b", "deepseek-v3"):
        E, K, D, F_, g, (w13b, w2b, w13q, w2q) = shape_experts(name)
        for T in (256, 4096):
            x, ids, w = routed_tokens(T, D, E, K, g)
            t_gmm = time_graph([lambda: grouped_mm_moe(x, ids, w, w13b, w2b)] * 2)
            for quant, (a, b) in (("mxfp8", (w13q, w2q)), ("bf16", (w13b, w2b))):
                ref = experts_ref(x, ids, w, a, b, GemmConfig("w8a8"))
                for cname, cfg in CONFIGS.items():
                    y = fused_moe_triton(x, ids, w, a, b, "w8a8", config=cfg)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = time_graph([lambda: fused_moe_triton(x, ids, w, a, b, "w8a8", config=cfg)] * 2)
                    rows.append(dict(shape=name, T=T, experts=quant, config=cname, us=t * 1e6, gmm_us=t_gmm * 1e6,
                                     err=err))
                    print(f"{name:<18}{T:>6} {quant:<6}{cname:<15}{t * 1e6:9.1f}us gmm {t_gmm * 1e6:9.1f}us "
                          f"x{t_gmm / t:5.2f} err {err:.1e}", flush=True)
    write_results("moe_sweep", {"benchmark": "moe_sweep", **env, "rows": rows})


if __name__ == "__main__":
    main()
