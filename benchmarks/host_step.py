"""The engine loop's host work per decode step at the RL shape, without a model: scheduler, step inputs, sampling
rows, token bookkeeping. Runs on any machine (CPU tensors; no device work is timed).

RL shape: P prompts x n samples (1024 rows), 256 prompt tokens, decoding at context C. Each decode step of the
overlap schedule is scheduled from the last (`schedule_next_decode`, `ahead_of`); two variants run side by side on
the same state, step after step:
  plain  - the step inputs and sampling rows built from the rows' Python lists (StepBuilder.build without
           `ahead_of`, SamplingRows.build from the params): what every step cost before the steady-decode paths;
  steady - the engine's path now (`_build_next` from the last step's arrays, `SamplingRows.advance`).
Both see the same rows (the plain builder and rows are built first, then the steady ones) and their step inputs
are checked equal every step. Also reported: the cyclic garbage collector's time during the timed steps. --routes:
every request asks return_routed_experts (the step's route arrays recorded per row, in `record`).

    python benchmarks/host_step.py [--context 512 768 1200] [--steps 50] [--routes] [--out NAME]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402
from mxroll.rollout.config import EngineConfig  # noqa: E402
from mxroll.rollout.engine import Engine  # noqa: E402
from mxroll.rollout.gc_watch import GcWatch  # noqa: E402
from mxroll.rollout.output import Record  # noqa: E402
from mxroll.rollout.pages import PagePool  # noqa: E402
from mxroll.rollout.request import Group  # noqa: E402
from mxroll.rollout.sampler import SamplingRows  # noqa: E402
from mxroll.rollout.sampling_params import SamplingParams  # noqa: E402
from mxroll.rollout.scheduler import Scheduler  # noqa: E402
from mxroll.rollout.step_builder import StepBuilder  # noqa: E402

PAGE, PROMPTS, N, PROMPT = 16, 64, 16, 256


class _Loop:
    """The engine attributes Engine._sampling_rows / _per_row / _record use (no model, no thread)."""

    def __init__(self):
        self._records, self._calls, self.device, self.weight_version = {}, {}, torch.device("cpu"), "default"
        self.config = EngineConfig()

    def _stream_updates(self, rows):
        return Engine._stream_updates(self, rows)


def ROUTES(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host route arrays of n tokens (moonlight: 26 MoE layers, top-6), as a step copies them back."""
    return torch.randint(0, 64, (n, 26, 6), dtype=torch.int32), torch.rand(n, 26, 6)


class _Step:
    def __init__(self, rows: int):
        self.qo_indptr = list(range(rows + 1))


class _Launched:
    def __init__(self, batch, rows):
        self.batch, self.rows = batch, rows


def run(context: int, steps: int, routes: bool = False) -> dict:
    out_len = context - PROMPT + steps + 8
    pool = PagePool(PROMPTS * N * (PROMPT + out_len) // PAGE + 1024)
    s = Scheduler(pool, page_size=PAGE, max_running=PROMPTS * N, max_batch_tokens=16384)
    params = SamplingParams.from_dict({"max_new_tokens": out_len, "ignore_eos": True, "temperature": 1.0, "n": N})
    for i in range(PROMPTS):
        s.add(Group(f"r{i}", [3 + (i + j) % 1000 for j in range(PROMPT)], params, list(range(N)), i))
    while True:  # prefill and fork: every row decoding
        batch = s.schedule()
        if batch.is_decode and len(batch.rows) == PROMPTS * N:
            break
        s.update(batch, [[5] * r.num_samples for r in batch.rows])
    loop = _Loop()
    for seq in s.running:
        loop._records[seq.seq_id] = Record(return_logprob=True, return_routed_experts=routes)
        if routes:  # the prompt's and the outputs' routes so far
            loop._records[seq.seq_id].add_routes(0, *(t.numpy() for t in ROUTES(len(seq.tokens) - 1)))
    prev = batch
    while PROMPT + prev.rows[0].seq.num_outputs < context:
        nxt = s.schedule_next_decode(prev)
        s.update(prev, [[5] for _ in prev.rows])
        if routes:
            for row in prev.rows:
                loop._records[row.seq.seq_id].add_routes(row.start, *(t.numpy() for t in ROUTES(1)))
        prev = nxt
    step_routes = ROUTES(len(prev.rows)) if routes else (None, None)
    plain_b = StepBuilder(PAGE, 4096, 4096, torch.device("cpu"), scratch_page=0)
    steady_b = StepBuilder(PAGE, 4096, 4096, torch.device("cpu"), scratch_page=0)
    ids = torch.zeros(len(prev.rows), dtype=torch.int64)
    steady_b.build(prev.rows, next_ids=ids)  # the step before the timed ones, built the plain way
    launched = _Launched(prev, Engine._sampling_rows(loop, prev))
    t = defaultdict(float)
    watch = GcWatch(float("inf"))  # the collector's time in the timed steps
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            nxt = s.schedule_next_decode(prev)
            ids = torch.zeros(len(nxt.rows), dtype=torch.int64)
            t1 = time.perf_counter()
            ref = plain_b.build(nxt.rows, next_ids=ids)
            t2 = time.perf_counter()
            ref_rows = SamplingRows.build([r.seq.group.params for r in nxt.rows],
                                          [r.seq.group.seeds[r.seq.index] for r in nxt.rows],
                                          [r.start + 1 for r in nxt.rows], loop.device, [0] * len(nxt.rows))
            t3 = time.perf_counter()
            got = steady_b.build(nxt.rows, next_ids=ids, ahead_of=nxt.ahead_of)
            t4 = time.perf_counter()
            rows = Engine._sampling_rows(loop, nxt, launched)
            t5 = time.perf_counter()
            tokens = [5] * len(prev.rows)
            per_row = Engine._per_row(prev, tokens)
            t6 = time.perf_counter()
            s.update(prev, per_row)
            t7 = time.perf_counter()
            host = {"logprobs": [-1.0] * len(tokens), "top_ids": None, "top_logprobs": None,
                    "route_ids": step_routes[0], "route_weights": step_routes[1]}
            Engine._record(loop, prev, _Step(len(prev.rows)), host, [True] * len(prev.rows), None)
            t8 = time.perf_counter()
            for name, a, b in (("schedule_next_decode", t0, t1), ("plain_build", t1, t2),
                               ("plain_sampling_rows", t2, t3), ("steady_build", t3, t4),
                               ("steady_sampling_rows", t4, t5), ("per_row", t5, t6), ("update", t6, t7),
                               ("record", t7, t8)):
                t[name] += b - a
            assert got.slots_T.tolist() == ref.slots_T.tolist() and got.kv_lens == ref.kv_lens
            assert got.table.kv_indices.tolist() == ref.table.kv_indices.tolist()
            assert rows.position.tolist() == ref_rows.position.tolist()
            prev, launched = nxt, _Launched(nxt, rows)
    finally:
        watch.close()
    ms = {k: 1e3 * v / steps for k, v in t.items()}
    common = ms["schedule_next_decode"] + ms["per_row"] + ms["update"] + ms["record"]
    ms["plain_total"] = common + ms["plain_build"] + ms["plain_sampling_rows"]
    ms["steady_total"] = common + ms["steady_build"] + ms["steady_sampling_rows"]
    return {"context": context, "routes": routes, "rows": len(prev.rows), "pages_per_row": len(prev.rows[0].seq.pages),
            "ms_per_step": ms, "gc_ms_per_step": 1e3 * sum(watch.seconds) / steps, "gc_collections": sum(watch.collections)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, nargs="+", default=[512, 768, 1200])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--routes", action="store_true", help="requests ask return_routed_experts (routing replay)")
    ap.add_argument("--out", default="host_step")
    args = ap.parse_args()
    env = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    results = {"env": env, "shape": {"prompts": PROMPTS, "n": N, "prompt": PROMPT, "page_size": PAGE}, "runs": []}
    keys = ("schedule_next_decode", "per_row", "update", "record", "plain_build", "steady_build",
            "plain_sampling_rows", "steady_sampling_rows", "plain_total", "steady_total")
    print(f"{'context':>7} " + " ".join(f"{k:>20}" for k in keys) + f" {'gc':>6}   (ms per step, {N * PROMPTS} rows)")
    for c in args.context:
        r = run(c, args.steps, args.routes)
        results["runs"].append(r)
        print(f"{c:>7} " + " ".join(f"{r['ms_per_step'][k]:>20.3f}" for k in keys) + f" {r['gc_ms_per_step']:>6.3f}")
    print(f"results -> {write_results(args.out, results)}")


if __name__ == "__main__":
    main()
