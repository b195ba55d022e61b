"""Engine throughput on the moonlight-16b-a3b shape (27 layers, 64 experts top-6, MLA 512/64),
bf16 and MXFP8 weights (seeded random weights made on the GPU: load_format="dummy").

(a) offline: 200 prompts x 1000 input / 100 output tokens, ignore_eos -> req/s, output tok/s
(b) RL shape: 64 prompts x n=16, 256 input / 1024 output tokens, temperature 1 -> output tok/s
(c) decode step time at batch 1, 8, 32, 128, 256 against its floor: (weight bytes touched + KV bytes
    read) / same-run device copy bandwidth; experts touched per MoE layer estimated for uniform routing
(d) same-run baseline: HF transformers generate on the same weights' shape, on what fits
Correctness in the same run: greedy tokens of the fast path vs the torch reference path for a small
batch (logprob difference reported), and one request alone vs inside a batch of 64.

    python benchmarks/throughput.py [--quick] [--modes bf16,mxfp8] [--skip-hf] [--out NAME]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, write_results  # noqa: E402
from mxroll import Engine, configs  # noqa: E402
from mxroll.model import ModelConfig  # noqa: E402

PRESET = "moonlight-16b-a3b"


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 300, (n, length), generator=g).tolist()


def engine(mode: str, **kw) -> Engine:
    return Engine(model_path=f"preset:{PRESET}", load_format="dummy", device="cuda", dtype="bfloat16",
                  quantization="mxfp8" if mode == "mxfp8" else None, progress=False, **kw)


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
    ids = prompts(batch, context, cfg.vocab_size, seed=batch)
    e.steps.clear()
    out = e.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
                     return_routed_experts=[True] + [False] * (batch - 1))
    steps = [s for s in e.steps if s.decode and s.rows == batch][2:]  # skip graph capture / first steps
    step_s = statistics.median(s.seconds for s in steps)
    # experts touched per MoE layer: from the routes of request 0 and the uniform-routing estimate
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = [E * (1 - (1 - K / E) ** batch)] * len(e.model.moe_layers)
    w = weight_bytes(cfg, mxfp8, touched)
    kv = batch * (context + new / 2) * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    floor = (w + kv) / bw
    routes = out[0]["meta_info"]["routed_experts"]
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "floor_ms": floor * 1e3,
            "ratio_to_floor": step_s / floor, "weight_GB": w / 1e9, "kv_GB": kv / 1e9, "decode_steps": len(steps),
            "tok_per_s": batch / step_s, "routes_shape": list(routes.shape)}


def correctness(mode: str, cfg: ModelConfig) -> dict:
    """Fast path (FlashInfer + CUDA graphs + Triton) vs the torch reference path on the same weights."""
    fast = engine(mode, max_total_tokens=1 << 14)
    ref = engine(mode, max_total_tokens=1 << 14, attention_backend="torch", gemm_backend="torch",
                 disable_cuda_graph=True)
    ids = prompts(4, 64, cfg.vocab_size, seed=7)
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    a = fast.generate(input_ids=ids, sampling_params=greedy, return_logprob=True)
    b = ref.generate(input_ids=ids, sampling_params=greedy, return_logprob=True)
    ref.shutdown()
    first_div = []
    for x, y in zip(a, b):
        d = next((i for i, (s, t) in enumerate(zip(x["output_ids"], y["output_ids"])) if s != t), None)
        first_div.append(d)
    lp = [abs(p[0] - q[0]) for x, y in zip(a, b)
          for p, q, s, t in zip(x["meta_info"]["output_token_logprobs"], y["meta_info"]["output_token_logprobs"],
                                x["output_ids"], y["output_ids"]) if s == t]
    alone = fast.generate(input_ids=ids[1], sampling_params=greedy, return_logprob=True)
    crowd = fast.generate(input_ids=[ids[1]] + prompts(63, 64, cfg.vocab_size, seed=8), sampling_params=greedy,
                          return_logprob=True)[0]
    batch_lp = [abs(p[0] - q[0]) for p, q in zip(alone["meta_info"]["output_token_logprobs"],
                                                  crowd["meta_info"]["output_token_logprobs"])]
    fast.shutdown()
    res = {"greedy_equal_requests": sum(d is None for d in first_div), "requests": len(ids),
           "first_divergence": first_div, "max_abs_logprob_diff": max(lp), "mean_abs_logprob_diff": sum(lp) / len(lp),
           "alone_vs_batch64_tokens_equal": alone["output_ids"] == crowd["output_ids"],
           "alone_vs_batch64_max_abs_logprob_diff": max(batch_lp)}
    print(f"[{mode}] correctness: {res}", flush=True)
    return res


def run_mode(mode: str, cfg: ModelConfig, bw: float, quick: bool) -> dict:
    res = {"mode": mode}
    res["correctness"] = correctness(mode, cfg)
    gc.collect()
    torch.cuda.empty_cache()
    e = engine(mode)
    info = e.get_model_info()
    res["kv_cache_tokens"] = info["max_total_tokens"]
    warm = prompts(8, 64, cfg.vocab_size, seed=1)
    e.generate(input_ids=warm, sampling_params={"max_new_tokens": 8, "ignore_eos": True})
    # (c) decode step times
    res["decode"] = []
    for b in (1, 8, 32, 128, 256):
        r = decode_steps(e, b, 1024, 32 if quick else 64, cfg, bw, mode == "mxfp8")
        res["decode"].append(r)
        print(f"[{mode}] decode B={b}: {r['step_ms']:.2f} ms/step, floor {r['floor_ms']:.2f} ms "
              f"({r['ratio_to_floor']:.2f}x)", flush=True)
    # (a) offline
    n_a = 50 if quick else 200
    t, out = timed_generate(e, prompts(n_a, 1000, cfg.vocab_size, seed=2),
                            {"max_new_tokens": 100, "ignore_eos": True, "temperature": 1.0})
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    res["offline"] = {"requests": n_a, "input": 1000, "output": 100, "seconds": t, "req_per_s": n_a / t,
                      "output_tok_per_s": toks / t, "total_tok_per_s": (toks + n_a * 1000) / t}
    print(f"[{mode}] offline: {n_a / t:.2f} req/s, {toks / t:.0f} output tok/s", flush=True)
    # (b) RL shape
    n_b, out_len = (16, 256) if quick else (64, 1024)
    t, out = timed_generate(e, prompts(n_b, 256, cfg.vocab_size, seed=3),
                            {"max_new_tokens": out_len, "ignore_eos": True, "temperature": 1.0, "n": 16})
    toks = sum(o["meta_info"]["completion_tokens"] for o in out)
    res["rl"] = {"prompts": n_b, "n": 16, "input": 256, "output": out_len, "seconds": t, "output_tok_per_s": toks / t,
                 "samples_per_s": len(out) / t}
    print(f"[{mode}] RL: {toks / t:.0f} output tok/s, {len(out) / t:.1f} samples/s", flush=True)
    # (d) the engine on the HF workload
    ids_d = prompts(8, 256, cfg.vocab_size, seed=4)
    t, out = timed_generate(e, ids_d, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True})
    res["hf_workload"] = {"seconds": t, "output_tok_per_s": 8 * 32 / t}
    e.shutdown()
    del e
    gc.collect()
    torch.cuda.empty_cache()
    return res


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
    args = ap.parse_args()
    cfg_dict = json.loads(configs.model_preset_path(PRESET).read_text())
    cfg = ModelConfig.from_dict(cfg_dict)
    env = environment()
    bw = measure_copy_bandwidth()
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s", flush=True)
    results = {"env": env, "copy_GBps": bw / 1e9, "model": PRESET, "modes": {}}
    for mode in args.modes.split(","):
        results["modes"][mode] = run_mode(mode, cfg, bw, args.quick)
        write_results(args.out, results)
    if not args.skip_hf:
        try:
            results["hf"] = hf_baseline(cfg_dict)
        except Exception as e:  # noqa: BLE001 - report why the baseline did not run
            results["hf"] = {"error": repr(e)[:500]}
            print("HF baseline failed:", repr(e)[:500], flush=True)
    path = write_results(args.out, results)
    print(f"\n{'mode':6} {'offline req/s':>13} {'offline out tok/s':>17} {'RL out tok/s':>12} "
          + " ".join(f"{'B=' + str(r['batch']) + ' ms (x floor)':>18}" for r in results["modes"][next(iter(results['modes']))]["decode"]))
    for mode, r in results["modes"].items():
        print(f"{mode:6} {r['offline']['req_per_s']:>13.2f} {r['offline']['output_tok_per_s']:>17.0f} "
              f"{r['rl']['output_tok_per_s']:>12.0f} "
              + " ".join(f"{d['step_ms']:>9.2f} ({d['ratio_to_floor']:.2f}x)" for d in r["decode"]))
    if "hf" in results and "output_tok_per_s" in results["hf"]:
        for mode, r in results["modes"].items():
            print(f"{mode}: engine {r['hf_workload']['output_tok_per_s']:.0f} tok/s vs HF "
                  f"{results['hf']['output_tok_per_s']:.1f} tok/s on 8 x (256 in / 32 out): "
                  f"{r['hf_workload']['output_tok_per_s'] / results['hf']['output_tok_per_s']:.1f}x")
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
