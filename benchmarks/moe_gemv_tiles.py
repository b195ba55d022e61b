"""The fused MoE's one-token GEMV path (`precision.kernels.triton_moe_gemv`, MXFP8): rows a program and warps for
gate_up and down apart, on moonlight-16b-a3b (routed + 2 hosted shared experts, routed only) and deepseek-v3 (32 of
its 256 experts: the same bytes a token). Each variant is `benchmarks/gemv.py`'s MoE row: per call in one CUDA graph
over expert weights rotated past L2, floor = the experts touched over the same-run copy bandwidth, checked against
`experts_ref` and for same-bits-twice. The shipped config runs first and last (run-to-run spread).

    python benchmarks/moe_gemv_tiles.py [--shapes moonlight.routed+shared,moonlight.routed,dsv3.routed] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gemv  # noqa: E402
from benchmarks.common import environment, measure_copy_bandwidth, write_results  # noqa: E402
from mxroll.precision.kernels import triton_moe_gemv as m  # noqa: E402

# (gate_up elements a program, gate_up min rows, gate_up warps, down elements, down warps); None: the shipped value
SHIPPED = (None, None, None, None, None)
VARIANTS = [SHIPPED,
            (None, 1, None, None, None),  # the rule before GATE_UP_MIN_ROWS (one row at D = 7168)
            (65536, None, 8, None, None), (131072, None, 8, None, None),
            (None, None, None, 32768, None), (None, None, None, 8192, None), (None, None, None, 16384, 2),
            SHIPPED]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="moonlight.routed+shared,moonlight.routed,dsv3.routed")
    ap.add_argument("--out", default="moe_gemv_tiles")
    a = ap.parse_args()
    bw = measure_copy_bandwidth()
    shipped = (m.GATE_UP_TILE_ELEMS, m.GATE_UP_MIN_ROWS, m.GATE_UP_WARPS, m.DOWN_TILE_ELEMS, m.DOWN_WARPS)
    rows = []
    for shape in a.shapes.split(","):
        for v in VARIANTS:
            knobs = tuple(s if x is None else x for x, s in zip(v, shipped))
            m.GATE_UP_TILE_ELEMS, m.GATE_UP_MIN_ROWS, m.GATE_UP_WARPS, m.DOWN_TILE_ELEMS, m.DOWN_WARPS = knobs
            try:
                found = [r for r in gemv.run_moe(shape, 1, "mxfp8", bw, []) if r["variant"] == "rows_gemv"]
            finally:
                m.GATE_UP_TILE_ELEMS, m.GATE_UP_MIN_ROWS, m.GATE_UP_WARPS, m.DOWN_TILE_ELEMS, m.DOWN_WARPS = shipped
            for r in found:
                r.update(variant="shipped" if v == SHIPPED else "gate_up %s/%s rows/%s warps, down %s/%s warps" % v,
                         gate_up_elems=knobs[0], gate_up_min_rows=knobs[1], gate_up_warps=knobs[2],
                         down_elems=knobs[3], down_warps=knobs[4])
                rows.append(r)
    print(f"\n{'shape':26s} {'variant':56s} {'us':>8s} {'x floor':>8s} ok")
    for r in rows:
        print(f"{r['moe']:26s} {r['variant']:56s} {r['us']:8.2f} {r['x_floor']:8.2f} {r['correct']}")
    path = write_results(a.out, dict(benchmark="moe_gemv_tiles", **environment(), copy_GBps=bw / 1e9, rows=rows))
    print(f"wrote {path}; all correct: {all(r['correct'] for r in rows)}")


if __name__ == "__main__":
    main()
