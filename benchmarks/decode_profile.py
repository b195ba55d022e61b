"""Where a decode step's time goes (moonlight-16b-a3b shape, dummy weights, one GPU): host-side pieces
(scheduling, step inputs, the attention plan, sampling) timed alone, the CUDA-graph replay alone, and
the top kernels of a replay by device time (torch.profiler). --routes: rows per expert in the MoE layers of
one decode step of the same batch (random prompts, dummy weights), per layer and summed up: how uneven the
routing the fused MoE sees is (its tiles are chosen by the mean).

    python benchmarks/decode_profile.py [--batch 1] [--mode bf16|mxfp8|mxfp8_moe_copy] [--context 512] [--routes]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_results  # noqa: E402
from benchmarks.throughput import engine  # noqa: E402
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
    ap.add_argument("--mode", default="bf16", help="bf16 | mxfp8 | mxfp8_moe_copy (as benchmarks/throughput.py)")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per row before the timed step")
    ap.add_argument("--out", default="", help="suffix of the results file name")
    ap.add_argument("--routes", action="store_true", help="rows per expert of one decode step instead of timings")
    args = ap.parse_args()
    cache = max(1 << 18, int(max(args.batch) * (args.context + 64) * 1.1))  # + the scheduler's 1% watermark
    e = engine(args.mode, max_total_tokens=cache)
    results = {"env": environment(), "mode": args.mode, "context": args.context, "batches": {}}
    if args.routes:
        results["routes"] = {B: route_spread(e, B) for B in args.batch}
        write_results(f"decode_routes_{args.mode}{args.out}", results)
        e.shutdown()
        return
    for B in args.batch:
        ids = torch.randint(3, 150000, (B, args.context), generator=torch.Generator().manual_seed(B)).tolist()
        e.pause_generation(mode="in_place")
        e._command(lambda: None)
        call = e._submit(None, ids, {"max_new_tokens": 400, "ignore_eos": True}, False, None, False, None)
        # run the prefill and a few decode steps by hand on this thread's view (the loop is paused)
        def run_steps(k):
            for _ in range(k):
                e._command(e.step)
        run_steps(-(-B * args.context // e.config.chunked_prefill_size) + 32)  # + decode rows riding along
        with torch.inference_mode():  # the hand-run step plans attention on inference tensors
            res = measure(e, B)
        print(f"B={B}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "top_kernels"), flush=True)
        results["batches"][B] = res
        e.abort_request(abort_all=True)
        e.continue_generation()
        call.future.result()
    write_results(f"decode_profile_{args.mode}{args.out}", results)
    e.shutdown()


def route_spread(e: Engine, B: int, prompt: int = 512, steps: int = 4) -> dict:
    """Rows per expert at the last decode position of B random prompts, per MoE layer."""
    vocab = min(150000, e.model_config.vocab_size)
    ids = torch.randint(3, vocab, (B, prompt), generator=torch.Generator().manual_seed(B)).tolist()
    outs = e.generate(input_ids=ids, sampling_params={"max_new_tokens": steps, "ignore_eos": True},
                      return_routed_experts=True)
    routes = torch.stack([torch.as_tensor(o["meta_info"]["routed_experts"])[-1] for o in outs])  # B, layers, K
    E, K = e.model_config.n_routed_experts, routes.shape[-1]
    layers = []
    for layer in range(routes.shape[1]):
        r = routes[:, layer].reshape(-1).long()
        if (r < 0).all():  # a dense layer
            continue
        c = torch.bincount(r[r >= 0], minlength=E)
        layers.append({"layer": layer, "max": int(c.max()), "top4": c.sort(descending=True).values[:4].tolist(),
                       "experts_used": int((c > 0).sum()), "rows_over_2x_mean": int(c[c > 2 * B * K / E].sum())})
    mx = [x["max"] for x in layers]
    share = sum(x["rows_over_2x_mean"] for x in layers) / (len(layers) * B * K)
    print(f"B={B}: mean rows/expert {B * K / E:.1f}, busiest expert per layer {min(mx)}..{max(mx)} "
          f"(mean {sum(mx) / len(mx):.0f}), rows in experts over 2x the mean {100 * share:.0f}%", flush=True)
    for x in layers:
        print(f"  layer {x['layer']:2d}: max {x['max']:4d} top4 {x['top4']} used {x['experts_used']}")
    return {"mean_rows": B * K / E, "busiest": mx, "share_over_2x_mean": share, "layers": layers}


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
