"""Decode-step overheads on the moonlight-16b-a3b shape (dummy bf16 weights, one GPU), before/after the
switches of the host-path and small-kernel work, in one run (a few minutes on an H200).

Per batch size (1, 32, 256; prompts of 512 tokens), on an engine with the defaults ("after": Triton
RMSNorm, router top-k and MLA rope, FlashInfer MLA graphs re-planned through the planner module) and one with
`norm_backend=torch, router_backend=torch, rope_backend=torch, latent_backend=torch, act_backend=torch,
attention_fast_plan=False` ("before"):
- host time per decode step split by phase, no device syncs added: schedule, inputs (step builder +
  sampling rows), plan (attention begin), launch (rest of the runner: graph replay launch, logits view),
  sample (sampler enqueue), wait (the tokens' read-back: device time the host waits for), outputs;
- GPU time of the decode graph's replay alone (CUDA events);
- micro timings of the host pieces old vs new: StepInputs.build + page table lists vs StepBuilder,
  FlashInfer plan() vs the direct replan;
- checks: logits of a replay planned by plan() and by the direct replan are bit-identical; Triton
  norm / router on the model's real weights vs the torch references; greedy tokens and logprobs of
  "after" vs "before" (routes pinned, as in throughput.py) and of each against one sequence through
  the eager model with the torch reference attention.

    python benchmarks/decode_overheads.py [--batches 1 32 256] [--steps 30] [--out decode_overheads]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, time_events, write_results  # noqa: E402
from mxroll import Engine  # noqa: E402
from mxroll.model.dummy import pin_routing  # noqa: E402
from mxroll.model.ops import add_rmsnorm, rmsnorm, rope, route_topk_ref  # noqa: E402
from mxroll.rollout.inflight import HostCopy  # noqa: E402
from mxroll.rollout.step_inputs import PageTable, StepInputs  # noqa: E402

PRESET = "moonlight-16b-a3b"
CONTEXT = 512
VARIANTS = {"after": {}, "before": {"norm_backend": "torch", "router_backend": "torch", "rope_backend": "torch",
                                    "latent_backend": "torch", "act_backend": "torch", "attention_fast_plan": False}}


def engine(**kw) -> Engine:
    return Engine(model_path=f"preset:{PRESET}", load_format="dummy", device="cuda", dtype="bfloat16",
                  progress=False, max_total_tokens=1 << 18, cuda_graph_max_bs=256, **kw)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 150000, (n, length), generator=g).tolist()


def guarded(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
        traceback.print_exc()
        return {"error": repr(e)[:800]}


def host_ms(fn, n: int = 50) -> float:
    """Median host milliseconds of fn() (no device sync inside the timing)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()  # between calls only: each call starts from an idle device
    return 1e3 * statistics.median(times)


class PhaseTimer:
    """Engine.step's work, phase by phase, with perf_counter marks only (no syncs added)."""

    def __init__(self, e: Engine):
        self.e, self.plan_s, self.rows = e, 0.0, []
        begin = e.attn.begin

        def timed_begin(*a, **k):  # attention plan time inside the runner's forward
            t = time.perf_counter()
            begin(*a, **k)
            self.plan_s += time.perf_counter() - t
        e.attn.begin = timed_begin

    def step(self, B: int) -> None:
        e, t = self.e, [time.perf_counter()]
        batch = e.scheduler.schedule()
        t.append(time.perf_counter())
        step = e.runner.prepare(batch.rows)
        rows = e._sampling_rows(batch)
        t.append(time.perf_counter())
        self.plan_s = 0.0
        out = e.runner.forward(step, batch.copies, e._wants_routes(batch))
        t.append(time.perf_counter())
        sampled = e.sampler(out.logits_SV, rows)
        t.append(time.perf_counter())
        host = HostCopy(sampled, None, e.device).wait()  # the step's one wait, as the engine loop's
        tokens = host["tokens"]
        t.append(time.perf_counter())
        finished = e.scheduler.update(batch, e._per_row(batch, tokens))
        e._record(batch, step, host, [True] * len(batch.rows), None)
        e._complete(finished)
        t.append(time.perf_counter())
        if step.graph and len(batch.rows) == B:
            d = [b - a for a, b in zip(t, t[1:])]
            self.rows.append({"schedule": d[0], "inputs": d[1], "plan": self.plan_s, "launch": d[2] - self.plan_s,
                              "sample": d[3], "wait": d[4], "outputs": d[5]})


def decode_phases(e: Engine, B: int, steps: int) -> dict:
    timer = PhaseTimer(e)
    e.pause_generation(mode="in_place")
    call = e._submit(None, prompts(B, CONTEXT, seed=B), {"max_new_tokens": steps + 24, "ignore_eos": True,
                                                          "temperature": 0}, False, None, False, None)

    def run():
        for _ in range(-(-B * CONTEXT // e.config.chunked_prefill_size) + 4):  # prefill, first decode steps
            timer.step(B)
        timer.rows.clear()
        for _ in range(steps):
            timer.step(B)
        return micro(e, B)
    res = {"micro": e._command(run)}
    del e.attn.begin  # the class's method again
    e.abort_request(abort_all=True)
    e.continue_generation()
    call.future.result()
    phases = {k: 1e3 * statistics.median(r[k] for r in timer.rows) for k in timer.rows[0]}
    phases["host_total"] = sum(v for k, v in phases.items() if k != "wait")
    res["host_phases_ms"] = phases
    res["step_ms"] = 1e3 * statistics.median(sum(r.values()) for r in timer.rows)
    size = min(s for s in e.runner.graphs.sizes if s >= B)
    graph, _ = e.runner.graphs.graphs[size]
    res["graph_replay_gpu_ms"] = 1e3 * time_events(graph.replay, iters=20)
    res["plan_path"] = e.attn.plan_paths.get(size)
    print(f"  B={B}: step {res['step_ms']:.2f} ms, replay (GPU) {res['graph_replay_gpu_ms']:.2f} ms, host phases "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()), flush=True)
    print(f"  B={B}: micro {res['micro']}", flush=True)
    return res


@torch.inference_mode()
def micro(e: Engine, B: int) -> dict:
    """Old vs new host pieces on the next decode step, and the plan() / direct-replan equivalence."""
    batch = e.scheduler.schedule()
    rows = batch.rows
    size = e.runner.graphs.size_for(rows)
    graph, gplan = e.runner.graphs.graphs[size]
    res = {"old_step_inputs_ms": host_ms(lambda: StepInputs.build(rows, e.page_size, e.device)),
           "old_page_table_ms": host_ms(lambda: PageTable.from_lists(
               [*range(B + 1)], [r.seq.pages[:-(-(r.start + 1) // e.page_size)] for r in rows],
               [r.start + 1 for r in rows])),
           "new_step_builder_ms": host_ms(lambda: e.step_builder.build(rows, pad_to=size)),
           "sampling_rows_ms": host_ms(lambda: e._sampling_rows(batch))}
    step = e.runner.prepare(rows)
    table = step.page_table()
    res["plan_public_ms"] = host_ms(lambda: e.attn.plan(gplan.wrapper, table))
    e.attn.begin(step, gplan)  # what the engine runs for this step (public the first time when fast_plan is off)
    if gplan.replanner is not None:
        res["plan_direct_ms"] = host_ms(lambda: gplan.replanner.plan(table))
        e.attn.plan(gplan.wrapper, table)
        graph.replay()
        a = e.runner.graphs.logits[:B].clone()
        gplan.replanner.plan(table)
        graph.replay()
        b = e.runner.graphs.logits[:B].clone()
        res["direct_vs_public_replay_logits_equal"] = bool(torch.equal(a, b))
    res["graph_replay_launch_host_ms"] = host_ms(graph.replay, n=20)
    e.step_builder.release()
    # the hand-scheduled step is undone by feeding it a token and letting the caller abort
    e.scheduler.update(batch, [[1] * r.num_samples for r in rows])
    return res


@torch.inference_mode()
def kernel_checks(e: Engine) -> dict:
    """Triton norm / router on the model's weights vs the torch references (bf16 tolerance)."""
    out, k = {}, e.model.kernels
    blk = e.model.layers[e.model.moe_layers[0]]
    x = torch.randn(256, e.model_config.hidden_size, device="cuda", dtype=torch.bfloat16)
    d = torch.randn_like(x)
    w = blk.post_attention_layernorm.weight
    h, s = add_rmsnorm(x, d, w, 1e-5, k.norm)
    h_ref, s_ref = add_rmsnorm(x, d, w, 1e-5, "torch")
    out["norm_backend"] = k.norm
    out["add_norm_sum_equal"] = bool(torch.equal(s, s_ref))
    out["add_norm_equal_fraction"] = (h == h_ref).float().mean().item()
    out["add_norm_max_abs_diff"] = (h.float() - h_ref.float()).abs().max().item()
    C, R = e.model_config.kv_lora_rank, e.model_config.qk_rope_head_dim
    lat = torch.randn(256, C + R, device="cuda", dtype=torch.bfloat16)[:, :C]  # the latent's strided view
    lw = blk.self_attn.kv_a_layernorm.weight
    out["latent_norm_equal_fraction"] = (rmsnorm(lat, lw, 1e-5, k.norm) == rmsnorm(lat, lw, 1e-5, "torch")
                                         ).float().mean().item()
    gate = blk.mlp.gate
    wts, ids = gate(x)
    scores = torch.nn.functional.linear(x.float(), gate.weight.float()).sigmoid()
    w_ref, ids_ref = route_topk_ref(scores, gate.e_score_correction_bias, gate.top_k, gate.n_group, gate.topk_group,
                                    gate.norm_topk_prob, gate.routed_scaling_factor)
    out["router_backend"] = k.router
    out["router_ids_equal_fraction"] = (ids == ids_ref).all(-1).float().mean().item()
    same = (ids == ids_ref).all(-1)
    out["router_weights_max_abs_diff_on_equal_rows"] = (wts[same] - w_ref[same]).abs().max().item()
    H, P = e.model_config.num_attention_heads, e.model_config.qk_nope_head_dim
    q_pe = torch.randn(256, H, P + R, device="cuda", dtype=torch.bfloat16)[..., P:]
    k_pe = torch.randn(256, C + R, device="cuda", dtype=torch.bfloat16)[:, C:]
    cos_sin = e.model.rope.cos_sin(torch.randint(0, 4096, (256,), device="cuda"))
    got, ref = (rope(q_pe, k_pe, cos_sin, e.model_config.rope.interleave, b) for b in (k.rope, "torch"))
    out["rope_backend"] = k.rope
    out["rope_equal"] = bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
    print(f"  kernel checks: {out}", flush=True)
    return out


def generations(e: Engine) -> dict:
    """Greedy 4 x 16 tokens (routes pinned) and the first token's top-3 from the eager model with the torch
    reference attention for prompt 0."""
    pin_routing(e.model)
    ids = prompts(4, 64, seed=7)
    out = e.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 16, "ignore_eos": True},
                     return_logprob=True, top_logprobs_num=3)
    x = torch.tensor(ids[0], device="cuda")
    eager = e.model.sequence_logits(x, torch.arange(len(ids[0]), device="cuda"), e.model.new_cache(128))[-1]
    lp = torch.log_softmax(eager, -1)
    top = out[0]["meta_info"]["output_top_logprobs"][0]
    return {"tokens": [o["output_ids"] for o in out],
            "logprobs": [[p[0] for p in o["meta_info"]["output_token_logprobs"]] for o in out],
            "engine_first_top3": [(t, lp_) for lp_, t, _ in top],
            "eager_first_top3": [(t, lp[t].item()) for t in lp.topk(3).indices.tolist()],
            "eager_vs_engine_first_top3_max_abs_diff": max(abs(lp[t].item() - lp_) for lp_, t, _ in top)}


def compare(a: dict, b: dict) -> dict:
    equal = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    diffs = [abs(p - q) for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"])
             for s, t, p, q in zip(ta, tb, la, lb) if s == t]
    return {"greedy_equal_sequences": equal, "sequences": len(a["tokens"]),
            "max_abs_logprob_diff_on_equal_tokens": max(diffs) if diffs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="after,before")
    ap.add_argument("--out", default="decode_overheads")
    args = ap.parse_args()
    results = {"env": environment(), "model": PRESET, "context": CONTEXT, "variants": {}}
    for name in args.variants.split(","):
        print(f"[{name}] engine options {VARIANTS[name]}", flush=True)
        t0 = time.perf_counter()
        e = engine(**VARIANTS[name])
        r = results["variants"][name] = {"options": VARIANTS[name], "build_s": time.perf_counter() - t0,
                                         "kernels": str(e.model.kernels), "decode": {}}
        r["kernel_checks"] = guarded(kernel_checks, e)
        for B in args.batches:
            r["decode"][B] = guarded(decode_phases, e, B, args.steps)
            write_results(args.out, results)
        r["generation"] = guarded(generations, e)
        e.shutdown()
        del e
        gc.collect()
        torch.cuda.empty_cache()
        write_results(args.out, results)
    v = results["variants"]
    if all(n in v and "tokens" in v[n].get("generation", {}) for n in ("after", "before")):
        results["after_vs_before"] = compare(v["after"]["generation"], v["before"]["generation"])
        print(f"after vs before (routes pinned): {results['after_vs_before']}", flush=True)
    path = write_results(args.out, results)
    print(f"\n{'variant':8} {'B':>4} {'step ms':>8} {'replay GPU':>10} {'host':>7} {'plan':>6}  plan path")
    for name, r in v.items():
        for B, d in r["decode"].items():
            if "step_ms" in d:
                p = d["host_phases_ms"]
                print(f"{name:8} {B:>4} {d['step_ms']:>8.2f} {d['graph_replay_gpu_ms']:>10.2f} {p['host_total']:>7.2f} "
                      f"{p['plan']:>6.3f}  {d['plan_path']}")
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
