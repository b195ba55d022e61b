"""Engine throughput on the moonlight-16b-a3b shape (27 layers, 64 experts top-6, MLA 512/64),
bf16 and MXFP8 weights (seeded random weights made on the GPU: load_format="dummy").

(a) offline: 200 prompts x 1000 input / 100 output tokens, ignore_eos -> req/s, output tok/s
(b) RL shape: 64 prompts x n=16, 256 input / 1024 output tokens, temperature 1 -> output tok/s; rl_stops: the
    same with samples ending at scattered steps (stop tokens: 1 in 500 of the vocabulary), as RL batches end on EOS
    (a) and (b) each run twice on one engine; the second call is reported, the first as `first_call_*`
    (it includes one-time Triton compiles of new shapes; decode graphs are captured at engine start-up)
start: engine start-up seconds (weights made on the GPU, KV cache, every decode graph captured), and again with
    cuda_graph_lazy_capture
(c) decode step time at batch 1, 8, 32, 128, 256 against its floor: (weight bytes touched + KV bytes
    read) / same-run device copy bandwidth; experts touched per MoE layer estimated for uniform routing.
    Measured with the overlap schedule (as the engine runs) and again with the serial loop in the same run.
(d) same-run baseline: HF transformers generate on the same weights' shape, on what fits
Correctness in the same run: greedy tokens of the fast path vs the torch reference path for a small
batch (logprob difference reported), and one request alone vs inside a batch of 64.

    python benchmarks/throughput.py [--quick] [--modes bf16,mxfp8,mxfp8_moe_copy] [--skip-hf] [--out NAME]
                                    [--sections correctness,start,decode,offline,rl,rl_stops,hf_workload]
                                    [--decode-batches 1,8,32,128,256] [--decode-schedules overlap,serial]
    a mode may carry engine options: --modes bf16,bf16@chunked_prefill_size=16384
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, write_results  # noqa: E402
from mxroll import Engine, configs  # noqa: E402
from mxroll.model import ModelConfig  # noqa: E402
from mxroll.model.dummy import pin_routing  # noqa: E402

PRESET = "moonlight-16b-a3b"


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 300, (n, length), generator=g).tolist()


def mode_options(mode: str) -> tuple[str, dict]:
    """`bf16@chunked_prefill_size=16384@...`: the base mode and engine options to run it with (values as Python
    literals, else strings), so that an A/B of an option is two modes of one run."""
    base, *opts = mode.split("@")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise SystemExit(f"--modes: {opt!r} in {mode!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return base, options


def engine(mode: str, **kw) -> Engine:
    """mode: bf16 | mxfp8 | mxfp8_moe_copy (MXFP8 plus exact bf16 expert copies for large MoE calls), optionally
    followed by @key=value engine options (`mode_options`)."""
    mode, options = mode_options(mode)
    kw = {**options, **kw}
    if mode == "mxfp8_moe_copy" and kw.get("gemm_backend") != "torch":
        kw["mxfp8_moe_bf16_copy"] = True
    return Engine(model_path=f"preset:{PRESET}", load_format="dummy", device="cuda", dtype="bfloat16",
                  quantization="mxfp8" if mode.startswith("mxfp8") else None, progress=False, **kw)


def timed_generate(e: Engine, ids, params) -> tuple[float, list]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = e.generate(input_ids=ids, sampling_params=params)
    return time.perf_counter() - t0, out


def weight_bytes(cfg: ModelConfig, mxfp8: bool, experts_touched: list[float]) -> float:
    """Bytes of weights one decode step reads: every dense/attention/shared weight, the experts touched
    per MoE layer, the lm_head. MXFP8 modules: 1 byte per element + 1/32 scale byte."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q8 = 1 + 1 / 32 if mxfp8 else 2
    attn = D * H * cfg.qk_head_dim + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + H * cfg.v_head_dim * D
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    total = cfg.num_hidden_layers * (attn * q8 + kv_b * 2) + cfg.vocab_size * D * 2
    expert = 3 * D * cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            m = len([j for j in range(i) if cfg.is_moe_layer(j)])
            total += expert * (experts_touched[m] + cfg.n_shared_experts) * q8 + cfg.n_routed_experts * D * 2
        else:
            total += 3 * D * cfg.intermediate_size * q8
    return total


def decode_steps(e: Engine, batch: int, context: int, new: int, cfg: ModelConfig, bw: float, mxfp8: bool) -> dict:
    """Median wall time of decode steps with all `batch` sequences decoding (prefill chunks finish first:
    every sequence gets enough new tokens to outlast them)."""
    ids = prompts(batch, context, cfg.vocab_size, seed=batch)
    new += -(-batch * context // e.config.chunked_prefill_size)
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    e.steps.clear()
    out = e.generate(input_ids=ids, sampling_params=params, return_routed_experts=[True] + [False] * (batch - 1))
    steps = [s for s in e.steps if s.decode and s.rows == batch][2:]  # skip graph capture / first steps
    e.config.step_timing = True  # one more short run with per-phase times (device synced between phases)
    e.steps.clear()
    e.generate(input_ids=[i[:64] for i in ids], sampling_params=dict(params, max_new_tokens=12))
    e.config.step_timing = False
    timed = [s.phases for s in e.steps if s.decode and s.rows == batch][2:]
    phases = {k: 1e3 * statistics.median(p[k] for p in timed) for k in timed[0]} if timed else None
    step_s = statistics.median(s.seconds for s in steps)
    ahead = sum(s.ahead for s in steps) / max(len(steps), 1)
    # experts touched per MoE layer: from the routes of request 0 and the uniform-routing estimate
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = [E * (1 - (1 - K / E) ** batch)] * len(e.model.moe_layers)
    w = weight_bytes(cfg, mxfp8, touched)
    kv = batch * (context + new / 2) * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    floor = (w + kv) / bw
    routes = out[0]["meta_info"]["routed_experts"]
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "floor_ms": floor * 1e3,
            "ratio_to_floor": step_s / floor, "weight_GB": w / 1e9, "kv_GB": kv / 1e9, "decode_steps": len(steps),
            "tok_per_s": batch / step_s, "routes_shape": list(routes.shape), "phases_ms": phases,
            "overlap": not e.config.disable_overlap_schedule, "steps_launched_ahead": ahead}


def guarded(fn, *args, **kwargs):
    """Run one section; a failure is recorded in the results instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the log
        import traceback
        traceback.print_exc()
        return {"error": repr(e)[:800]}


def correctness(mode: str, cfg: ModelConfig, pinned: bool) -> dict:
    """Fast path (FlashInfer + CUDA graphs + Triton) vs the torch reference path on the same weights."""
    fast = engine(mode, max_total_tokens=1 << 14)
    ref = engine(mode, max_total_tokens=1 << 14, attention_backend="torch", gemm_backend="torch",
                 disable_cuda_graph=True)
    if pinned:
        pin_routing(fast.model)
        pin_routing(ref.model)
    ids = prompts(4, 64, cfg.vocab_size, seed=7)
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    a = fast.generate(input_ids=ids, sampling_params=greedy, return_logprob=True, top_logprobs_num=3)
    b = ref.generate(input_ids=ids, sampling_params=greedy, return_logprob=True, top_logprobs_num=3)
    # the first token's logits three ways: engine fast path, and one sequence through the torch attention
    # with the fast GEMMs (Triton) and with the reference GEMMs (torch)
    x = torch.tensor(ids[0], device="cuda")
    pos = torch.arange(len(ids[0]), device="cuda")
    seq_fast = fast.model.sequence_logits(x, pos, fast.model.new_cache(128))[-1]
    seq_ref = ref.model.sequence_logits(x, pos, ref.model.new_cache(128))[-1]
    diag = {"engine_fast_top3": a[0]["meta_info"]["output_top_logprobs"][0],
            "engine_ref_top3": b[0]["meta_info"]["output_top_logprobs"][0],
            "seq_fast_gemm_top3": torch.log_softmax(seq_fast, -1).topk(3).indices.tolist(),
            "seq_ref_gemm_top3": torch.log_softmax(seq_ref, -1).topk(3).indices.tolist(),
            "seq_logits_rel_diff": ((seq_fast - seq_ref).norm() / seq_ref.norm()).item(),
            "logits_std": seq_ref.std().item(), "logits_finite": bool(torch.isfinite(seq_ref).all())}
    first = {t: lp for lp, t, _ in diag["engine_ref_top3"]}
    diag["first_token_top3_abs_logprob_diff"] = max(
        (abs(lp - first[t]) for lp, t, _ in diag["engine_fast_top3"] if t in first), default=float("nan"))
    print(f"[{mode}{' pinned' if pinned else ''}] first-token diagnostics: {diag}", flush=True)
    ref.shutdown()
    first_div = []
    for x, y in zip(a, b):
        d = next((i for i, (s, t) in enumerate(zip(x["output_ids"], y["output_ids"])) if s != t), None)
        first_div.append(d)
    lp = [abs(p[0] - q[0]) for x, y in zip(a, b)
          for p, q, s, t in zip(x["meta_info"]["output_token_logprobs"], y["meta_info"]["output_token_logprobs"],
                                x["output_ids"], y["output_ids"]) if s == t]
    fast.steps.clear()
    alone = fast.generate(input_ids=ids[1], sampling_params=greedy, return_logprob=True)
    crowd = fast.generate(input_ids=[ids[1]] + prompts(63, 64, cfg.vocab_size, seed=8), sampling_params=greedy,
                          return_logprob=True)[0]
    batch_lp = [abs(p[0] - q[0]) for p, q in zip(alone["meta_info"]["output_token_logprobs"],
                                                  crowd["meta_info"]["output_token_logprobs"])]
    fast.shutdown()
    lp = lp or [float("nan")]
    res = {"diagnostics": diag, "greedy_equal_requests": sum(d is None for d in first_div), "requests": len(ids),
           "first_divergence": first_div, "max_abs_logprob_diff": max(lp), "mean_abs_logprob_diff": sum(lp) / len(lp),
           "alone_vs_batch64_tokens_equal": alone["output_ids"] == crowd["output_ids"],
           "alone_vs_batch64_max_abs_logprob_diff": max(batch_lp)}
    print(f"[{mode}{' pinned routes' if pinned else ''}] correctness: {res}", flush=True)
    return res


SECTIONS = ("correctness", "start", "decode", "offline", "rl", "rl_stops", "hf_workload")


def run_mode(mode: str, cfg: ModelConfig, bw: float, quick: bool, sections=SECTIONS,
             decode_batches=(1, 8, 32, 128, 256), schedules=("overlap", "serial")) -> dict:
    res = {"mode": mode}
    for pinned in (True, False) if "correctness" in sections else ():
        res["correctness_pinned_routes" if pinned else "correctness"] = guarded(correctness, mode, cfg, pinned)
        gc.collect()
        torch.cuda.empty_cache()
    if "start" in sections:  # start-up without the graph captures, for comparison (the engine below captures them)
        t0 = time.perf_counter()
        lazy = engine(mode, cuda_graph_lazy_capture=True)
        res["engine_start_lazy_capture_s"] = time.perf_counter() - t0
        lazy.shutdown()
        del lazy
        gc.collect()
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    e = engine(mode)
    res["engine_start_s"] = time.perf_counter() - t0
    print(f"[{mode}] engine start-up {res['engine_start_s']:.1f} s (decode graphs captured at start-up)"
          + (f", {res['engine_start_lazy_capture_s']:.1f} s with cuda_graph_lazy_capture" if "start" in sections
             else ""), flush=True)
    info = e.get_model_info()
    res["kv_cache_tokens"] = info["max_total_tokens"]
    warm = prompts(8, 64, cfg.vocab_size, seed=1)
    e.generate(input_ids=warm, sampling_params={"max_new_tokens": 8, "ignore_eos": True})
    # (c) decode step times: the engine as it runs (overlap schedule), then the serial loop in the same run
    res["decode"], res["decode_serial"] = [], []
    for serial in (s == "serial" for s in schedules) if "decode" in sections else ():
        e.config.disable_overlap_schedule = serial
        for b in decode_batches:
            r = guarded(decode_steps, e, b, 1024, 32 if quick else 64, cfg, bw, mode.startswith("mxfp8"))
            res["decode_serial" if serial else "decode"].append(r)
            if "step_ms" in r:
                print(f"[{mode}{' serial' if serial else ''}] decode B={b}: {r['step_ms']:.2f} ms/step, floor "
                      f"{r['floor_ms']:.2f} ms ({r['ratio_to_floor']:.2f}x), {r['steps_launched_ahead']:.0%} launched "
                      f"ahead; phases (synced, separate run) {r.get('phases_ms')}", flush=True)
    e.config.disable_overlap_schedule = False
    if "offline" in sections:
        res["offline"] = guarded(offline, e, cfg, mode, 50 if quick else 200)
    if "rl" in sections:
        res["rl"] = guarded(rl_shape, e, cfg, mode, *((16, 256) if quick else (64, 1024)))
    if "rl_stops" in sections:
        res["rl_stops"] = guarded(rl_shape, e, cfg, mode, *((16, 256) if quick else (64, 1024)), stop_every=500)
    if "hf_workload" in sections:
        ids_d = prompts(8, 256, cfg.vocab_size, seed=4)  # (d) the engine on the HF baseline's workload
        t, out = timed_generate(e, ids_d, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True})
        res["hf_workload"] = {"seconds": t, "output_tok_per_s": 8 * 32 / t}
    e.shutdown()
    del e
    gc.collect()
    torch.cuda.empty_cache()
    return res


def offline(e: Engine, cfg: ModelConfig, mode: str, n: int) -> dict:
    ids = prompts(n, 1000, cfg.vocab_size, seed=2)
    params = {"max_new_tokens": 100, "ignore_eos": True, "temperature": 1.0}
    torch.cuda.reset_peak_memory_stats()
    first, (t, out) = warm_twice(e, ids, params)
    peak = torch.cuda.max_memory_allocated() / 2**30
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    print(f"[{mode}] offline: {n / t:.2f} req/s, {toks / t:.0f} output tok/s (first call: {n / first:.2f} req/s), "
          f"peak allocated {peak:.1f} GiB", flush=True)
    return {"requests": n, "input": 1000, "output": 100, "seconds": t, "req_per_s": n / t,
            "output_tok_per_s": toks / t, "total_tok_per_s": (toks + n * 1000) / t,
            "first_call_seconds": first, "first_call_req_per_s": n / first, "peak_allocated_GiB": peak,
            "chunked_prefill_size": e.config.chunked_prefill_size}


def rl_shape(e: Engine, cfg: ModelConfig, mode: str, n_prompts: int, out_len: int, stop_every: int = 0) -> dict:
    """stop_every: samples also end on any token id divisible by it (1 / stop_every of the vocabulary), so they end
    at scattered steps as an RL batch ending on EOS does (mean length ~ stop_every at temperature 1 on random
    weights), not all at max_new_tokens."""
    ids = prompts(n_prompts, 256, cfg.vocab_size, seed=3)
    params = {"max_new_tokens": out_len, "ignore_eos": True, "temperature": 1.0, "n": 16}
    if stop_every:
        params["stop_token_ids"] = list(range(stop_every, cfg.vocab_size, stop_every))
    first, (t, out) = warm_twice(e, ids, params)
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    steps = [s for s in list(e.steps)[-out_len:] if s.decode]  # the second call's last decode steps
    loop = {"decode_steps": len(steps), "mean_step_ms": 1e3 * sum(s.seconds for s in steps) / max(1, len(steps)),
            "launched_ahead": sum(s.ahead for s in steps) / max(1, len(steps)),
            "mean_rows": sum(s.rows for s in steps) / max(1, len(steps)),
            "mean_launch_ms": 1e3 * sum(s.launch_s for s in steps) / max(1, len(steps)),
            "mean_device_wait_ms": 1e3 * sum(s.wait_s for s in steps) / max(1, len(steps))}
    print(f"[{mode}] RL{f' (stops: 1/{stop_every} of the vocab)' if stop_every else ''}: {toks / t:.0f} output "
          f"tok/s, {len(out) / t:.1f} samples/s (first call: {toks / first:.0f} tok/s), mean {toks / len(out):.0f} "
          f"tokens a sample; decode steps {loop['mean_step_ms']:.2f} ms ({loop['mean_rows']:.0f} rows, "
          f"{loop['launched_ahead']:.0%} launched ahead), host launch {loop['mean_launch_ms']:.2f} ms, blocked on "
          f"the device {loop['mean_device_wait_ms']:.2f} ms", flush=True)
    return {"prompts": n_prompts, "n": 16, "input": 256, "output": out_len, "stop_every": stop_every, "seconds": t,
            "output_tok_per_s": toks / t, "samples_per_s": len(out) / t, "first_call_seconds": first,
            "first_call_output_tok_per_s": toks / first, "loop": loop}


def warm_twice(e: Engine, ids, params) -> tuple[float, tuple[float, list]]:
    """Run the workload twice on the same engine: (seconds of the first call, (seconds, outputs) of the second).
    The first call of a new shape pays one-time costs (Triton compiles of new tile configs, CUDA-graph
    captures of new decode batch sizes: the engine captures lazily); the second is the steady state an RL
    loop sees from its second rollout on, and the figure reported."""
    first, _ = timed_generate(e, ids, params)
    return first, timed_generate(e, ids, params)


def hf_baseline(cfg_dict: dict) -> dict:
    import transformers

    cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg_dict.items() if k not in ("architectures",)})
    with torch.device("cuda"):
        model = transformers.DeepseekV3ForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts(8, 256, cfg.vocab_size, seed=4), device="cuda")
    model.generate(ids[:1, :16], max_new_tokens=2, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    res = {"transformers": transformers.__version__, "batch": 8, "input": 256, "output": 32, "seconds": t,
           "output_tok_per_s": 8 * 32 / t}
    print(f"HF transformers generate: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads (smoke run)")
    ap.add_argument("--modes", default="bf16,mxfp8")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="throughput")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--decode-batches", default="1,8,32,128,256", help="(c)'s batch sizes")
    ap.add_argument("--decode-schedules", default="overlap,serial",
                    help="(c) with the overlap schedule (the engine's default), the serial loop, or both")
    args = ap.parse_args()
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    if set(args.decode_schedules.split(",")) - {"overlap", "serial"}:
        ap.error(f"--decode-schedules: {args.decode_schedules!r}; choose from overlap, serial")
    cfg_dict = json.loads(configs.model_preset_path(PRESET).read_text())
    cfg = ModelConfig.from_dict(cfg_dict)
    env = environment()
    bw = measure_copy_bandwidth()
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s", flush=True)
    results = {"env": env, "copy_GBps": bw / 1e9, "model": PRESET, "modes": {}}
    for i, mode in enumerate(args.modes.split(",")):
        key = mode if mode not in results["modes"] else f"{mode}#{i}"  # a mode run again (A/B/A) keeps both
        results["modes"][key] = run_mode(mode, cfg, bw, args.quick, sections,
                                          [int(b) for b in args.decode_batches.split(",")],
                                          args.decode_schedules.split(","))
        saved = write_results(args.out, results)
        if os.environ.get("OUT"):  # the device runner brings back what is under $OUT, even after a timeout
            Path(os.environ["OUT"], saved.name).write_text(saved.read_text())
    if not args.skip_hf:
        try:
            results["hf"] = hf_baseline(cfg_dict)
        except Exception as e:  # noqa: BLE001 - report why the baseline did not run
            results["hf"] = {"error": repr(e)[:500]}
            print("HF baseline failed:", repr(e)[:500], flush=True)
    path = write_results(args.out, results)
    print(f"\n{'mode':6} {'offline req/s':>13} {'offline out tok/s':>17} {'RL out tok/s':>12}  decode ms/step (x floor)")
    for mode, r in results["modes"].items():
        get = lambda d, k: d.get(k, float("nan"))  # noqa: E731 - a failed or skipped section prints nan
        print(f"{mode:6} {get(r.get('offline', {}), 'req_per_s'):>13.2f} "
              f"{get(r.get('offline', {}), 'output_tok_per_s'):>17.0f} {get(r.get('rl', {}), 'output_tok_per_s'):>12.0f}  "
              + " ".join(f"B={d.get('batch', '?')}: {get(d, 'step_ms'):.2f} ({get(d, 'ratio_to_floor'):.2f}x)"
                         for d in r["decode"]))
        if r["decode_serial"]:
            print(f"{mode:6} serial loop, same run: " + " ".join(
                f"B={d.get('batch', '?')}: {get(d, 'step_ms'):.2f} ({get(d, 'ratio_to_floor'):.2f}x)"
                for d in r["decode_serial"]))
    if "hf" in results and "output_tok_per_s" in results["hf"] and "hf_workload" in sections:
        for mode, r in results["modes"].items():
            print(f"{mode}: engine {r['hf_workload']['output_tok_per_s']:.0f} tok/s vs HF "
                  f"{results['hf']['output_tok_per_s']:.1f} tok/s on 8 x (256 in / 32 out): "
                  f"{r['hf_workload']['output_tok_per_s'] / results['hf']['output_tok_per_s']:.1f}x")
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
