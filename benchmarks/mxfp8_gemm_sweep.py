"""Tuning sweep for the Triton MXFP8 GEMM: tile/split/dequant variants at decode M, and the
fused kernel vs dequantize+cuBLAS at larger M. Feeds `pick_config`; results are kept as notes.

    python benchmarks/mxfp8_gemm_sweep.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from benchmarks.mxfp8_gemm import SHAPES  # noqa: E402
from mxroll.precision.kernels.mxfp8_gemm import mxfp8_gemm_ref  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import fused_config, mxfp8_gemm_triton  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

BASE = dict(PATH="fused", BM=16, BN=64, BK=256, num_warps=4, num_stages=4, SPLIT_TARGET=2, GATHER_SCALES=False,
            PRE_QDQ=False)
DECODE_VARIANTS = {
    "base": {}, "gather": dict(GATHER_SCALES=True), "bn32": dict(BN=32), "bn128": dict(BN=128),
    "bk512": dict(BK=512), "bk128": dict(BK=128), "bn32_bk512": dict(BN=32, BK=512), "st3": dict(num_stages=3),
    "st6": dict(num_stages=6), "bn128_w8": dict(BN=128, num_warps=8), "bn64_w8": dict(num_warps=8),
    "nosplit": dict(SPLIT_TARGET=0), "split1": dict(SPLIT_TARGET=1), "split4": dict(SPLIT_TARGET=4),
    "bn32_split4": dict(BN=32, SPLIT_TARGET=4),
}
DECODE_SHAPES = ["dsv3.mlp_gate", "dsv3.o_proj", "moonlight.mlp_down", "moonlight.q_proj", "dsv3.kv_a_proj",
                 "dsv3.q_a_proj"]
MID_SHAPES = ["dsv3.mlp_gate", "dsv3.o_proj", "moonlight.q_proj"]


def setup(N, K, M):
    g = torch.Generator(device="cuda").manual_seed(N + K + M)
    w = MXFP8Tensor.quantize((torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16))
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    n = copies_for(N * K + 2 * M * K)
    return w, x, [MXFP8Tensor(w.data.clone(), w.scale.clone()) for _ in range(n)], [x.clone() for _ in range(n)]


def run(w, x, ws, xs, mode, cfg):
    y = mxfp8_gemm_triton(x, w, mode, config=cfg)
    ref = mxfp8_gemm_ref(x, w, mode, "rceil")
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    t = time_graph([(lambda a=a, b=b: mxfp8_gemm_triton(a, b, mode, config=cfg)) for a, b in zip(xs, ws)])
    return t, err


BIG = dict(PATH="fused", BM=16, BN=64, BK=128, num_warps=4, num_stages=4, SPLIT_TARGET=2, GATHER_SCALES=False,
           PRE_QDQ=True)
BIG_VARIANTS = {
    "big_base": {}, "st3": dict(num_stages=3), "st5": dict(num_stages=5), "st6": dict(num_stages=6),
    "bn32": dict(BN=32), "bn32_st6": dict(BN=32, num_stages=6), "bn128_w8": dict(BN=128, num_warps=8),
    "w8": dict(num_warps=8), "bk64_st8": dict(BK=64, num_stages=8), "stream": dict(STREAM_W=True),
    "stream_st5": dict(STREAM_W=True, num_stages=5), "split1": dict(SPLIT_TARGET=1), "split4": dict(SPLIT_TARGET=4),
    "bn32_split4": dict(BN=32, SPLIT_TARGET=4), "tma": dict(USE_TMA=True), "tma_st6": dict(USE_TMA=True, num_stages=6),
    "tma_bk256": dict(USE_TMA=True, BK=256, num_stages=3), "tma_bn128": dict(USE_TMA=True, BN=128),
    "tma_w8": dict(USE_TMA=True, num_warps=8),
}
BIG_SHAPES = ["dsv3.mlp_gate", "dsv3.mlp_down", "dsv3.o_proj", "dsv3.q_b_proj", "moonlight.mlp_gate"]


def sweep_decode(shapes, variants, base, bw, modes_for):
    """Time each variant (config overrides of `base`) at M=1 and 16; mode "w8a8_pre" quantizes x
    in a separate pass first."""
    rows = []
    for name in shapes:
        N, K = SHAPES[name]
        for M in (1, 16):
            w, x, ws, xs = setup(N, K, M)
            floor = (N * K * 33 / 32 + 2 * M * K + 2 * M * N) / bw
            for vname, over in variants.items():
                for mode in modes_for(vname):
                    cfg = dict(base, **over)
                    if mode.endswith("_pre"):
                        cfg["PRE_QDQ"] = True
                    t, err = run(w, x, ws, xs, mode.removesuffix("_pre"), cfg)
                    rows.append(dict(shape=name, M=M, variant=vname, mode=mode, us=t * 1e6, roof=floor / t, err=err))
                    print(f"{name:<20}{M:>4} {vname:<12}{mode:<9}{t * 1e6:8.1f}us {100 * floor / t:5.0f}% err {err:.1e}",
                          flush=True)
            del ws, xs
    return rows


def main():
    if "--big" in sys.argv:
        env = environment()
        bw = measure_copy_bandwidth()
        if "--tma" in sys.argv:
            BIG_VARIANTS.clear()
            BIG_VARIANTS.update({"big_base": {}, "tma": dict(USE_TMA=True), "tma_st3": dict(USE_TMA=True, num_stages=3),
                                 "tma_st6": dict(USE_TMA=True, num_stages=6),
                                 "tma_bk256": dict(USE_TMA=True, BK=256, num_stages=3),
                                 "tma_bn128": dict(USE_TMA=True, BN=128), "tma_w8": dict(USE_TMA=True, num_warps=8),
                                 "tma_bn32": dict(USE_TMA=True, BN=32)})
        rows = sweep_decode(BIG_SHAPES, BIG_VARIANTS, BIG, bw, lambda v: ["w8a8"])
        name = "mxfp8_gemm_sweep3" if "--tma" in sys.argv else "mxfp8_gemm_sweep2"
        write_results(name, {"benchmark": name, **env, "copy_GBps": bw / 1e9,
                                            "rows": rows})
        return
    env = environment()
    bw = measure_copy_bandwidth()
    rows = []
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s")
    rows += sweep_decode(DECODE_SHAPES, DECODE_VARIANTS, BASE, bw,
                         lambda v: ["w8a16", "w8a8", "w8a8_pre"] if v == "base" else ["w8a16"])
    for name in MID_SHAPES:
        N, K = SHAPES[name]
        for M in (32, 64, 128, 256, 512, 1024, 4096):
            w, x, ws, xs = setup(N, K, M)
            wd = w.dequantize(torch.bfloat16)
            t_cub = time_graph([lambda: torch.nn.functional.linear(x, wd)] * 4)
            for path in ("fused", "dequant"):
                cfg = dict(fused_config(min(M, 256), N, K)) if path == "fused" else dict(PATH="dequant")
                t, err = run(w, x, ws, xs, "w8a8", cfg)
                rows.append(dict(shape=name, M=M, variant=path, mode="w8a8", us=t * 1e6, cublas_us=t_cub * 1e6,
                                 err=err))
                print(f"{name:<20}{M:>5} {path:<8}{t * 1e6:9.1f}us cublas {t_cub * 1e6:8.1f}us "
                      f"x{t_cub / t:5.2f} err {err:.1e}", flush=True)
            del ws, xs
            torch.cuda.empty_cache()
    write_results("mxfp8_gemm_sweep", {"benchmark": "mxfp8_gemm_sweep", **env, "copy_GBps": bw / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
