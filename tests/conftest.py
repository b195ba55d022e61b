"""Shared fixtures: small DeepseekV3 checkpoints written by HF transformers' save_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mxroll import configs

# Three configs that differ in q_lora, grouping, norm_topk_prob, dense layers, tying, rope flavour.
HF_CONFIGS = {
    "qlora_groups_yarn": dict(
        q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1,
        tie_word_embeddings=False, rope_interleave=True, n_shared_experts=1, num_hidden_layers=3,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "noqlora_4groups_tied": dict(
        q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False, first_k_dense_replace=2,
        tie_word_embeddings=True, rope_interleave=False, n_shared_experts=1, num_hidden_layers=3,
        rope_scaling=None),
    "qlora_1group_mscale": dict(
        q_lora_rank=16, n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=2,
        tie_word_embeddings=False, rope_interleave=True, n_shared_experts=2, num_hidden_layers=4,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7}),
}
# All GEMM contraction dims multiples of 32, for MXFP8 end-to-end checks.
MXFP8_CONFIG = dict(
    q_lora_rank=32, n_group=2, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1,
    tie_word_embeddings=False, rope_interleave=True, n_shared_experts=1, num_hidden_layers=3, v_head_dim=16,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights with std 1/sqrt(fan_in), norms near 1, a routing bias that changes selections."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            r = torch.randn(p.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * r)
            elif "norm" in name:
                p.copy_(1 + 0.1 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5 * (2.0 if name == "lm_head.weight" else 1.0))


def save_hf_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**BASE, **(MXFP8_CONFIG if name == "mxfp8" else HF_CONFIGS[name])})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float()
    randomize_(model, seed)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from mxroll.model.synthetic import make_checkpoint

    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    return make_checkpoint(cfg, tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32", progress=False)
