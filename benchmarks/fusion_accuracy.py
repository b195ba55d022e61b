"""How far the fast engine's model is from an fp32 reference of the same weights, with the shared experts fused
into the MoE kernel and apart (disable_shared_experts_fusion): a 3-layer moonlight-16b-a3b-shaped model, dummy
weights, routes pinned (model.dummy.pin_routing), prompts of 1, 8 and 48 tokens through `sequence_logits`
(the fused path serves up to 64 tokens). Per case: max and mean |log_softmax difference| over every position and
vocabulary entry, bf16 and MXFP8 weights. A correctness check, not a timing.

    python benchmarks/fusion_accuracy.py [--out NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_results  # noqa: E402
from mxroll import Engine, configs  # noqa: E402
from mxroll.model.dummy import pin_routing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="fusion_accuracy")
    args = ap.parse_args()
    d = json.loads(configs.model_preset_path("moonlight-16b-a3b").read_text())
    d.update(num_hidden_layers=3, vocab_size=4096, bos_token_id=0, eos_token_id=1)
    path = Path(tempfile.mkdtemp()) / "m3"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(d))
    common = dict(model_path=str(path), load_format="dummy", device="cuda", progress=False, max_total_tokens=1 << 14)
    results = {"env": environment(), "rows": []}
    for q in (None, "mxfp8"):
        fast = Engine(**common, quantization=q)
        ref = Engine(**common, quantization=q, dtype="float32", attention_backend="torch", gemm_backend="torch",
                     disable_cuda_graph=True, norm_backend="torch", router_backend="torch", rope_backend="torch")
        src = dict(fast.model.named_parameters())
        with torch.no_grad():
            for n, p in ref.model.named_parameters():
                p.copy_(src[n].to(p.dtype))
        ref.model.postprocess(ref.layouts)
        for e in (fast, ref):
            pin_routing(e.model)
        moes = [b.mlp for b in fast.model.layers if hasattr(b.mlp, "experts")]
        limit = moes[0].shared_fusion_max_tokens
        for T in (1, 8, 48):
            ids = torch.randint(2, 4096, (T,), generator=torch.Generator().manual_seed(T)).cuda()
            pos = torch.arange(T, device="cuda")
            r = ref.model.sequence_logits(ids, pos, ref.model.new_cache(256)).float().log_softmax(-1)
            for fused in (True, False):
                for m in moes:
                    m.shared_fusion_max_tokens = limit if fused else 0
                a = fast.model.sequence_logits(ids, pos, fast.model.new_cache(256)).float().log_softmax(-1)
                row = dict(weights=q or "bf16", tokens=T, shared_fused=fused, max_abs=(a - r).abs().max().item(),
                           mean_abs=(a - r).abs().mean().item())
                results["rows"].append(row)
                print(f"{row['weights']:6s} T={T:3d} shared {'fused' if fused else 'apart'}: max {row['max_abs']:.3e} "
                      f"mean {row['mean_abs']:.3e}", flush=True)
        fast.shutdown()
        ref.shutdown()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
