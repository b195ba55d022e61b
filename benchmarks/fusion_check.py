"""Do projections that share an input run faster as one GEMM? (q_proj / q_a_proj with kv_a_proj_with_mqa;
the shared experts' gate_proj with up_proj.) Each pair timed separately and concatenated along N, per call
inside one CUDA graph of back-to-back launches over weights rotated past L2: cuBLAS bf16, and the MXFP8
dispatch (`precision.linear` on stored-MXFP8 weights with their bf16 copies, the input already
quantize-dequantized by its norm, as in the engine). The fused result is checked against the separate ones
in the same run (bitwise). With --layer, also the kernel sequence of one decoder layer in a batch-1 decode
replay of the engine (moonlight-16b-a3b, dummy weights), bf16 and MXFP8.

    python benchmarks/fusion_check.py [--ms 1,4,8,64,256] [--layer] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from mxroll.precision.linear import GemmConfig, bf16_copy, linear  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

PAIRS = {  # name: (K, [N of each projection])
    "moonlight.q_kv_a": (2048, [3072, 576]),
    "moonlight.shared_gate_up": (2048, [2816, 2816]),
    "dsv3.q_a_kv_a": (7168, [1536, 576]),
    "dsv3.shared_gate_up": (7168, [2048, 2048]),
}


def weights(K: int, ns: list[int], mode: str, copies: int):
    """copies x (separate weights, fused weight) whose rows are the separate ones stacked."""
    out = []
    gemm = GemmConfig(backend="triton", bf16_copy=True)
    for _ in range(copies):
        w = torch.randn(sum(ns), K, device="cuda", dtype=torch.bfloat16) * 0.02
        if mode == "bf16":
            out.append(([p for p in w.split(ns)], w))
            continue
        q = MXFP8Tensor.quantize(w)
        fused = MXFP8Tensor(q.data, q.scale, bf16_copy=bf16_copy(q, gemm))
        parts = [MXFP8Tensor(d, s, bf16_copy=c) for d, s, c in
                 zip(q.data.split(ns), q.scale.split(ns), fused.bf16_copy.split(ns))]
        out.append((parts, fused))
    return out


def run_pair(name: str, K: int, ns: list[int], M: int, mode: str, bw: float) -> dict:
    gemm = GemmConfig(backend="triton", bf16_copy=True)
    nbytes = sum(ns) * K * (2 if mode == "bf16" else 1)
    ws = weights(K, ns, mode, copies_for(nbytes))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    if mode == "mxfp8":
        x = MXFP8Tensor.quantize(x).dequantize(torch.bfloat16)  # the norm's quantize-dequantize
        f = lambda w: linear(x, w, gemm, x_qdq=True)  # noqa: E731
    else:
        f = lambda w: linear(x, w)  # noqa: E731
    sep = time_graph([lambda parts=parts: [f(p) for p in parts] for parts, _ in ws])
    fus = time_graph([lambda w=w: f(w) for _, w in ws])
    parts, w = ws[0]
    same = torch.equal(torch.cat([f(p) for p in parts], dim=1), f(w))
    row = dict(pair=name, mode=mode, M=M, K=K, ns=ns, weight_MB=nbytes / 1e6, separate_us=sep * 1e6,
               fused_us=fus * 1e6, speedup=sep / fus, floor_us=nbytes / bw * 1e6, bitwise_equal=same)
    print(f"{name:26s} {mode:6s} M={M:4d} separate {sep*1e6:7.2f} us  fused {fus*1e6:7.2f} us  x{sep/fus:.2f}  "
          f"floor {row['floor_us']:.2f} us  equal={same}", flush=True)
    return row


def layer_kernels(mode: str) -> list[dict]:
    from mxroll import Engine
    e = Engine(model_path="preset:moonlight-16b-a3b", load_format="dummy", device="cuda", progress=False,
               quantization="mxfp8" if mode == "mxfp8" else None, max_total_tokens=1 << 16,
               cuda_graph_max_bs=8)
    e.generate(input_ids=[list(range(5, 517))], sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    graph, _ = e.runner.graphs.graphs[1]
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    evs = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda ev: ev.time_range.start)
    seq = [dict(name=ev.name[:90], us=ev.device_time, start=ev.time_range.start - evs[0].time_range.start)
           for ev in evs]
    e.shutdown()
    return seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ms", default="1,4,8,64,256")
    ap.add_argument("--layer", action="store_true")
    ap.add_argument("--out", default="fusion_check")
    args = ap.parse_args()
    bw = measure_copy_bandwidth()
    res = {"env": environment(), "copy_bandwidth_Bps": bw, "rows": []}
    for mode in ("bf16", "mxfp8"):
        for name, (K, ns) in PAIRS.items():
            for M in map(int, args.ms.split(",")):
                res["rows"].append(run_pair(name, K, ns, M, mode, bw))
                write_results(args.out, res)
    if args.layer:
        for mode in ("bf16", "mxfp8"):
            seq = layer_kernels(mode)
            res[f"sequence_{mode}"] = seq
            total = seq[-1]["start"] + seq[-1]["us"]
            print(f"--- {mode}: {len(seq)} kernels, {total:.0f} us first start to last end")
            for k in seq[:80]:
                print(f"{k['start']:9.1f} {k['us']:7.2f}  {k['name']}")
            write_results(args.out, res)


if __name__ == "__main__":
    main()
