"""A bf16 engine is no noisier than HF transformers in bf16: per-token logprobs of a fixed sequence,
teacher-forced, against HF in float64 on the same (bf16-representable) weights."""
from __future__ import annotations

import pytest
import torch

from mxroll.model import load_model
from tests.conftest import BASE, randomize_

transformers = pytest.importorskip("transformers")

# Moonlight-like attention (no q_lora, plain rope, interleaved), 4 layers. All layers are dense: with
# routed experts a top-k selection near a tie flips under bf16 noise in either implementation, a
# discrete jump (up to ~3 nats here) that dominates mean and max and changes with seed and platform.
SHAPE = dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=4, num_hidden_layers=4,
             n_shared_experts=2, tie_word_embeddings=False, rope_interleave=True, rope_scaling=None)
# Random init gives near-uniform attention, where score rounding hardly shows; trained models attend
# sharply. q_proj x3 gives attention logits of a few units.
Q_GAIN = 3.0
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 16, 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.DeepseekV3Config(**{**BASE, **SHAPE})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    randomize_(model, 0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(Q_GAIN)
    path = tmp_path_factory.mktemp("bf16")
    model.to(torch.bfloat16).save_pretrained(path)  # every implementation starts from the same bf16 weights
    return path


def ours_logits(model, ids: list[int]) -> torch.Tensor:
    """fp32 logits [T, V] of one sequence through the engine's model (prefill, fresh cache)."""
    return model.sequence_logits(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def token_logprobs(logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), dim=-1)[PROMPT_LEN - 1:-1]
    return lp.gather(1, torch.tensor(seq[PROMPT_LEN:])[:, None])[:, 0]


def test_bf16_engine_logprobs_no_noisier_than_hf_bf16(checkpoint):
    def hf(dtype):
        return transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=dtype,
                                                                  attn_implementation="eager").eval()
    ref_model, hf_bf16 = hf(torch.float64), hf(torch.bfloat16)
    ours = load_model(checkpoint, dtype=torch.bfloat16, progress=False)
    d_ours, d_hf = [], []
    for p in range(PROMPTS):
        seq = torch.randint(2, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(p)).tolist()
        for _ in range(NEW_TOKENS):  # greedy continuation in float64
            seq.append(int(hf_logits(ref_model, seq)[-1].argmax()))
        ref = token_logprobs(hf_logits(ref_model, seq), seq)
        d_ours.append((token_logprobs(ours_logits(ours, seq), seq) - ref).abs())
        d_hf.append((token_logprobs(hf_logits(hf_bf16, seq).float(), seq) - ref).abs())
    d_ours, d_hf = torch.cat(d_ours), torch.cat(d_hf)
    print(f"\n|logprob - float64| over {d_ours.numel()} tokens: engine bf16 mean {d_ours.mean():.4f} "
          f"max {d_ours.max():.4f}; HF bf16 mean {d_hf.mean():.4f} max {d_hf.max():.4f}")
    # Measured on CPU with this protocol on model seeds 0-5 (this test: seed 0): engine/HF mean ratio
    # 0.85-0.96 with fp32 scores (seed 0: 0.90), 0.97-1.15 when each score term was rounded to bf16
    # (seed 0: 1.02). So the mean must not exceed HF's. The max is one token (ratio 0.49-1.68 across
    # seeds, 0.49 here) and only bounds outliers.
    assert d_ours.mean() <= d_hf.mean()
    assert d_ours.max() <= 1.25 * d_hf.max()
