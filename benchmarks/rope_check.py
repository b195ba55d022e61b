"""MLA rope on the GPU: the Triton kernel (model.kernels.triton_rope, q_pe and k_pe of one layer in one launch)
against the torch reference (model.ops.rope_ref: two `rotate` calls), moonlight-16b-a3b shape
(H=16, P=128, R=64, C=512), bf16, T tokens in (1, 64, 256, 4096).

Inputs are the strided views MLA.forward has (q_pe a slice of the q projection viewed [T, H, P+R], k_pe a
slice of the kv_a projection [T, C+R]), cos/sin from the model's Rope at random positions. Per T and
interleave mode: bit-equality of both outputs with the reference (also fp16 and fp32 inputs), the number of
kernels each launches (torch.profiler), and the time per call: eager (CUDA events around each call, so host
launch overhead included) and inside one CUDA graph over rotating inputs (device time, as in decode graphs),
for the reference and the kernel at num_warps 1, 2, 4 (the shipped default marked).

Glue of the FlashInfer MLA path (decode rows, 512 cached tokens each, T in 1, 64, 256): the forward that
hands FlashInfer the strided q_lat against the former one with a contiguous copy (bit-equality, kernels,
eager time), and unabsorb written by bmm(out=) straight into a [T, H, V] buffer against bmm + the
reshape copy MLA.forward makes (bit-equality, kernels, graph time): an experiment, not shipped.

    python benchmarks/rope_check.py [--tokens 1 64 256 4096] [--glue-tokens 1 64 256] [--out rope_check]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copies_for, environment, time_events, time_graph, write_results  # noqa: E402
from mxroll import configs  # noqa: E402
from mxroll.model import ModelConfig  # noqa: E402
from mxroll.model.kernels.triton_rope import rope_triton  # noqa: E402
from mxroll.model.ops import rope_ref  # noqa: E402
from mxroll.model.rope import Rope  # noqa: E402

PRESET = "moonlight-16b-a3b"
WARPS = (None, 1, 2, 4)  # None = the shipped choice


def inputs(cfg: ModelConfig, T: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, P, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q = (torch.randn(T, H * (P + R), device="cuda", generator=g) * 4).to(dtype)
    kv = (torch.randn(T, C + R, device="cuda", generator=g) * 4).to(dtype)
    pos = torch.randint(0, cfg.max_position_embeddings, (T,), device="cuda", generator=g)
    q_pe = q.view(T, H, -1).split([P, R], dim=-1)[1]
    k_pe = kv.split([C, R], dim=-1)[1]
    return q_pe, k_pe, Rope(cfg).cos_sin(pos)


def kernel_count(fn) -> int | str:
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return f"error: {e!r}"[:200]


def equality(cfg: ModelConfig, T: int, interleave: bool, dtype: torch.dtype, warps) -> dict:
    q_pe, k_pe, cos_sin = inputs(cfg, T, dtype, seed=T)
    q, k = rope_triton(q_pe, k_pe, cos_sin, interleave, num_warps=warps)
    q_ref, k_ref = rope_ref(q_pe, k_pe, cos_sin, interleave)
    out = {"equal": bool(torch.equal(q, q_ref) and torch.equal(k, k_ref))}
    if not out["equal"]:
        out["q_mismatches"] = int((q != q_ref).sum())
        out["k_mismatches"] = int((k != k_ref).sum())
        out["max_abs_diff"] = max((q.float() - q_ref.float()).abs().max().item(),
                                  (k.float() - k_ref.float()).abs().max().item())
    return out


def timings(cfg: ModelConfig, T: int, interleave: bool) -> dict:
    q_pe, k_pe, cos_sin = inputs(cfg, T, torch.bfloat16, seed=T)
    nbytes = q_pe.untyped_storage().nbytes() + k_pe.untyped_storage().nbytes()
    sets = [inputs(cfg, T, torch.bfloat16, seed=T + i) for i in range(copies_for(nbytes, cap=32))]
    variants = {"torch_ref": lambda q, k, cs: rope_ref(q, k, cs, interleave)}
    for w in WARPS:
        variants["triton" if w is None else f"triton_w{w}"] = (
            lambda q, k, cs, w=w: rope_triton(q, k, cs, interleave, num_warps=w))
    res = {}
    for name, f in variants.items():
        try:
            eager = time_events(lambda: f(q_pe, k_pe, cos_sin), iters=50, warmup=5)
            graph = time_graph([lambda s=s: f(*s) for s in sets], replays=10)
            res[name] = {"eager_us": eager * 1e6, "graph_us": graph * 1e6,
                         "kernels": kernel_count(lambda: f(q_pe, k_pe, cos_sin))}
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the run goes on
            traceback.print_exc()
            res[name] = {"error": repr(e)[:400]}
    return res


class Row:  # what StepInputs.build reads from a scheduler row
    def __init__(self, tokens, pages, start, length):
        self.seq = type("Seq", (), {"tokens": tokens, "pages": pages})()
        self.start, self.length, self.num_samples = start, length, 1


@torch.no_grad()
def glue_checks(base: ModelConfig, tokens: list[int], context: int = 512, page_size: int = 16) -> dict:
    from mxroll.model.mla import MLA
    from mxroll.rollout.attention.flashinfer_mla import FlashInferAttention
    from mxroll.rollout.kv_cache import PagedLatentCache
    from mxroll.rollout.step_inputs import StepInputs

    cfg = dataclasses.replace(base, num_hidden_layers=2)
    torch.manual_seed(0)
    mla = MLA(cfg, torch.bfloat16, layer=1).cuda()
    for p in mla.parameters():
        p.copy_(torch.randn_like(p, dtype=torch.float32) / p.shape[-1] ** 0.5)
    H, P, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    C, V = cfg.kv_lora_rank, cfg.v_head_dim
    per_row = -(-(context + 1) // page_size)
    out = {}
    for T in tokens:
        res = out[f"T{T}"] = {}
        try:
            cache = PagedLatentCache(cfg, T * per_row + 1, page_size, torch.bfloat16, torch.device("cuda"))
            cache.ckv_LPGC.normal_()
            cache.kpe_LPGR.normal_()
            rows = [Row(list(range(context + 1)), list(range(i * per_row, (i + 1) * per_row)), context, 1)
                    for i in range(T)]
            step = StepInputs.build(rows, page_size, torch.device("cuda"))
            q_nope = torch.randn(T, H, P, device="cuda", dtype=torch.bfloat16)
            q_pe = torch.randn(T, H, R, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
            k_pe = torch.randn(T, R, device="cuda", dtype=torch.bfloat16)
            fi = FlashInferAttention(cache, H, cfg.softmax_scale, max_pages_per_seq=per_row + 1)
            fi.begin(step)
            ckv, kpe = cache.layer(mla.layer)

            def before():  # the forward as it was: q_lat copied to contiguous
                cache.write(mla, step.slots_T, kv, k_pe)
                o_lat = fi.wrapper.run(mla.absorb(q_nope).contiguous(), q_pe.contiguous(), ckv, kpe)
                return mla.unabsorb(o_lat)

            def after():
                return fi.forward(mla, q_nope, q_pe, kv, k_pe)

            res["forward_equal"] = bool(torch.equal(before(), after()))
            for name, f in (("forward_before", before), ("forward_after", after)):
                res[name] = {"eager_us": time_events(f, iters=30, warmup=3) * 1e6, "kernels": kernel_count(f)}
            o_lat = torch.randn(T, H, C, device="cuda", dtype=torch.bfloat16)
            _, w_uv = mla.absorbed_weights()
            o_buf = torch.empty(T, H, V, device="cuda", dtype=torch.bfloat16)

            def unabsorb_copy():  # unabsorb, then the reshape (a copy) MLA.forward makes
                return mla.unabsorb(o_lat).reshape(T, -1)

            def unabsorb_out():
                torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=o_buf.transpose(0, 1))
                return o_buf.view(T, -1)

            res["unabsorb_out_equal"] = bool(torch.equal(unabsorb_copy(), unabsorb_out()))
            for name, f in (("unabsorb_copy", unabsorb_copy), ("unabsorb_out", unabsorb_out)):
                res[name] = {"graph_us": time_graph([f] * 8, replays=10) * 1e6, "kernels": kernel_count(f)}
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            res["error"] = repr(e)[:400]
        print(f"glue T={T}: {res}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096])
    ap.add_argument("--glue-tokens", type=int, nargs="*", default=[1, 64, 256])
    ap.add_argument("--out", default="rope_check")
    args = ap.parse_args()
    base = ModelConfig.from_file(configs.model_preset_path(PRESET))
    results = {"env": environment(), "model": PRESET, "shape": {
        "H": base.num_attention_heads, "P": base.qk_nope_head_dim, "R": base.qk_rope_head_dim,
        "C": base.kv_lora_rank, "interleave_in_config": base.rope.interleave}, "cases": {}}
    print(f"{PRESET}: {results['shape']}", flush=True)
    all_equal = True
    for interleave in (True, False):
        cfg = dataclasses.replace(base, rope=dataclasses.replace(base.rope, interleave=interleave))
        for T in args.tokens:
            key = f"T{T}_{'interleave' if interleave else 'halves'}"
            case = {"equality": {}}
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for w in WARPS:
                    name = f"{str(dtype).split('.')[-1]}_w{w or 'default'}"
                    try:
                        case["equality"][name] = eq = equality(cfg, T, interleave, dtype, w)
                        all_equal &= eq["equal"]
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        case["equality"][name] = {"error": repr(e)[:400]}
                        all_equal = False
            case["time"] = timings(cfg, T, interleave)
            results["cases"][key] = case
            bad = {k: v for k, v in case["equality"].items() if not v.get("equal")}
            print(f"{key}: equal in all {len(case['equality'])} dtype/warps checks" if not bad
                  else f"{key}: NOT EQUAL {bad}", flush=True)
            for name, t in case["time"].items():
                if "error" in t:
                    print(f"  {name:<12} ERROR {t['error']}", flush=True)
                else:
                    print(f"  {name:<12} eager {t['eager_us']:8.2f} us   graph {t['graph_us']:8.2f} us   "
                          f"kernels {t['kernels']}", flush=True)
            write_results(args.out, results)
    results["all_equal"] = all_equal
    try:
        results["glue"] = glue_checks(base, args.glue_tokens)
    except Exception as e:  # noqa: BLE001 - the rope results above still get written
        traceback.print_exc()
        results["glue"] = {"error": repr(e)[:400]}
    print(f"all bit-equal: {all_equal}")
    print(f"wrote {write_results(args.out, results)}")


if __name__ == "__main__":
    main()
