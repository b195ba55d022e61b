"""The fused MoE's ordered combine (`triton_moe._combine`: y[t] = the K fp32 rows of token t summed in k order, cast
to bf16): its block width and warps, and the previous kernel (the K loop a runtime bound, so the K loads of a row
were issued one after another) as the same-run baseline. Floor: T*K*D*4 bytes read + T*D*2 written over the
same-run copy bandwidth. moonlight-16b-a3b (D 2048, K 6) and deepseek-v3 (D 7168, K 8), 64..8192 tokens. Every
variant's output is compared bit for bit with a torch sum in k order; a variant that differs is flagged BAD.
Per row: one CUDA graph of calls over rotating inputs (past L2), median replay, per call.

    python benchmarks/moe_combine.py    (GPU, ~1 min)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from mxroll.precision.kernels.triton_moe import _combine  # noqa: E402

SHAPES = {"moonlight-16b-a3b": (2048, 6), "deepseek-v3": (7168, 8)}
TOKENS = (64, 256, 1024, 4096, 8192)
VARIANTS = {"1024 x 4w": dict(BD=1024, num_warps=4), "512 x 4w (shipped)": dict(BD=512, num_warps=4),
            "2048 x 4w": dict(BD=2048, num_warps=4), "2048 x 8w": dict(BD=2048, num_warps=8),
            "4096 x 8w": dict(BD=4096, num_warps=8)}


@triton.jit
def _previous_combine_kernel(p_ptr, y_ptr, TOPK, D, BD: tl.constexpr):
    """The baseline: the combine before TOPK became a compile-time constant (no shared add)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = offs < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for k in range(TOPK):
        acc += tl.load(p_ptr + (t * TOPK + k).to(tl.int64) * D + offs, mask=mask, other=0.0)
    tl.store(y_ptr + t.to(tl.int64) * D + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def previous(p: torch.Tensor, y: torch.Tensor, K: int) -> torch.Tensor:
    T, D = y.shape
    _previous_combine_kernel[(T, triton.cdiv(D, 1024))](p, y, K, D, BD=1024)
    return y


def reference(p: torch.Tensor, T: int, K: int, D: int) -> torch.Tensor:
    rows = p.view(T, K, D)
    acc = rows[:, 0].clone()
    for k in range(1, K):
        acc += rows[:, k]
    return acc.bfloat16()


def main() -> None:
    bw = measure_copy_bandwidth()
    rows = []
    for shape, (D, K) in SHAPES.items():
        for T in TOKENS:
            nbytes = T * K * D * 4 + T * D * 2
            n = copies_for(nbytes, cap=16)
            ps = [torch.randn(T * K, D, device="cuda") * (i + 1) for i in range(n)]
            ys = [torch.empty(T, D, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            ref = reference(ps[0], T, K, D)
            row = {"shape": shape, "tokens": T, "D": D, "K": K, "bytes": nbytes, "floor_us": nbytes / bw * 1e6,
                   "us": {}, "correct": {}}
            calls = {"previous (runtime K loop)": lambda p, y: previous(p, y, K)}
            for name, kw in VARIANTS.items():
                calls[name] = lambda p, y, kw=kw: _combine(p, y, None, K, **kw)
            for name, fn in calls.items():
                ys[0].fill_(float("nan"))
                fn(ps[0], ys[0])
                row["correct"][name] = bool(torch.equal(ys[0], ref))
                row["us"][name] = time_graph([lambda i=i: fn(ps[i], ys[i]) for i in range(n)]) * 1e6
            base = row["us"]["previous (runtime K loop)"]
            print(f"{shape:18s} T={T:5d} floor {row['floor_us']:7.1f} us | " + " | ".join(
                f"{name} {us:7.1f}{'' if row['correct'][name] else ' BAD'} ({base / us:.2f}x)"
                for name, us in row["us"].items()), flush=True)
            rows.append(row)
            ps = ys = None  # free before the next shape
    path = write_results("moe_combine", {"benchmark": "moe_combine", **environment(), "copy_GBps": bw / 1e9,
                                         "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
