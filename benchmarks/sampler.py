"""Batched sampler on the GPU: the Triton path (rollout.sampling_kernel) against the torch reference.

V = 163840 (moonlight vocab), S = decode batch rows. Per case: agreement with the torch reference
on the same device (tokens equal, max logprob difference), then the time of a whole `Sampler`
call (kernels + filter thresholds + top-logprobs, eager launches, CUDA events) and of the fused
kernels alone, over rotating logits (> L2). Floor = S * V * 4 bytes / measured copy bandwidth.

    python benchmarks/sampler.py [--quick] [--sweep] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_events, write_results  # noqa: E402
from mxroll.rollout import sampling_kernel  # noqa: E402
from mxroll.rollout.sampler import Sampler, SamplingRows, filter_thresholds, sample_ref, sample_seed  # noqa: E402
from mxroll.rollout.sampling_params import SamplingParams  # noqa: E402

V = 163840
CASES = {  # name: (params of every row, top_logprobs_num per row)
    "rl_t1": (dict(), 0),
    "t0.7": (dict(temperature=0.7), 0),
    "t0.7_raw_logprob": (dict(temperature=0.7, raw_logprob=True), 0),
    "greedy": (dict(temperature=0), 0),
    "top_k50": (dict(top_k=50), 0),
    "top_p0.95": (dict(top_p=0.95), 0),
    "min_p0.05": (dict(min_p=0.05), 0),
    "top_logprobs5": (dict(), 5),
}


def make_rows(S, kw, n_top, step=0):
    params = [SamplingParams.from_dict(kw)] * S
    return SamplingRows.build(params, [sample_seed(step, i, 0) for i in range(S)], [1000 + i for i in range(S)],
                              "cuda", [n_top] * S if n_top else None)


def logits_like_a_model(S, g):
    """Peaked rows with a long tail, like an LM head's (std ~2 with a few large logits)."""
    x = torch.randn(S, V, device="cuda", generator=g) * 2
    x[:, :64] += 8 * torch.rand(S, 64, device="cuda", generator=g)
    return x


def check(S, kw, n_top, g):
    logits = logits_like_a_model(S, g)
    rows = make_rows(S, kw, n_top)
    a = Sampler("cuda", backend="triton")(logits, rows)
    thr = filter_thresholds(logits, rows)
    tok, lp = sample_ref(logits, rows.temperature, rows.greedy, thr, rows.seed, rows.position,
                         rows.logprob_temperature)
    return {"token_mismatches": int((a.tokens != tok).sum()), "max_logprob_diff": float((a.logprobs - lp).abs().max())}


def bench(S, kw, n_top, g, bw):
    rows = make_rows(S, kw, n_top)
    n = copies_for(S * V * 4, cap=8)
    xs = [logits_like_a_model(S, g) for _ in range(n)]
    sampler = Sampler("cuda", backend="triton")
    it = iter(range(1 << 30))
    full = time_events(lambda: sampler(xs[next(it) % n], rows), iters=30)
    thr = filter_thresholds(xs[0], rows)
    args = (rows.temperature, rows.greedy, thr, rows.seed, rows.position, rows.logprob_temperature)
    kern = time_events(lambda: sampling_kernel.sample_triton(xs[next(it) % n], *args), iters=30)
    return {"sampler_us": full * 1e6, "kernels_us": kern * 1e6, "floor_us": S * V * 4 / bw * 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time kernel configurations (rl_t1, greedy)")
    ap.add_argument("--out", default="sampler")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = measure_copy_bandwidth()
    out = {"env": environment(), "copy_bandwidth_GBps": bw / 1e9, "V": V, "config": {
        k: getattr(sampling_kernel, k) for k in ("CHUNK", "BLOCK", "NUM_WARPS", "NUM_STAGES", "PREFETCH")},
        "check": {}, "time": {}, "torch_reference_us": {}, "sweep": []}
    for name, (kw, n_top) in CASES.items():
        out["check"][name] = check(256, kw, n_top, g)
        print("check", name, out["check"][name], flush=True)
    sizes = [256, 1024] if args.quick else [1, 64, 256, 512, 1024]
    for S in sizes:
        for name, (kw, n_top) in CASES.items():
            if args.quick and name not in ("rl_t1", "top_p0.95", "t0.7_raw_logprob"):
                continue
            r = bench(S, kw, n_top, g, bw)
            out["time"][f"{name}/S={S}"] = r
            print(f"S={S:5d} {name:18s} sampler {r['sampler_us']:8.1f} us  kernels {r['kernels_us']:8.1f} us  "
                  f"floor {r['floor_us']:6.1f} us", flush=True)
    for S in (64, 256):
        rows = make_rows(S, {}, 0)
        x = logits_like_a_model(S, g)
        ref = Sampler("cuda", backend="torch")
        out["torch_reference_us"][f"rl_t1/S={S}"] = time_events(lambda: ref(x, rows), iters=5) * 1e6
        print("torch reference", S, out["torch_reference_us"][f"rl_t1/S={S}"], flush=True)
    if args.sweep:
        knobs = ("CHUNK", "BLOCK", "NUM_WARPS", "NUM_STAGES", "PREFETCH")
        base = tuple(getattr(sampling_kernel, k) for k in knobs)
        for cfg in [(16384, 1024, 4, 3, False), (16384, 1024, 4, 1, False), (16384, 1024, 4, 3, True),
                    (16384, 1024, 4, 1, True), (16384, 512, 4, 3, False), (16384, 512, 4, 3, True),
                    (16384, 1024, 8, 3, True), (16384, 2048, 8, 3, True), (32768, 1024, 4, 3, True),
                    (8192, 512, 4, 3, True)]:
            for k, v in zip(knobs, cfg):
                setattr(sampling_kernel, k, v)
            r = dict(zip(knobs, cfg))
            for S in (256, 1024):
                r[f"S={S}"] = bench(S, {}, 0, g, bw)["kernels_us"]
            r["greedy/S=1024"] = bench(1024, dict(temperature=0), 0, g, bw)["kernels_us"]
            out["sweep"].append(r)
            print("sweep", r, flush=True)
        for k, v in zip(knobs, base):
            setattr(sampling_kernel, k, v)
    print("written", write_results(args.out, out))


if __name__ == "__main__":
    main()
