"""A small decode batch's MLA attention: the separate kernels (latent store, absorb bmm, split-KV attention, split
merge, unabsorb bmm: 5 launches) against the fused ones (latent store + absorb, split-KV attention, merge + W_UV:
3 launches), moonlight-16b-a3b shapes (16 heads, P = V = 128, C = 512, R = 64, pages of 64).

Timed per layer inside one CUDA graph of 27 layers back to back, each with its own kv_b_proj and cache (as the
engine's step reads them: W_UK and W_UV come from HBM once per layer), median of replays. Bytes per layer: W_UK
and W_UV (2 x H x 128 x C x 2) + the latents read (B x ctx x (C + R) x 2); the floor is those bytes over the
same-run copy bandwidth. Correctness in the same run: the fused output against the separate path's (a rounding)
and both against the fp32 reference (`mla_decode_ref` through W_UV) on layer 0.
Variants: each fusion alone (pre: store + absorb; post: merge + W_UV, by latent block width BC), both, and both
with fewer splits than the shipped `decode_splits` rule.

    python benchmarks/mla_decode_fusion.py [--rows 1,2,4] [--ctx 512,1024,4096] [--out NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, measure_copy_bandwidth, time_graph, write_results  # noqa: E402
from mxroll.model.kernels.triton_latent import latent_absorb_triton, store_latent_triton  # noqa: E402
from mxroll.model.ops import absorb_ref  # noqa: E402
from mxroll.rollout.attention.triton_mla import decode_splits, mla_decode_ref, mla_decode_triton  # noqa: E402

H, P, V, C, R, PAGE, LAYERS = 16, 128, 128, 512, 64, 64, 27
SCALE = 0.0723


class Layer:
    """One layer's weights, cache and this step's inputs for B rows of `ctx` cached tokens (the new token last)."""

    def __init__(self, B: int, ctx: int, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        def rnd(*s, scale=1.0):
            return (torch.randn(*s, generator=g, device="cuda") * scale).to(torch.bfloat16)
        self.kv_b = rnd(H, P + V, C, scale=0.05)
        self.w_uk, self.w_uv = self.kv_b.split([P, V], dim=1)
        per = -(-ctx // PAGE)
        pages = B * per + 1
        self.ckv, self.kpe = rnd(pages, PAGE, C), rnd(pages, PAGE, R)
        perm = torch.randperm(B * per, generator=g, device="cuda").to(torch.int32)
        self.indptr = torch.arange(0, B * per + 1, per, dtype=torch.int32, device="cuda")
        self.indices = perm
        self.lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        pos = ctx - 1
        self.slots = (perm.view(B, per)[:, pos // PAGE].long() * PAGE + pos % PAGE)
        proj = rnd(B, C + R, scale=2.0)
        self.kv, self.k_pe = proj[:, :C], rnd(B, R)
        self.norm_w = (torch.rand(C, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
        q = rnd(B, H, P + R)
        self.q_nope, self.q_pe = q[..., :P], q[..., P:].contiguous()
        self.B = B
        self.o_lat = torch.empty(B, H, C, **bf)
        self.o = torch.empty(B, H, V, **bf)

    def flat(self):
        return self.ckv.view(-1, C), self.kpe.view(-1, R)

    def run(self, splits: int, pre_fused: bool, block_c: int | None) -> torch.Tensor:
        """pre_fused: latent store + absorb in one launch (else the store kernel and the bmm); block_c: W_UV in the
        merge over latent blocks of that width (None: the separate merge, then the bmm)."""
        ckv, kpe = self.flat()
        if pre_fused:
            q_lat = latent_absorb_triton(ckv, kpe, self.slots, self.kv, self.k_pe, self.norm_w, 1e-6, None,
                                         self.q_nope, self.w_uk)
        else:
            store_latent_triton(ckv, kpe, self.slots, self.kv, self.k_pe, self.norm_w, 1e-6, None)
            q_lat = absorb_ref(self.q_nope, self.w_uk)
        if block_c is not None:
            return mla_decode_triton(q_lat, self.q_pe, self.ckv, self.kpe, self.indptr, self.indices, self.lens,
                                     SCALE, splits, self.o, w_uv_HVC=self.w_uv, block_c=block_c)
        mla_decode_triton(q_lat, self.q_pe, self.ckv, self.kpe, self.indptr, self.indices, self.lens, SCALE, splits,
                          self.o_lat)
        return torch.bmm(self.o_lat.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)

    def reference(self) -> torch.Tensor:
        q_lat = absorb_ref(self.q_nope, self.w_uk)
        o = mla_decode_ref(q_lat, self.q_pe, self.ckv, self.kpe, self.indptr, self.indices, self.lens, SCALE)
        return torch.einsum("bhc,hvc->bhv", o, self.w_uv.float())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--ctx", default="512,1024,4096")
    ap.add_argument("--out", default="mla_decode_fusion")
    a = ap.parse_args()
    env = environment()
    bw = measure_copy_bandwidth()
    sms = env["sms"]
    rows_out = []
    print(f"{env['device']}: copy {bw / 1e12:.2f} TB/s; per layer, {LAYERS} layers in one graph")
    print(f"{'B':>2} {'ctx':>5} {'variant':28s} {'us':>7} {'x sep':>6} {'x floor':>7}  checks")
    for B in map(int, a.rows.split(",")):
        for ctx in map(int, a.ctx.split(",")):
            layers = [Layer(B, ctx, seed=1000 * B + ctx + i) for i in range(LAYERS)]
            nbytes = 2 * H * 128 * C * 2 + B * ctx * (C + R) * 2
            floor = nbytes / bw
            s0 = decode_splits(B, H, sms)
            L0 = layers[0]
            sep = L0.run(s0, False, None).clone()
            ref = L0.reference()
            variants = [("separate", s0, False, None), ("pre fused", s0, True, None)]
            variants += [(f"post fused BC={bc}", s0, False, bc) for bc in (32, 64, 128)]
            variants += [(f"both fused BC=64 splits={s}", s, True, 64) for s in (s0, s0 // 2, s0 // 4) if s >= 1]
            base = None
            for name, s, pre, bc in variants:
                t = time_graph([lambda L=L, s=s, pre=pre, bc=bc: L.run(s, pre, bc) for L in layers])
                base = base or t
                out = L0.run(s, pre, bc).clone()
                again = L0.run(s, pre, bc)
                row = dict(B=B, ctx=ctx, variant=name, splits=s, pre_fused=pre, block_c=bc, us=t * 1e6,
                           vs_separate=base / t, floor_us=floor * 1e6, x_floor=t / floor,
                           rel_err_vs_fp32=rel(out, ref), rel_diff_vs_separate=rel(out, sep),
                           deterministic=bool(torch.equal(out, again)))
                rows_out.append(row)
                print(f"{B:2d} {ctx:5d} {name:28s} {row['us']:7.2f} {row['vs_separate']:6.2f} {row['x_floor']:7.2f}  "
                      f"err {row['rel_err_vs_fp32']:.1e} vs-sep {row['rel_diff_vs_separate']:.1e} "
                      f"det={row['deterministic']}", flush=True)
            del layers
            torch.cuda.empty_cache()
    path = write_results(a.out, {"benchmark": "mla_decode_fusion", "shape": dict(H=H, P=P, V=V, C=C, R=R, page=PAGE),
                                 "layers_per_graph": LAYERS, "copy_bandwidth_Bps": bw,
                                 "floor": "W_UK + W_UV + latents read, over the copy bandwidth", "rows": rows_out,
                                 **env})
    print("wrote", path)


if __name__ == "__main__":
    main()
