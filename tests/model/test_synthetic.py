"""Synthetic checkpoints: seeded, HF-loadable, non-degenerate."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mxroll import configs
from mxroll.model import load_model
from mxroll.model.synthetic import make_checkpoint, tensor_specs
from mxroll.model import ModelConfig


def test_seeded_and_reproducible(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    a = load_file(str(make_checkpoint(cfg, tmp_path / "a", seed=1, progress=False) / "model.safetensors"))
    b = load_file(str(make_checkpoint(cfg, tmp_path / "b", seed=1, progress=False) / "model.safetensors"))
    c = load_file(str(make_checkpoint(cfg, tmp_path / "c", seed=2, progress=False) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert a["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert a["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["moonlight-16b-a3b", "deepseek-v3"])
def test_large_presets_have_expected_shapes(preset):
    cfg = ModelConfig.from_file(configs.model_preset_path(preset))
    specs = {name: shape for name, shape, _ in tensor_specs(cfg)}
    total = sum(torch.Size(s).numel() for s in specs.values())
    if preset == "moonlight-16b-a3b":
        assert cfg.hidden_size == 2048 and cfg.num_hidden_layers == 27 and cfg.n_routed_experts == 64
        assert cfg.q_lora_rank is None and cfg.vocab_size == 163840 and cfg.routed_scaling_factor == 2.446
        assert 15.5e9 < total < 16.5e9  # "16B"
        assert specs["model.layers.1.mlp.experts.63.gate_proj.weight"] == (1408, 2048)
    else:
        assert 660e9 < total < 675e9  # DeepSeek-V3 671B without MTP
        assert specs["model.layers.3.mlp.experts.255.down_proj.weight"] == (7168, 2048)


def test_hf_loads_synthetic_checkpoint(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = load_model(tiny_checkpoint, progress=False)
    ids = torch.arange(3, 40)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = ours.sequence_logits(ids, torch.arange(len(ids)), ours.new_cache(len(ids)))
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-4
    top = got.argmax(-1)
    assert len(set(top.tolist())) > 5, "random model should not collapse onto one token"
