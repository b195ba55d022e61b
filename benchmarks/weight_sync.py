"""Live weight update of the moonlight-16b-a3b shape: trainer process on GPU0, engine process on GPU1,
NCCL (`sync.sender.WeightSender` -> `Engine.update_weights_from_distributed`, flattened buckets).

Payloads: MXFP8 (e4m3 + E8M0 scales for the recipe's weights, the rest bf16) into an MXFP8 engine, and
bf16 into a bf16 engine, per-expert HF names (what a trainer's state dict holds). Bucket sizes 64 MiB to
2 GiB. Per update: end to end (first engine call -> weights live, validation, commit and layout
post-processing included) as the trainer sees it, the engine's own phases, bytes moved. Floor: the
same run's NCCL broadcast of one large buffer GPU0 -> GPU1 (bytes / bandwidth). Also the update
while the engine generates (pause_generation in_place, update, continue), and allocations over
repeated updates. Correctness in the same run: the engine's bytes equal the trainer's for sampled
tensors after the update.

    python benchmarks/weight_sync.py [--quick] [--buckets 64,256,512,1024,2048] [--repeats 3]
Needs 2 GPUs (device kind nvidia-h200-x2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESET = "moonlight-16b-a3b"
MiB = 1 << 20


# ---- the engine process: an Engine on GPU1 answering calls from the trainer over a pipe -------------
def engine_main(conn, mode: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"  # before CUDA starts in this process: GPU1 is its cuda:0
    from mxroll import Engine

    try:
        engine = Engine(model_path=f"preset:{PRESET}", load_format="dummy", device="cuda", dtype="bfloat16",
                        quantization="mxfp8" if mode == "mxfp8" else None, max_total_tokens=65536,
                        progress=False, seed=0, disable_cuda_graph=True)  # graphs do not matter to a sync
        conn.send(("ready", True, None))
    except BaseException:  # noqa: BLE001
        conn.send(("ready", False, traceback.format_exc()))
        return
    lock = threading.Lock()
    background: dict = {}

    def handle(call_id, method, kwargs):
        try:
            if method == "generate_background":
                background["t"] = threading.Thread(target=lambda: background.update(
                    out=engine.generate(**kwargs)), daemon=True)
                background["t"].start()
                result = True
            elif method == "wait_background":
                background["t"].join()
                outs = background["out"]
                result = sorted({s["output_index"] for o in outs for s in o["meta_info"].get(
                    "weight_version_switches", [])[1:]})
            elif method == "stats":
                result = {"last_update": engine.last_update, "staging_allocations":
                          engine.receiver.staging_allocations,
                          "allocated_GiB": torch.cuda.memory_allocated() / 2**30,
                          "reserved_GiB": torch.cuda.memory_reserved() / 2**30}
            elif method == "weights":
                result = {n: torch.tensor(engine.get_weights_by_name(n, truncate_size=4)) for n in kwargs["names"]}
            else:
                result = getattr(engine, method)(**kwargs)
            reply = (call_id, True, result)
        except BaseException:  # noqa: BLE001
            reply = (call_id, False, traceback.format_exc())
        with lock:
            conn.send(reply)

    while True:
        msg = conn.recv()
        if msg is None:
            break
        threading.Thread(target=handle, args=msg, daemon=True).start()
    engine.shutdown()


class RemoteEngine:
    """The engine's methods, called over the pipe (what sync.http_client does over HTTP)."""

    def __init__(self, conn):
        self.conn, self.lock, self.waiting, self.ids = conn, threading.Lock(), {}, iter(range(10**9))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        while True:
            try:
                call_id, ok, value = self.conn.recv()
            except EOFError:
                return
            slot = self.waiting.pop(call_id)
            slot.append((ok, value))
            slot[0].set()

    def call(self, method, **kwargs):
        event = threading.Event()
        slot = [event]
        with self.lock:
            call_id = next(self.ids)
            self.waiting[call_id] = slot
            self.conn.send((call_id, method, kwargs))
        if not event.wait(300):
            raise RuntimeError(f"engine {method}: no answer in 300 s")
        ok, value = slot[1]
        if not ok:
            raise RuntimeError(f"engine {method} failed:\n{value}")
        return value

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda **kw: self.call(method, **kw)


# ---- the trainer process (this one): weights on GPU0 -----------------------------------------------
def trainer_weights(mode: str) -> list[tuple[str, torch.Tensor]]:
    """Per-expert HF-named tensors of a moonlight-shaped model made on GPU0 (seed 1: differs from the
    engine's seed-0 dummy weights); MXFP8 weights as the e4m3 data + scale bytes of the recipe."""
    from mxroll import configs
    from mxroll.model import ModelConfig
    from mxroll.model.dummy import init_dummy_weights
    from mxroll.model.loader import build_model, expected_slots
    from mxroll.model.names import SCALE_SUFFIX, engine_to_hf
    from mxroll.precision import GemmConfig, Recipe

    cfg = ModelConfig.from_file(configs.model_preset_path(PRESET))
    model = build_model(cfg, torch.bfloat16, "mxfp8" if mode == "mxfp8" else None, Recipe(), GemmConfig())
    model = model.to_empty(device="cuda:0")
    init_dummy_weights(model, seed=1)
    params = dict(model.named_parameters())
    out = []
    for name, p in params.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = params.get(name + SCALE_SUFFIX)
        for expert, half in sorted(expected_slots(name, p), key=lambda s: (s[0] or 0, s[1] or 0)):
            for pname, t in ((name, p), (name + SCALE_SUFFIX, scale)):
                if t is None:
                    continue
                view = t if expert is None else t[expert]
                if half is not None:
                    rows = view.shape[0] // 2
                    view = view[half * rows:(half + 1) * rows]
                out.append((engine_to_hf(pname, expert, half), view))
    return out


def nccl_floor(nbytes: int, port: int) -> dict:
    """Same-run NCCL broadcast bandwidth GPU0 -> GPU1 of one large buffer, via the project's update group."""
    from mxroll.sync.group import UpdateGroup

    def peer():
        g = UpdateGroup("floor", "nccl", "127.0.0.1", port, 1, 2)
        buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
        for _ in range(6):
            g.broadcast(buf)
        torch.cuda.synchronize(1)
        g.destroy()

    t = threading.Thread(target=peer)
    t.start()
    g = UpdateGroup("floor", "nccl", "127.0.0.1", port, 0, 2)
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda:0")
    times = []
    for _ in range(6):
        torch.cuda.synchronize(0)
        t0 = time.perf_counter()
        g.broadcast(buf)
        torch.cuda.synchronize(0)
        times.append(time.perf_counter() - t0)
    t.join()
    g.destroy()
    best = sorted(times[1:])[len(times[1:]) // 2]
    return {"bytes": nbytes, "median_s": best, "GBps": nbytes / best / 1e9}


def run_mode(mode: str, buckets: list[int], repeats: int, port: int, quick: bool, partial=None) -> dict:
    from mxroll import configs
    from mxroll.model import ModelConfig
    from mxroll.sync.sender import WeightSender

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=engine_main, args=(child, mode))
    proc.start()
    _, ok, err = parent.recv()
    if not ok:
        raise RuntimeError(f"engine start failed:\n{err}")
    engine = RemoteEngine(parent)
    cfg = ModelConfig.from_file(configs.model_preset_path(PRESET))
    print(f"[{mode}] engine up at {time.perf_counter() - T0:.0f} s", flush=True)
    weights = trainer_weights(mode)
    total_bytes = sum(t.numel() * t.element_size() for _, t in weights)
    print(f"[{mode}] {len(weights)} tensors, {total_bytes / 2**30:.2f} GiB", flush=True)
    out = {"tensors": len(weights), "bytes": total_bytes, "buckets": []}
    # one update group for the whole run (bucket size is the sender's packing choice, not the group's)
    sender = WeightSender(engine, master_port=port, backend="nccl", bucket_bytes=buckets[0] * MiB, model_config=cfg,
                          device="cuda:0", mxfp8=mode == "mxfp8", timeout=90)
    sender.connect()
    for b in buckets:
        sender.bucket_bytes = b * MiB
        runs = []
        for r in range(repeats):
            stats = sender.push(weights, weight_version=f"{mode}-{b}-{r}")
            engine_stats = engine.stats()
            runs.append({**stats, "engine": engine_stats["last_update"],
                         "staging_allocations": engine_stats["staging_allocations"],
                         "allocated_GiB": engine_stats["allocated_GiB"]})
        best = min(runs[1:] or runs, key=lambda x: x["total_s"])
        row = {"bucket_MiB": b, "first_s": runs[0]["total_s"], "total_s": best["total_s"],
               "prepare_s": best["prepare_s"], "send_s": best["send_s"], "engine": best["engine"],
               "plan_reused": best.get("plan_reused"), "all_s": [round(x["total_s"], 4) for x in runs],
               "buckets": best["buckets"], "staging_allocations": [x["staging_allocations"] for x in runs],
               "engine_allocated_GiB": [round(x["allocated_GiB"], 3) for x in runs]}
        out["buckets"].append(row)
        if partial is not None:
            partial(out)
        print(f"[{mode}] bucket {b:5d} MiB: first {row['first_s']:.3f} s, best {row['total_s']:.3f} s "
              f"(prepare {row['prepare_s']:.3f}, engine receive {best['engine'].get('receive_s', 0):.3f}, validate {best['engine'].get('validate_s', 0):.3f}, "
              f"commit {best['engine'].get('commit_s', 0):.3f}), {row['buckets']} buckets", flush=True)
    # correctness: sampled tensors equal the trainer's bytes
    names = [n for n, _ in weights[:: max(1, len(weights) // 40)]]
    got = engine.weights(names=names)
    want = dict(weights)
    mismatched = [n for n in names if not torch.equal(got[n].to(torch.float32), want[n][:4].cpu().to(torch.float32))]
    out["bytes_equal_checked"], out["bytes_mismatched"] = len(names), mismatched
    # repeated updates: allocations stay flat
    sender.bucket_bytes = 512 * MiB
    n_repeat = 5 if quick else 20
    allocs, mem = [], []
    for i in range(n_repeat):
        sender.push(weights)
        s = engine.stats()
        allocs.append(s["staging_allocations"])
        mem.append(round(s["reserved_GiB"], 3))
    out["repeated"] = {"updates": n_repeat, "staging_allocations": allocs, "engine_reserved_GiB": mem}
    # while generating: pause in place, update, continue
    params = {"max_new_tokens": 256, "ignore_eos": True, "temperature": 1.0}
    engine.generate(input_ids=[[7 + i, 8, 9] for i in range(64)], sampling_params={**params, "max_new_tokens": 8})
    engine.generate_background(input_ids=[[7 + i, 8, 9] for i in range(64)], sampling_params=params)
    time.sleep(3.0)  # kernels compiled by the warm-up above: the engine is decoding now
    t0 = time.perf_counter()
    engine.pause_generation(mode="in_place")
    t1 = time.perf_counter()
    stats = sender.push(weights, weight_version="during-generation")
    t2 = time.perf_counter()
    engine.continue_generation()
    t3 = time.perf_counter()
    switches = engine.wait_background()
    out["during_generation"] = {"pause_s": t1 - t0, "update_s": t2 - t1, "continue_s": t3 - t2,
                                "pause_to_continue_s": t3 - t0, "push": stats,
                                "switch_output_indices": switches[:10]}
    print(f"[{mode}] during generation: pause->continue {t3 - t0:.3f} s (update {t2 - t1:.3f} s)", flush=True)
    sender.close()
    parent.send(None)
    proc.join(120)
    return out


T0 = time.perf_counter()


def save(results: dict, name: str, mode: str, partial: dict) -> None:
    """Write what is measured so far (and a copy under $OUT when the device runner provides one)."""
    from benchmarks.common import write_results

    results["modes"][mode] = partial
    path = write_results(name, results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())


def main() -> None:
    from benchmarks.common import environment, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--buckets", default="64,256,512,1024,2048", help="bucket sizes in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="mxfp8,bf16")
    ap.add_argument("--out", default="weight_sync")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("weight_sync needs 2 GPUs (trainer on GPU0, engine on GPU1)")
    env = environment()
    port = 29700 + os.getpid() % 1000
    floor = nccl_floor(2 << 30, port)
    print(f"{env['device']} x2: NCCL broadcast GPU0->GPU1 {floor['GBps']:.0f} GB/s (2 GiB buffer)", flush=True)
    results = {"env": env, "model": PRESET, "nccl_floor": floor, "modes": {}}
    buckets = [int(b) for b in args.buckets.split(",")]
    for i, mode in enumerate(args.modes.split(",")):
        try:
            results["modes"][mode] = run_mode(mode, buckets, args.repeats, port + 10 + 100 * i, args.quick,
                                              partial=lambda r, m=mode: save(results, args.out, m, r))
        except Exception as e:  # noqa: BLE001 - keep the other mode's figures
            traceback.print_exc()
            results["modes"][mode] = {"error": repr(e)[:1000]}
        save(results, args.out, mode, results["modes"][mode])
    print(f"\n{'mode':6} {'GiB':>6} {'floor s':>8} {'bucket MiB':>10} {'update s':>9} {'x floor':>8} {'first s':>8}")
    for mode, r in results["modes"].items():
        if "error" in r:
            print(f"{mode:6} error: {r['error'][:200]}")
            continue
        wire = r["bytes"] / (floor["GBps"] * 1e9)
        r["wire_floor_s"] = wire
        for row in r["buckets"]:
            row["ratio_to_floor"] = row["total_s"] / wire
            print(f"{mode:6} {r['bytes'] / 2**30:6.2f} {wire:8.3f} {row['bucket_MiB']:>10} {row['total_s']:9.3f} "
                  f"{row['ratio_to_floor']:8.2f} {row['first_s']:8.3f}")
    path = write_results(args.out, results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    print(json.dumps({m: r.get("repeated") for m, r in results["modes"].items()}))
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
