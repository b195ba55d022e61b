"""Shared benchmark helpers: device facts, ceilings, CUDA-graph timing over rotating inputs."""
from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
L2_ROTATE_BYTES = 256 << 20  # rotate inputs until they span this much (H100/H200 L2 is 50 MB)


def environment() -> dict:
    import triton

    try:
        import flashinfer
        fi = flashinfer.__version__
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        fi = f"unavailable ({type(e).__name__})"
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "capability": f"sm{props.major}{props.minor}", "torch": torch.__version__, "triton": triton.__version__,
            "flashinfer": fi, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_events(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, each call timed alone with CUDA events (includes launch overhead)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def time_graph(fns: list[Callable[[], object]], replays: int = 5) -> float:
    """Seconds per call: one CUDA graph holding every fn back to back (inputs rotate across fns),
    replayed; median replay / len(fns)."""
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    del g
    return sorted(times)[len(times) // 2]


def capture_graph(fn: Callable[[], object], prepare: Callable[[], object]) -> tuple["torch.cuda.CUDAGraph", object]:
    """(graph, output) of fn captured alone: prepare(), two warm-up calls on a side stream, the capture, then
    prepare() again (inputs the warm-up and capture changed, e.g. a cache they wrote, are restored)."""
    prepare()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        out = fn()
    prepare()
    return g, out


def median_replay(g: "torch.cuda.CUDAGraph", replays: int, flush: Callable[[], object] | None = None,
                  warmup: int = 0) -> float:
    """Median seconds of one replay of g, timed alone with CUDA events (flush() before each, when given: e.g. a
    write that evicts L2)."""
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        if flush is not None:
            flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copies_for(nbytes: int, cap: int = 64) -> int:
    return max(2, min(cap, -(-L2_ROTATE_BYTES // max(nbytes, 1))))


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| (Frobenius, in fp32) of a result `a` against its reference `b`."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def measure_copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    t = time_events(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() * 4 / t


def measure_bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_events(lambda: a @ b, iters=10)
    return 2 * 8192**3 / t


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
