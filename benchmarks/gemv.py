"""Decode GEMVs (1..4 tokens): the Triton GEMV (`precision.kernels.triton_gemv`, weights loaded before the PDL
wait) against cuBLAS bf16 and the MXFP8 dispatch it would replace, on the projections a batch-1 decode step runs.

Bytes = W (bf16 2 B, MXFP8 1 B + 1/32 B scales) + x + y; floor = bytes / the same-run copy bandwidth (read + write).
`read_us`: the same-run practical floor of one launch, a read-only kernel over the weight's bytes in its rows
(`benchmarks/read_floor.py`); for the MoE, its gate_up and down weights read by two such launches.
Two timings per row, both per call in one CUDA graph over weights rotated past L2:
- `bb`: GEMVs back to back (with PDL, each one's weight stream overlaps the one before);
- `chain`: each GEMV followed by a small dependent Triton kernel (PDL, as the engine's norms and routers) that
  writes the next GEMV's input from this one's output: what a decode step looks like.
Every variant is checked in the same run against an fp64 reference of the same (quantize-dequantized) operands
and for same-bits-twice.
--moe: the fused MoE at 1..2 tokens (`fused_moe_triton`), its whole-rows GEMV path (`triton_moe_gemv`) against
the tile path it replaces (`moe_config`'s, passed explicitly), per call in a CUDA graph over expert weights rotated
past L2 (bytes: the experts touched; checked against `experts_ref` and for same-bits-twice); `--moe-tiles` adds
the rows path forced on (bf16 experts too) at other tile sizes.

    python benchmarks/gemv.py [--ms 1,2,4] [--shapes moonlight.qkv_a,...] [--configs 4096:4,8192:8]
                              [--moe | --moe-only] [--moe-tokens 1,2] [--moe-tiles 8192,16384] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from benchmarks.read_floor import read_us  # noqa: E402
from mxroll.precision.kernels.pdl import pdl_args, pdl_wait  # noqa: E402
from mxroll.precision.kernels.triton_gemv import gemv_triton  # noqa: E402
from mxroll.precision.kernels.triton_mxfp8_gemm import mxfp8_gemm_triton  # noqa: E402
from mxroll.precision.linear import GemmConfig, bf16_copy, linear  # noqa: E402
from mxroll.precision.mxfp8 import MXFP8Tensor  # noqa: E402

SHAPES = {  # name: (N, K, fp32 out)
    "moonlight.qkv_a": (3648, 2048, False),
    "moonlight.o_proj": (2048, 2048, False),
    "moonlight.dense_gate_up": (22528, 2048, False),
    "moonlight.dense_down": (2048, 11264, False),
    "moonlight.lm_head": (163840, 2048, True),
    "dsv3.q_a_kv_a": (2112, 7168, False),
    "dsv3.q_b": (24576, 1536, False),
    "dsv3.o_proj": (7168, 16384, False),
}


@triton.jit
def _next_input(x_ptr, y_ptr, xo_ptr, K, stride_y, BK: tl.constexpr, PDL: tl.constexpr):
    """xo[m] = x[m] + 0 * y[m, 0]: a dependent small kernel between two GEMVs (one program per row)."""
    pdl_wait(PDL)
    m = tl.program_id(0)
    kk = tl.arange(0, BK)
    y0 = tl.load(y_ptr + m * stride_y).to(tl.float32)
    x = tl.load(x_ptr + m * K + kk, mask=kk < K, other=0.0).to(tl.float32)
    tl.store(xo_ptr + m * K + kk, (x + 0.0 * y0).to(xo_ptr.dtype.element_ty), mask=kk < K)


def next_input(x, y, xo):
    K = x.shape[1]
    _next_input[(x.shape[0],)](x, y, xo, K, y.stride(0), BK=triton.next_power_of_2(K), **pdl_args(x))


def variants(mode: str, out32: bool, configs: list[tuple[int, ...]]):
    """name -> f(x, w) for one storage mode."""
    gemm = GemmConfig(backend="triton", bf16_copy=True)
    out = {}
    if mode == "bf16":
        if out32:
            out["cublas"] = lambda x, w: torch.mm(x, w.t(), out_dtype=torch.float32)
        else:
            out["cublas"] = lambda x, w: torch.nn.functional.linear(x, w)
    else:
        # what the dispatch ran before the GEMV: the decode kernel, or cuBLAS on the exact bf16 copy (`copy_serves`)
        out["mxfp8_gemm_qdq"] = lambda x, w: mxfp8_gemm_triton(x, w, "w8a16")  # input from a fused norm
        out["mxfp8_gemm_w8a8"] = lambda x, w: mxfp8_gemm_triton(x, w, "w8a8")  # input quantized by the GEMM
        out["dispatch_qdq"] = lambda x, w: linear(x, w, gemm, x_qdq=True)
        out["dispatch_w8a8"] = lambda x, w: linear(x, w, gemm)
    for i, c in enumerate(configs):
        def f(x, w, c=c, act="w8a16"):  # whole rows: c[0] weight elements a program, c[1] warps
            cfg = dict(BN=max(1, c[0] // triton.next_power_of_2(x.shape[1])), num_warps=c[1])
            return gemv_triton(x, w, torch.float32 if out32 else None, act_mode=act, config=cfg)
        name = f"gemv_t{c[0]}_w{c[1]}"
        out[name] = f
        if mode == "mxfp8" and i == 0:
            out[f"{name}_w8a8"] = lambda x, w, f=f: f(x, w, act="w8a8")
    out["gemv_dispatch"] = lambda x, w: gemv_triton(x, w, torch.float32 if out32 else None)
    return out


def reference(x, w, mode: str, w8a8: bool) -> torch.Tensor:
    if mode == "bf16":
        return x.double() @ w.double().t()
    xr = MXFP8Tensor.quantize(x).dequantize(torch.float32) if w8a8 else x.float()
    return xr.double() @ w.dequantize(torch.float32).double().t()


def run(name: str, M: int, mode: str, configs: list[tuple[int, ...]], bw: float) -> list[dict]:
    N, K, out32 = SHAPES[name]
    if mode == "mxfp8" and out32:
        return []
    gemm = GemmConfig(backend="triton", bf16_copy=True)
    row_bytes = K * 2 if mode == "bf16" else K + K // 32  # MXFP8: e4m3 bytes and the E8M0 scales (K % 32 == 0)
    wbytes = N * row_bytes
    ws = []
    for _ in range(copies_for(wbytes)):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        if mode == "mxfp8":
            q = MXFP8Tensor.quantize(w)
            w = MXFP8Tensor(q.data, q.scale, bf16_copy=bf16_copy(q, gemm))
        ws.append(w)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    xq = MXFP8Tensor.quantize(x).dequantize(torch.bfloat16)
    floor_us = (wbytes + M * K * 2 + M * N * (4 if out32 else 2)) / bw * 1e6
    read = read_us(N, row_bytes)[0]
    rows = []
    for vname, f in variants(mode, out32, configs).items():
        w8a8 = vname.endswith("w8a8")
        xin = xq if (mode == "mxfp8" and not w8a8) else x
        y = f(xin, ws[0])
        ref = reference(xin, ws[0], mode, w8a8)
        rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        same = torch.equal(y, f(xin, ws[0]))
        bb = time_graph([lambda w=w: f(xin, w) for w in ws])
        xa, xb = xin.clone(), xin.clone()
        steps = []
        for i, w in enumerate(ws):
            src, dst = (xa, xb) if i % 2 == 0 else (xb, xa)
            steps.append(lambda w=w, src=src, dst=dst: next_input(src, f(src, w), dst))
        chain = time_graph(steps)
        rows.append(dict(shape=name, N=N, K=K, M=M, mode=mode, variant=vname, rel_err=rel, same_bits_twice=same,
                         correct=bool(rel < 1e-2 and same), bb_us=bb * 1e6, chain_us=chain * 1e6,
                         floor_us=floor_us, bb_x_floor=bb * 1e6 / floor_us, GBps_bb=wbytes / bb / 1e9,
                         read_us=read, bb_x_read=bb * 1e6 / read))
        r = rows[-1]
        print(f"{name:24s} M={M} {mode:5s} {vname:22s} bb {r['bb_us']:8.2f} us chain {r['chain_us']:8.2f} us "
              f"floor {floor_us:7.2f} ({r['bb_x_floor']:.2f}x) read {read:7.2f} ({r['bb_x_read']:.2f}x) "
              f"{r['GBps_bb']:7.0f} GB/s rel {rel:.1e} {'ok' if r['correct'] else 'WRONG'}", flush=True)
    return rows


MOE_SHAPES = {  # name: (E, K pairs a token, D, F); deepseek-v3 with 32 of its 256 experts (bytes a token unchanged)
    "moonlight.routed": (64, 6, 2048, 1408),
    "moonlight.routed+shared": (66, 8, 2048, 1408),
    "dsv3.routed": (32, 8, 7168, 2048),
}


def forced_rows(f, tile: int, T: int):
    """f with the fused MoE's rows path on for T tokens (either format) at TILE_ELEMS = tile."""
    from mxroll.precision.kernels import triton_moe_gemv as m

    def g(*a):
        saved = m.TILE_ELEMS, m.MAX_TOKENS_MXFP8, m.MAX_TOKENS_BF16
        m.TILE_ELEMS, m.MAX_TOKENS_MXFP8, m.MAX_TOKENS_BF16 = tile, T, T
        try:
            return f(*a)
        finally:
            m.TILE_ELEMS, m.MAX_TOKENS_MXFP8, m.MAX_TOKENS_BF16 = saved
    return g


def run_moe(name: str, T: int, mode: str, bw: float, tiles: list[int]) -> list[dict]:
    from mxroll.precision.kernels import triton_moe_gemv
    from mxroll.precision.kernels.moe_config import moe_config
    from mxroll.precision.kernels.triton_moe import fused_moe_triton
    from mxroll.precision.moe import experts_ref
    E, K, D, F = MOE_SHAPES[name]
    quant = mode == "mxfp8"
    per_el = 1 + 1 / 32 if quant else 2
    copies = copies_for(int(E * 3 * F * D * per_el))
    ws = []
    for _ in range(copies):
        w13 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
        w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) / F ** 0.5
        ws.append((MXFP8Tensor.quantize(w13), MXFP8Tensor.quantize(w2)) if quant else (w13, w2))
        del w13, w2
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    if quant:
        x = MXFP8Tensor.quantize(x).dequantize(torch.bfloat16)  # the norm's output, as in the engine
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K].to(torch.int32)
    tw = torch.rand(T, K, device="cuda")
    floor_us = (T * K * 3 * F * D * per_el + T * D * 4) / bw * 1e6  # distinct experts a pair: upper bound on bytes
    ref = experts_ref(x, ids, tw, *ws[0], GemmConfig("w8a8"), x_qdq=quant)
    read = read_us(T * K * 2 * F, int(D * per_el))[0] + read_us(T * K * D, int(F * per_el))[0]
    rows = []
    variants = [("tiles", moe_config(T, quant, K, E), None)]
    if triton_moe_gemv.serves(T, quant):
        variants.append(("rows_gemv", None, None))
    variants += [(f"rows_gemv_t{n}", None, n) for n in tiles]  # TILE_ELEMS n, path forced on
    for vname, cfg, tile in variants:
        def f(w13, w2, cfg=cfg):
            return fused_moe_triton(x, ids, tw, w13, w2, "w8a8", config=cfg, x_qdq=quant)
        if tile is not None:
            f = forced_rows(f, tile, T)
        y = f(*ws[0])
        rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        same = torch.equal(y, f(*ws[0]))
        t = time_graph([lambda w=w: f(*w) for w in ws])
        rows.append(dict(moe=name, E=E, K=K, D=D, F=F, T=T, mode=mode, variant=vname, rel_err=rel,
                         same_bits_twice=same, correct=bool(rel < 1e-2 and same), us=t * 1e6, floor_us=floor_us,
                         x_floor=t * 1e6 / floor_us, read_us=read, x_read=t * 1e6 / read))
        r = rows[-1]
        print(f"moe {name:24s} T={T} {mode:5s} {vname:16s} {r['us']:8.2f} us floor {floor_us:7.2f} "
              f"({r['x_floor']:.2f}x) read {read:7.2f} ({r['x_read']:.2f}x) rel {rel:.1e} "
              f"{'ok' if r['correct'] else 'WRONG'}", flush=True)
    del ws
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--modes", default="bf16,mxfp8")
    ap.add_argument("--configs", default="4096:4,8192:4,8192:8",
                    help="whole-rows configs 'elements a program:warps'")
    ap.add_argument("--moe", action="store_true", help="also the fused MoE at 1..2 tokens")
    ap.add_argument("--moe-only", action="store_true")
    ap.add_argument("--moe-tiles", default="",
                    help="also the MoE rows path forced on (either format) at these TILE_ELEMS, e.g. 8192,16384")
    ap.add_argument("--moe-tokens", default="1,2")
    ap.add_argument("--out", default="gemv")
    a = ap.parse_args()
    torch.manual_seed(0)
    bw = measure_copy_bandwidth()
    configs = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
    if any(len(c) != 2 for c in configs):
        ap.error(f"--configs: {a.configs!r}; each 'elements a program:warps'")
    rows = []
    for name in ([] if a.moe_only else a.shapes.split(",")):
        for M in (int(m) for m in a.ms.split(",")):
            for mode in a.modes.split(","):
                rows += run(name, M, mode, configs, bw)
    for name in (MOE_SHAPES if a.moe or a.moe_only else []):
        for T in (int(t) for t in a.moe_tokens.split(",")):
            for mode in a.modes.split(","):
                rows += run_moe(name, T, mode, bw, [int(n) for n in a.moe_tiles.split(",") if n])
    path = write_results(a.out, dict(benchmark="gemv", **environment(), copy_GBps=bw / 1e9, rows=rows))
    print(f"wrote {path}; all correct: {all(r['correct'] for r in rows)}")


if __name__ == "__main__":
    main()
