"""The decode router (sigmoid gate + group-limited top-k) at 1..4 tokens: `gate_route_triton` (logits GEMV and
routing in one launch) by warps a program, against the two-launch path (cuBLAS fp32 logits, then
`route_topk_triton`), per call inside one CUDA graph of back-to-back calls over rotating inputs.

Bytes: the gate weight (E x D bf16) and x; the floor is their read at the same-run copy bandwidth. Correctness in the
same run: every variant's expert ids equal the torch reference's (`route_topk_ref` on fp32 logits), weights within
fp32 noise, and whether its weights are bit-equal to the shipped config's.

    python benchmarks/router.py [--tokens 1 2 4] [--warps 1 2 4] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, rel_err, time_graph, write_results  # noqa: E402
from mxroll.model.kernels import triton_router  # noqa: E402
from mxroll.model.ops import route_topk_ref  # noqa: E402
from mxroll.precision.linear import linear  # noqa: E402

# E experts, D hidden, K top-k, n_group / topk_group, S hosted shared experts, routed scaling
SHAPES = {"moonlight-16b-a3b": dict(E=64, D=2048, K=6, G=1, TG=1, S=2, scale=2.446),
          "deepseek-v3": dict(E=256, D=7168, K=8, G=8, TG=4, S=1, scale=2.5)}
CALLS = 32  # calls a graph (inputs rotate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default="router")
    args = ap.parse_args()
    env = environment()
    bw = measure_copy_bandwidth()
    shipped = triton_router.GATE_ROUTE_WARPS
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s; us per call; shipped warps {shipped}", flush=True)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, s in SHAPES.items():
        E, D, K = s["E"], s["D"], s["K"]
        gate = (torch.randn(E, D, device="cuda", generator=g) * D**-0.5).to(torch.bfloat16)
        bias = torch.randn(E, device="cuda", generator=g) * 0.01
        route = dict(top_k=K, n_group=s["G"], topk_group=s["TG"], norm_topk_prob=True, routed_scaling_factor=s["scale"])
        for T in args.tokens:
            xs = [torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(CALLS)]
            ref_w, ref_ids = route_topk_ref((xs[0].float() @ gate.float().T).sigmoid(), bias, **route)
            floor_us = (E * D + T * D) * 2 / bw * 1e6
            variants = {f"fused_w{w}": (lambda x, w=w: triton_router.gate_route_triton(
                x, gate, bias, route["top_k"], route["n_group"], route["topk_group"], True, route["routed_scaling_factor"],
                shared=s["S"], num_warps=w)) for w in args.warps}
            variants["two_launch"] = lambda x: triton_router.route_topk_triton(
                linear(x, gate, out_dtype=torch.float32), bias, route["top_k"], route["n_group"], route["topk_group"], True,
                route["routed_scaling_factor"], sigmoid=True, shared=s["S"])
            base = variants[f"fused_w{shipped}"](xs[0]) if shipped in args.warps else None
            for vname, fn in variants.items():
                w, ids = fn(xs[0])
                torch.cuda.synchronize()
                row = dict(shape=name, tokens=T, variant=vname, floor_us=floor_us,
                           ids_equal_reference=bool(torch.equal(ids[:, :K].cpu(), ref_ids.cpu())),
                           weights_rel_err=rel_err(w[:, :K], ref_w),
                           weights_equal_shipped=None if base is None else bool(torch.equal(w, base[0])))
                row["us"] = time_graph([lambda x=x: fn(x) for x in xs]) * 1e6
                rows.append(row)
                print(f"{name:<18} T={T} {vname:<11} {row['us']:6.2f} us (floor {floor_us:.2f})  ids==ref "
                      f"{row['ids_equal_reference']}  w err {row['weights_rel_err']:.1e}  bits==shipped "
                      f"{row['weights_equal_shipped']}", flush=True)
    path = write_results(args.out, {"env": env, "copy_GBps": bw / 1e9, "shipped_warps": shipped, "rows": rows})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
