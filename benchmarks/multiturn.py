"""Multi-turn rollouts with and without the prefix cache (enable_prefix_caching), same run, same workload.

Each of C conversations starts from a P-token prompt; every turn generates O tokens (greedy, ignore_eos) and the
next turn resends the conversation plus U new user tokens, T turns in all. Without the cache every turn prefills
the whole conversation again; with it only what follows the last turn's cached full pages. Counted first: the
prefill tokens each variant computes (the cache's saving is the prompt tokens served from it, meta_info
cached_tokens); then measured: seconds per turn and in all, after a warm-up pass of the same workload on other
tokens (the cache flushed after it). Correctness in the same run: the first turn's tokens of both engines (nothing
cached yet) must be equal; later turns are compared token by token (first and median divergence reported: a cached
prefix's KV comes from other batches and chunkings, bf16 noise can flip a near-tie), and, over the conversations
whose prompt is still the same in both (every earlier output equal), the logprob of the turn's first output token
where that token agrees.

    python benchmarks/multiturn.py [--conversations 64] [--turns 4] [--prompt 1024] [--output 256] [--user 128]
                                   [--out multiturn] [--cpu-smoke]
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
from mxroll.model.dummy import pin_routing  # noqa: E402


def make_engine(cached: bool, smoke: bool) -> Engine:
    if smoke:  # the built-in tiny model on the CPU: checks the script, measures nothing
        return Engine(model_path="preset:tiny", device="cpu", progress=False, enable_prefix_caching=cached)
    e = Engine(model_path="preset:moonlight-16b-a3b", load_format="dummy", device="cuda", dtype="bfloat16",
               progress=False, enable_prefix_caching=cached)
    pin_routing(e.model)  # random weights route near ties: pinned routes keep the two engines comparable
    return e


def run(e: Engine, args, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    convs = torch.randint(3, vocab - 300, (args.conversations, args.prompt), generator=g).tolist()
    params = {"max_new_tokens": args.output, "temperature": 0, "ignore_eos": True}
    turns, outputs, first_logprobs, prompts = [], [], [], []
    for turn in range(args.turns):
        prefill = sum(len(c) for c in convs)
        prompts.append(convs)
        if e.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = e.generate(input_ids=convs, sampling_params=params, return_logprob=True)
        seconds = time.perf_counter() - t0
        cached = sum(o["meta_info"]["cached_tokens"] for o in out)
        turns.append({"turn": turn, "prompt_tokens": prefill, "cached_tokens": cached,
                      "prefill_tokens_computed": prefill - cached, "seconds": seconds})
        outputs.append([o["output_ids"] for o in out])
        first_logprobs.append([o["meta_info"]["output_token_logprobs"][0][0] for o in out])
        user = torch.randint(3, vocab - 300, (args.conversations, args.user), generator=g).tolist()
        convs = [c + o["output_ids"] + u for c, o, u in zip(convs, out, user)]
    return {"turns": turns, "seconds": sum(t["seconds"] for t in turns), "outputs": outputs,
            "first_logprobs": first_logprobs, "prompts": prompts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--user", type=int, default=128)
    ap.add_argument("--out", default="multiturn")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: check the script only")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        args.conversations, args.turns, args.prompt, args.output, args.user = 4, 3, 40, 8, 5
    env = environment() if not smoke else {"device": "cpu (smoke run: no figures)"}
    results = {"env": env, "workload": {k: getattr(args, k) for k in ("conversations", "turns", "prompt", "output",
                                                                      "user")}, "variants": {}}
    runs = {}
    for cached in (False, True):
        e = make_engine(cached, smoke)
        name = "prefix_cache" if cached else "no_cache"
        run(e, args, e.model_config.vocab_size, seed=1)  # warm-up: kernel compiles and tunings of these shapes
        e.flush_cache()
        runs[name] = run(e, args, e.model_config.vocab_size)
        e.shutdown()
        del e
        if not smoke:
            torch.cuda.empty_cache()
    a, b = runs["no_cache"], runs["prefix_cache"]
    first_equal = a["outputs"][0] == b["outputs"][0]
    divergence = []
    for turn, (xs, ys) in enumerate(zip(a["outputs"], b["outputs"])):
        diffs = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None) for x, y in zip(xs, ys)]
        # where both engines got the same prompt (every earlier turn's output equal), the first output token's
        # logprob shows how far the cached KV moved it; past a divergence the conversations differ
        same = [i for i, (p, q) in enumerate(zip(a["prompts"][turn], b["prompts"][turn])) if p == q]
        same_first = [i for i in same if xs[i][0] == ys[i][0]]
        lp = [abs(a["first_logprobs"][turn][i] - b["first_logprobs"][turn][i]) for i in same_first]
        known = sorted(d for d in diffs if d is not None)
        divergence.append({"turn": turn, "conversations_equal": sum(d is None for d in diffs),
                           "same_prompt": len(same), "first_token_equal": len(same_first),
                           "first_token_max_abs_logprob_diff": max(lp, default=None),
                           "first_divergence": known[0] if known else None,
                           "median_divergence": known[len(known) // 2] if known else None})
    print(f"{env['device']}: {args.conversations} conversations x {args.turns} turns, prompt {args.prompt}, "
          f"+{args.output} out +{args.user} user per turn")
    print(f"{'turn':>4} {'prompt tok':>10} {'cached':>8} {'s no cache':>10} {'s cache':>8} {'speed-up':>8}")
    for ta, tb in zip(a["turns"], b["turns"]):
        print(f"{ta['turn']:>4} {ta['prompt_tokens']:>10} {tb['cached_tokens']:>8} {ta['seconds']:>10.3f} "
              f"{tb['seconds']:>8.3f} {ta['seconds'] / tb['seconds']:>7.2f}x")
    print(f"all turns: {a['seconds']:.3f} s without, {b['seconds']:.3f} s with the prefix cache "
          f"({a['seconds'] / b['seconds']:.2f}x); first turn's tokens equal: {first_equal}; per turn {divergence}")
    for name, r in runs.items():
        results["variants"][name] = {"turns": r["turns"], "seconds": r["seconds"]}
    results.update(speedup=a["seconds"] / b["seconds"], first_turn_tokens_equal=first_equal, divergence=divergence)
    if not smoke:
        print(f"results -> {write_results(args.out, results)}")
    assert first_equal, "nothing is cached in the first turn: both engines must give the same tokens"


if __name__ == "__main__":
    main()
