"""The practical floor of one memory-bound kernel: how long a single launch takes just to read a weight's bytes.

The copy-rate floor (bytes / the 1 GiB device copy's rate) is what a long stream reaches; one launch over a few MB
also pays its ramp-up and tail (2.6x the copy-rate floor at 4 MB, 1.3x at 24 MB, 1.2x at 48 MB on an H200:
`read_floor_20261202.json`). `read_us` times read-only Triton kernels over the same number of bytes laid out as the
weight's rows (16-byte loads, an xor reduction, one int stored a program; several tile shapes, the fastest kept),
per call in one CUDA graph over buffers rotated past L2, as the GEMV benchmarks time their kernels.

    python benchmarks/read_floor.py [--out NAME]     # the one-token proxy shapes
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402

# (rows a program, warps): the tile shapes tried; each shape's fastest is the floor
CONFIGS = ((1, 8), (2, 4), (4, 4), (8, 4), (8, 8), (16, 8))
MAX_ELEMS = 8192  # int32 words a program (32 KB: 64 registers a thread at 4 warps)


@triton.jit
def _read_kernel(w_ptr, out_ptr, N, K4, BN: tl.constexpr, KP: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    kk = tl.arange(0, KP)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K4 + kk[None, :], mask=(rows < N)[:, None] & (kk < K4)[None, :],
                other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(tl.xor_sum(w, axis=1), axis=0))


def padded(row_bytes: int) -> int:
    """The bytes of a row as the read kernel lays it out: rounded up to 16 (its loads' width)."""
    return -(-row_bytes // 16) * 16


@functools.lru_cache(maxsize=None)
def read_us(rows: int, row_bytes: int) -> tuple[float, int, int]:
    """(us, rows a program, warps) of the fastest read-only kernel over `rows` rows of `padded(row_bytes)` bytes;
    measured once a process for each size."""
    k4 = padded(row_bytes) // 4
    bufs = [torch.randint(-2**31, 2**31 - 1, (rows, k4), device="cuda", dtype=torch.int32)
            for _ in range(copies_for(rows * k4 * 4))]
    out = torch.empty(rows, dtype=torch.int32, device="cuda")
    kp = triton.next_power_of_2(k4)
    best = None
    for bn, warps in CONFIGS:
        if bn * kp > MAX_ELEMS and bn > 1:
            continue
        us = time_graph([lambda b=b: _read_kernel[(triton.cdiv(rows, bn),)](b, out, rows, k4, BN=bn, KP=kp,
                                                                            num_warps=warps) for b in bufs]) * 1e6
        if best is None or us < best[0]:
            best = (us, bn, warps)
    del bufs
    torch.cuda.empty_cache()
    return best


SHAPES = {  # name: (rows, row bytes): the one-token MXFP8 proxies (weights + E8M0 scales)
    "moe down 8 experts 16384x1408": (16384, 1408 + 44),
    "moe gate_up 8 experts 22528x2048": (22528, 2048 + 64),
    "moonlight q+kv_a 3648x2048": (3648, 2048 + 64),
    "moonlight o_proj 2048x2048": (2048, 2048 + 64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="read_floor")
    a = ap.parse_args()
    bw = measure_copy_bandwidth()
    rows = []
    for name, (n, rb) in SHAPES.items():
        us, bn, warps = read_us(n, rb)
        nbytes = n * padded(rb)
        rows.append(dict(shape=name, rows=n, row_bytes=rb, MB=nbytes / 1e6, copy_floor_us=nbytes / bw * 1e6,
                         read_us=us, read_x_copy_floor=us / (nbytes / bw * 1e6), rows_a_program=bn, warps=warps))
        r = rows[-1]
        print(f"{name:36s} {r['MB']:7.2f} MB  read {us:7.2f} us  copy floor {r['copy_floor_us']:6.2f} us "
              f"({r['read_x_copy_floor']:.2f}x)", flush=True)
    path = write_results(a.out, dict(benchmark="read_floor", **environment(), copy_GBps=bw / 1e9, rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
