"""align-block-size on the GPU: the Triton counting sort (precision/kernels/triton_moe_align.py) against the
torch-op version, bit for bit, and the time of both.

Per (E, K, T, BM): equality on uniform routing (K distinct experts per token), on a hot routing (half the
experts empty) and with every row on one expert; equality after CUDA-graph replays on new routings; then
the time per call of each path, eager (CUDA events around 200 back-to-back calls after warm-up: launch-bound)
and inside a CUDA graph (20 calls captured, replayed). For BM=16 and a few (E, K, T), other launch configs of the
Triton kernel (chunk size, experts per program, warps) are timed too; one that fails to compile is reported
and skipped. "decode" line: 26 MoE layers of moonlight at T=256 (graph times).

    python benchmarks/moe_align_check.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, time_graph, write_results  # noqa: E402
from mxroll.precision.kernels.moe_align import align_block_size, align_block_size_torch  # noqa: E402
from mxroll.precision.kernels.triton_moe_align import align_block_size_triton, align_config  # noqa: E402

EXPERTS = [(64, 6), (64, 8), (256, 6), (256, 8)]
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]
BMS = [16, 64]
SWEEP = [(64, 6, 256), (64, 6, 1024), (64, 6, 8192), (256, 8, 256), (256, 8, 1024), (256, 8, 8192)]  # (E, K, T)
VARIANTS = [dict(CHUNK=1024, EPP=1, num_warps=4), dict(CHUNK=2048, EPP=2, num_warps=8),
            dict(CHUNK=4096, EPP=1, num_warps=8), dict(CHUNK=4096, EPP=8, num_warps=8),
            dict(CHUNK=8192, EPP=4, num_warps=8), dict(CHUNK=16384, EPP=4, num_warps=16)]


def routing(T, K, E, pattern, g):
    if pattern == "one":
        return torch.full((T, K), E - 1, dtype=torch.long, device="cuda")
    n = E if pattern == "uniform" else E // 2
    return torch.rand(T, n, device="cuda", generator=g).argsort(dim=1)[:, :K]


def same(a, b) -> bool:
    return torch.equal(a.sorted_ids, b.sorted_ids) and torch.equal(a.block_expert, b.block_expert)


def time_loop(fn, iters=200, warmup=20) -> float:
    """Seconds per call: CUDA events around `iters` back-to-back eager calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def graph_follows_new_ids(E, K, T, BM, g) -> bool:
    """Captured once through the dispatch point, replayed on two other routings."""
    ids = routing(T, K, E, "uniform", g)
    align_block_size(ids, E, BM)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = align_block_size(ids, E, BM)
    ok = True
    for pattern in ("hot", "uniform"):
        ids.copy_(routing(T, K, E, pattern, g))
        graph.replay()
        ok &= same(out, align_block_size_torch(ids, E, BM))
    del graph
    return bool(ok)


def check_and_time(fn, ids_by_pattern, refs, E, BM) -> dict:
    """Equality on every pattern, then eager and graph time on the uniform routing; errors reported."""
    try:
        ok = all(same(fn(ids, E, BM), refs[p]) for p, ids in ids_by_pattern.items())
        ids = ids_by_pattern["uniform"]
        loop = time_loop(lambda: fn(ids, E, BM))
        graph = time_graph([lambda: fn(ids, E, BM)] * 20, replays=10)
        return {"ok": bool(ok), "loop_us": loop * 1e6, "graph_us": graph * 1e6}
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is reported, not fatal
        traceback.print_exc(limit=2)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="E=64/K=6 and E=256/K=8 only, no config sweep")
    args = ap.parse_args()
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}")
    head = (f"{'E':>4}{'K':>3}{'T':>6}{'BM':>4}{'n':>7}{'torch_loop':>11}{'trit_loop':>10}{'torch_graph':>12}"
            f"{'trit_graph':>11}{'x_graph':>8}  {'ok':<4}{'graph_ok':<9}config / best variant")
    print(head)
    rows = []
    experts = [(64, 6), (256, 8)] if args.quick else EXPERTS
    for E, K in experts:
        for T in TOKENS:
            for BM in BMS:
                g = torch.Generator(device="cuda").manual_seed(T * 1000 + E + K)
                ids_by_pattern = {p: routing(T, K, E, p, g) for p in ("uniform", "hot", "one")}
                refs = {p: align_block_size_torch(ids, E, BM) for p, ids in ids_by_pattern.items()}
                t_torch = check_and_time(align_block_size_torch, ids_by_pattern, refs, E, BM)
                t_trit = check_and_time(align_block_size_triton, ids_by_pattern, refs, E, BM)
                try:
                    graph_ok = graph_follows_new_ids(E, K, T, BM, g)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc(limit=2)
                    graph_ok = f"{type(e).__name__}: {str(e)[:200]}"
                row = {"E": E, "K": K, "T": T, "BM": BM, "n": T * K, "config": align_config(T * K, E),
                       "torch": t_torch, "triton": t_trit, "graph_replay_ok": graph_ok, "variants": []}
                if BM == 16 and (E, K, T) in SWEEP and not args.quick:
                    for v in VARIANTS:
                        r = check_and_time(lambda ids, E_, BM_, v=v: align_block_size_triton(ids, E_, BM_, config=v),
                                           ids_by_pattern, refs, E, BM)
                        row["variants"].append({"config": v, **r})
                rows.append(row)
                good = [v for v in row["variants"] if v.get("ok")]
                best = min(good, key=lambda v: v["graph_us"]) if good else None
                tt, tr = t_torch.get("graph_us", float("nan")), t_trit.get("graph_us", float("nan"))
                note = str(row["config"]) + (f" / best {best['config']} {best['graph_us']:.1f}us" if best else "")
                bad = [v["config"] for v in row["variants"] if not v.get("ok")]
                if bad:
                    note += f" / FAILED variants {bad}"
                print(f"{E:>4}{K:>3}{T:>6}{BM:>4}{T * K:>7}{t_torch.get('loop_us', float('nan')):>11.1f}"
                      f"{t_trit.get('loop_us', float('nan')):>10.1f}{tt:>12.1f}{tr:>11.1f}{tt / tr:>8.1f}  "
                      f"{'yes' if t_trit['ok'] else 'NO':<4}{'yes' if graph_ok is True else 'NO':<9}{note}"
                      + (f"  {t_trit['error']}" if "error" in t_trit else ""), flush=True)
    dec = [r for r in rows if (r["E"], r["K"], r["T"], r["BM"]) == (64, 6, 256, 16)]
    if dec and "graph_us" in dec[0]["triton"]:
        d = dec[0]
        print(f"decode (moonlight, T=256, BM=16, 26 MoE layers, graph): torch {26 * d['torch']['graph_us']:.0f} us, "
              f"triton {26 * d['triton']['graph_us']:.0f} us per step")
    # a variant that does not compile is only reported; one that runs and disagrees is a failure
    all_ok = all(r["triton"]["ok"] and r["graph_replay_ok"] is True
                 and all(v["ok"] or "error" in v for v in r["variants"]) for r in rows)
    print("ALL EQUAL" if all_ok else "MISMATCH OR ERROR: see rows marked NO")
    path = write_results("moe_align_check", {"benchmark": "moe_align_check", **env, "all_ok": all_ok, "rows": rows})
    print(f"wrote {path}")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
