"""FlashInfer MLA decode on sm90, by backend: fa3 (what "auto" plans on Hopper) vs fa2, per batch size.

The moonlight-16b-a3b decode step spends ~15 us per layer in the MLA kernel at batch 1 (27 layers:
0.4 ms of a 3.5 ms step, decode_profile_bf16.json) although it reads ~1.3 MB of latents. This measures
both planners' kernels on the engine's shapes (16 heads, latent 512, rope 64, bf16 cache) at
batch 1..256, context 1088 (the throughput benchmark's 1024 + 64 new tokens), page sizes 16 and 64, each
inside a CUDA graph (several layers' caches rotated, as the model runs them), and checks every output
against an fp32 torch reference in the same run.
Floor: latent bytes read (B x context x (C + R) x 2) + q/o, over the same-run copy bandwidth.

    python benchmarks/mla_backend.py [--out mla_backend]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402

H, C, R = 16, 512, 64
SM_SCALE = 192 ** -0.5
LAYERS = 8  # caches rotated in one graph (each layer attends over its own latents)


def reference(q, qpe, ckv, kpe, table, lens) -> torch.Tensor:
    """fp32 softmax(q . ckv + qpe . kpe) @ ckv per row, over the row's pages."""
    out = []
    for b in range(q.shape[0]):
        kv = ckv[table[b]].reshape(-1, C)[:lens[b]].float()
        pe = kpe[table[b]].reshape(-1, R)[:lens[b]].float()
        s = (q[b].float() @ kv.T + qpe[b].float() @ pe.T) * SM_SCALE
        out.append(torch.softmax(s, -1) @ kv)
    return torch.stack(out)


def run_case(flashinfer, backend: str, B: int, ctx: int, page: int, bw: float) -> dict:
    dev, bf = "cuda", torch.bfloat16
    per_seq = -(-ctx // page)
    g = torch.Generator(device=dev).manual_seed(B * 7 + page)
    caches = [(torch.randn(B * per_seq, page, C, device=dev, dtype=bf, generator=g),
               torch.randn(B * per_seq, page, R, device=dev, dtype=bf, generator=g)) for _ in range(LAYERS)]
    perm = torch.randperm(B * per_seq, device=dev, generator=g).to(torch.int32)  # pages scattered, as in use
    table = perm.view(B, per_seq)
    i32 = dict(dtype=torch.int32)
    qo = torch.arange(B + 1, **i32)
    kv_indptr = torch.arange(B + 1, **i32) * per_seq
    lens = torch.full((B,), ctx, **i32)
    q = torch.randn(B, H, C, device=dev, dtype=bf, generator=g)
    qpe = torch.randn(B, H, R, device=dev, dtype=bf, generator=g)
    outs = [torch.empty(B, H, C, device=dev, dtype=bf) for _ in range(LAYERS)]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws, backend=backend)
    w.plan(qo, kv_indptr, perm.cpu(), lens, H, C, R, page, True, SM_SCALE, bf, bf)
    planned = getattr(w, "_planned_backend_name", backend)
    w.run(q, qpe, caches[0][0], caches[0][1], out=outs[0])
    ref = reference(q, qpe, caches[0][0], caches[0][1], table.long(), lens.tolist())
    err = ((outs[0].float() - ref).norm() / ref.norm()).item()
    fns = [lambda i=i: w.run(q, qpe, caches[i][0], caches[i][1], out=outs[i]) for i in range(LAYERS)]
    t = time_graph(fns)
    floor = (B * ctx * (C + R) * 2 + 2 * B * H * (C + R) * 2) / bw
    return {"backend": backend, "planned": planned, "B": B, "context": ctx, "page_size": page, "us": t * 1e6,
            "floor_us": floor * 1e6, "x_floor": t / floor, "rel_err_vs_fp32": err, "correct": err < 2e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mla_backend")
    args = ap.parse_args()
    import flashinfer

    env = environment()
    bw = measure_copy_bandwidth()
    rows = []
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s")
    print(f"{'backend':8} {'page':>4} {'B':>4} {'us':>8} {'floor':>7} {'x':>6} {'err':>8}")
    for page in (16, 64):
        for B in (1, 8, 32, 128, 256):
            for backend in ("fa3", "fa2"):
                try:
                    r = run_case(flashinfer, backend, B, 1088, page, bw)
                except Exception as e:  # noqa: BLE001 - a backend that does not build or plan is reported
                    r = {"backend": backend, "B": B, "page_size": page, "error": repr(e)[:400]}
                    print(f"{backend:8} {page:>4} {B:>4} failed: {r['error'][:200]}", flush=True)
                    rows.append(r)
                    continue
                rows.append(r)
                print(f"{backend:8} {page:>4} {B:>4} {r['us']:8.1f} {r['floor_us']:7.1f} {r['x_floor']:6.2f} "
                      f"{r['rel_err_vs_fp32']:8.1e}", flush=True)
    path = write_results(args.out, {"benchmark": "mla_backend", **env, "copy_GBps": bw / 1e9, "heads": H,
                                    "kv_lora_rank": C, "rope_dim": R, "layers_rotated": LAYERS, "rows": rows})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
