"""The cyclic garbage collector's time in the engine loop, before and after `freeze_gc` (sglang's advice: freeze
after warm-up requests). CPU engine on a preset checkpoint at the RL batch shape (P prompts x n samples decoding
together); the same workload three times in one process: a warm-up, then timed with the collector as it is, then
timed again after `Engine.freeze_gc()`. Reported per run: collections by generation, their total and longest time,
the objects the collector tracks, and output tokens/s. Runs on any machine (the host side is what is measured).

    python benchmarks/gc_freeze.py [--preset tiny] [--prompts 64] [--n 16] [--new 64] [--out NAME]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from mxroll import Engine  # noqa: E402
from mxroll.rollout.gc_watch import GcWatch  # noqa: E402


def timed(e: Engine, ids, params) -> dict:
    c = GcWatch(float("inf"))  # counts the collections, warns of none
    try:
        t0 = time.perf_counter()
        out = e.generate(input_ids=ids, sampling_params=params)
        t = time.perf_counter() - t0
    finally:
        c.close()
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    steps = max(1, params["max_new_tokens"])
    return {"seconds": t, "output_tok_per_s": toks / t, "collections": c.collections, "gc_seconds": c.seconds,
            "gc_ms_per_decode_step": 1e3 * sum(c.seconds) / steps, "longest_ms": 1e3 * c.longest,
            "tracked_objects": len(gc.get_objects()), "frozen_objects": gc.get_freeze_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="gc_freeze")
    args = ap.parse_args()
    e = Engine(model_path=f"preset:{args.preset}", progress=False, max_running_requests=args.prompts * args.n)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, 500, (64,), generator=g).tolist() for _ in range(args.prompts)]
    params = {"max_new_tokens": args.new, "ignore_eos": True, "temperature": 1.0, "n": args.n}
    e.generate(input_ids=ids, sampling_params=params)  # warm-up
    runs = {"as_is": timed(e, ids, params)}
    e.freeze_gc()
    runs["frozen"] = timed(e, ids, params)
    gc.unfreeze()
    e.shutdown()
    print(f"{'run':>7} {'tok/s':>8} {'gen0/1/2 collections':>22} {'gc ms/step':>10} {'longest ms':>10} {'tracked':>9}")
    for k, r in runs.items():
        print(f"{k:>7} {r['output_tok_per_s']:>8.0f} {'/'.join(map(str, r['collections'])):>22} "
              f"{r['gc_ms_per_decode_step']:>10.3f} {r['longest_ms']:>10.2f} {r['tracked_objects']:>9}")
    env = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "device": str(e.device),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"results -> {write_results(args.out, {'env': env, 'args': vars(args), 'runs': runs})}")


if __name__ == "__main__":
    main()
