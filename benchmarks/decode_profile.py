"""Where a decode step's time goes (moonlight-16b-a3b shape, dummy weights, one GPU): host-side pieces
(scheduling, step inputs, the attention plan, sampling) timed alone, the CUDA-graph replay alone, and
the top kernels of a replay by device time (torch.profiler).

    python benchmarks/decode_profile.py [--batch 1] [--mode bf16|mxfp8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_results  # noqa: E402
from mxroll import Engine  # noqa: E402
from mxroll.rollout.step_inputs import StepInputs  # noqa: E402


def timed(fn, n: int = 50, sync: bool = True) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--mode", default="bf16")
    args = ap.parse_args()
    e = Engine(model_path="preset:moonlight-16b-a3b", load_format="dummy", device="cuda", progress=False,
               quantization="mxfp8" if args.mode == "mxfp8" else None, max_total_tokens=1 << 18)
    results = {"env": environment(), "mode": args.mode, "batches": {}}
    for B in args.batch:
        ids = torch.randint(3, 150000, (B, 512), generator=torch.Generator().manual_seed(B)).tolist()
        e.pause_generation(mode="in_place")
        e._command(lambda: None)
        call = e._submit(None, ids, {"max_new_tokens": 400, "ignore_eos": True}, False, None, False, None)
        # run the prefill and a few decode steps by hand on this thread's view (the loop is paused)
        def run_steps(k):
            for _ in range(k):
                e._command(e.step)
        run_steps(-(-B * 512 // e.config.chunked_prefill_size) + 4)
        with torch.inference_mode():  # the hand-run step plans attention on inference tensors
            res = measure(e, B)
        print(f"B={B}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "top_kernels"), flush=True)
        results["batches"][B] = res
        e.abort_request(abort_all=True)
        e.continue_generation()
        call.future.result()
    write_results(f"decode_profile_{args.mode}", results)
    e.shutdown()


def measure(e: Engine, B: int) -> dict:
    """One hand-scheduled decode step of B rows: host pieces, graph replay, top kernels."""
    batch = e.scheduler.schedule()
    step = e.runner.prepare(batch.rows)  # captures the batch size's graph when needed
    graphs = e.runner.graphs
    res = {}
    res["old_step_inputs_ms"] = timed(lambda: StepInputs.build(batch.rows, e.page_size, e.device), sync=False)
    size = graphs.sizes[[s >= B for s in graphs.sizes].index(True)]
    res["step_builder_ms"] = timed(lambda: e.step_builder.build(batch.rows, pad_to=size), sync=False)
    graph, gplan = graphs.graphs.get(size) or (None, None)
    res["attention_plan_ms"] = timed(lambda: e.attn.begin(step, gplan), sync=False)
    if graph is not None:
        res["graph_replay_ms"] = timed(graph.replay)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        print(table)
        res["top_kernels"] = table
    logits = graphs.logits[:B]
    rows = e._sampling_rows(batch)
    res["sampler_ms"] = timed(lambda: e.sampler(logits, e._sampling_rows(batch)))
    res["sampling_rows_build_ms"] = timed(lambda: e._sampling_rows(batch), sync=False)
    del rows
    # undo: the step was scheduled by hand; retract and abort everything before the next batch size
    e.step_builder.release()
    e.scheduler.update(batch, [[1] * r.num_samples for r in batch.rows])
    return res


if __name__ == "__main__":
    main()
