"""MLA decode on sm90 by kernel: FlashInfer fa3 (what "auto" plans on Hopper), fa2, and the Triton split-KV
kernel (rollout/attention/triton_mla.py), per batch size.

The moonlight-16b-a3b decode step spent ~15 us per layer in FlashInfer's MLA kernel at batch 1 (27 layers:
0.4 ms of a 3.5 ms step, decode_profile_bf16.json) although it reads ~1.3 MB of latents. This measures
the kernels on the engine's shapes (16 heads, latent 512, rope 64, bf16 cache) at batch 1..256, context
1088 (the throughput benchmark's 1024 + 64 new tokens) and others, page sizes 16 and 64, each inside a
CUDA graph (several layers' caches rotated, as the model runs them), and checks every output against an
fp32 torch reference in the same run. `--sweep` also times Triton variants (key block, warps, splits,
stages) at page 16.
Floor: latent bytes read (B x context x (C + R) x 2) + q/o, over the same-run copy bandwidth.

    python benchmarks/mla_backend.py [--out mla_backend] [--sweep] [--backends fa3,triton] [--contexts 1088]
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


def make_case(B: int, ctx: int, page: int) -> dict:
    dev, bf = "cuda", torch.bfloat16
    per_seq = -(-ctx // page)
    g = torch.Generator(device=dev).manual_seed(B * 7 + page + ctx)
    caches = [(torch.randn(B * per_seq, page, C, device=dev, dtype=bf, generator=g),
               torch.randn(B * per_seq, page, R, device=dev, dtype=bf, generator=g)) for _ in range(LAYERS)]
    perm = torch.randperm(B * per_seq, device=dev, generator=g).to(torch.int32)  # pages scattered, as in use
    i32 = dict(dtype=torch.int32)
    case = dict(B=B, ctx=ctx, page=page, caches=caches, perm=perm, table=perm.view(B, per_seq),
                qo=torch.arange(B + 1, **i32), kv_indptr=torch.arange(B + 1, **i32) * per_seq,
                lens=torch.full((B,), ctx, **i32),
                q=torch.randn(B, H, C, device=dev, dtype=bf, generator=g),
                qpe=torch.randn(B, H, R, device=dev, dtype=bf, generator=g),
                outs=[torch.empty(B, H, C, device=dev, dtype=bf) for _ in range(LAYERS)])
    case["ref"] = reference(case["q"], case["qpe"], caches[0][0], caches[0][1], case["table"].long(), case["lens"].tolist())
    return case


def flashinfer_fns(flashinfer, backend: str, k: dict):
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws, backend=backend)
    w.plan(k["qo"], k["kv_indptr"], k["perm"].cpu(), k["lens"], H, C, R, k["page"], True, SM_SCALE,
           torch.bfloat16, torch.bfloat16)
    planned = getattr(w, "_planned_backend_name", backend)
    return planned, [lambda i=i: w.run(k["q"], k["qpe"], k["caches"][i][0], k["caches"][i][1], out=k["outs"][i])
                     for i in range(LAYERS)]


def triton_fns(variant: dict, k: dict):
    from mxroll.rollout.attention.triton_mla import mla_decode_triton

    dev = torch.device("cuda")
    ind = (k["kv_indptr"].to(dev), k["perm"], k["lens"].to(dev))
    kw = {key: v for key, v in variant.items() if key != "splits"}
    return "triton", [lambda i=i: mla_decode_triton(k["q"], k["qpe"], k["caches"][i][0], k["caches"][i][1], *ind,
                                                     SM_SCALE, variant["splits"], k["outs"][i], **kw)
                      for i in range(LAYERS)]


def run_case(name: str, planned_fns, k: dict, bw: float, extra: dict | None = None) -> dict:
    planned, fns = planned_fns
    for o in k["outs"]:
        o.fill_(float("nan"))
    fns[0]()
    err = ((k["outs"][0].float() - k["ref"]).norm() / k["ref"].norm()).item()
    t = time_graph(fns)
    B, ctx = k["B"], k["ctx"]
    floor = (B * ctx * (C + R) * 2 + 2 * B * H * (C + R) * 2) / bw
    return {"backend": name, "planned": planned, "B": B, "context": ctx, "page_size": k["page"], "us": t * 1e6,
            "floor_us": floor * 1e6, "x_floor": t / floor, "rel_err_vs_fp32": err, "correct": err < 2e-2,
            **(extra or {})}


def triton_variants(B: int, sweep: bool, sms: int) -> list[dict]:
    from mxroll.rollout.attention.triton_mla import MAX_SPLITS, decode_splits

    rule = decode_splits(B, H, sms)
    shipped = dict(splits=rule, block_n=32, num_warps=4, num_stages=2)  # mla_decode_triton defaults
    if not sweep:
        return [shipped]
    out = [dict(shipped, block_n=bn, num_warps=w) for bn in (16, 32, 64) for w in (4, 8)]
    out += [dict(shipped, splits=s) for s in (rule // 2, rule * 2) if 1 <= s <= MAX_SPLITS]
    out += [dict(shipped, num_stages=1), dict(shipped, num_stages=3)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mla_backend")
    ap.add_argument("--backends", default="fa3,triton", help="comma-separated subset of fa3, fa2, triton")
    ap.add_argument("--sweep", action="store_true", help="Triton variants (block, warps, splits, stages) at page 16")
    ap.add_argument("--contexts", default="1088")
    ap.add_argument("--pages", default="16,64")
    ap.add_argument("--batches", default="1,8,32,128,256")
    args = ap.parse_args()
    import flashinfer

    env = environment()
    bw = measure_copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print(f"{env['device']}: copy {bw / 1e9:.0f} GB/s")
    print(f"{'backend':8} {'page':>4} {'ctx':>5} {'B':>4} {'us':>8} {'floor':>7} {'x':>6} {'err':>8}  variant")
    for ctx in map(int, args.contexts.split(",")):
        for page in map(int, args.pages.split(",")):
            for B in map(int, args.batches.split(",")):
                k = make_case(B, ctx, page)
                cases = []
                for backend in args.backends.split(","):
                    if backend == "triton":
                        for v in triton_variants(B, args.sweep and page == 16, sms):
                            cases.append(("triton", lambda v=v: triton_fns(v, k), {"variant": v}))
                    else:
                        cases.append((backend, lambda b=backend: flashinfer_fns(flashinfer, b, k), {}))
                for name, fns, extra in cases:
                    try:
                        r = run_case(name, fns(), k, bw, extra)
                    except Exception as e:  # noqa: BLE001 - a backend that does not build or plan is reported
                        r = {"backend": name, "B": B, "context": ctx, "page_size": page, "error": repr(e)[:400],
                             **extra}
                        print(f"{name:8} {page:>4} {ctx:>5} {B:>4} failed: {r['error'][:200]}", flush=True)
                        rows.append(r)
                        continue
                    rows.append(r)
                    print(f"{name:8} {page:>4} {ctx:>5} {B:>4} {r['us']:8.1f} {r['floor_us']:7.1f} {r['x_floor']:6.2f} "
                          f"{r['rel_err_vs_fp32']:8.1e}  {extra.get('variant', '')}", flush=True)
    path = write_results(args.out, {"benchmark": "mla_backend", **env, "copy_GBps": bw / 1e9, "heads": H,
                                    "kv_lora_rank": C, "rope_dim": R, "layers_rotated": LAYERS, "rows": rows})
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
