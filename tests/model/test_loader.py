"""Checkpoint loading: sharded/single layouts and one clear error per bad checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxroll import configs
from mxroll.model import CheckpointError, ConfigError, ModelConfig, load_model
from mxroll.model import synthetic
from mxroll.model.loader import iter_checkpoint


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(synthetic, "SHARD_BYTES", 200_000)
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    sharded = synthetic.make_checkpoint(cfg, tmp_path / "sharded", seed=0, dtype="float32", progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = load_model(tiny_checkpoint, progress=False), load_model(sharded, progress=False)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_experts_are_stacked_in_engine_layout(tiny_checkpoint):
    model = load_model(tiny_checkpoint, progress=False)
    tensors = dict(iter_checkpoint(tiny_checkpoint, progress=False))
    w13 = model.layers[1].mlp.experts.w13_weight
    F = model.cfg.moe_intermediate_size
    assert torch.equal(w13[5, :F], tensors["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(w13[5, F:], tensors["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert torch.equal(model.layers[1].mlp.experts.w2_weight[3], tensors["model.layers.1.mlp.experts.3.down_proj.weight"])


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
     "missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"),
    (lambda t: t.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(7, 32)}),
     "tensor 'model.layers.0.self_attn.kv_b_proj.weight' has shape (7, 32); expected (128, 32)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int32)}),
     "tensor 'model.layers.0.mlp.up_proj.weight' has dtype torch.int32"),
    (lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(3)}),
     "unexpected tensor 'model.layers.0.self_attn.bogus.weight'"),
    (lambda t: t.update({"model.layers.9.mlp.gate_proj.weight": torch.zeros(3)}),
     "unexpected tensor 'model.layers.9.mlp.gate_proj.weight'"),
    (lambda t: t.update({"model.layers.1.mlp.experts.8.gate_proj.weight": torch.zeros(32, 64)}),
     "unexpected tensor 'model.layers.1.mlp.experts.8.gate_proj.weight'"),
])
def test_bad_checkpoint_names_the_tensor(tmp_path, tiny_checkpoint, damage, message):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    assert message in str(e.value)


def test_all_problems_reported_together(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    rewrite(path, lambda t: (t.pop("model.norm.weight"), t.update({"extra.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError, match=r"2 problems") as e:
        load_model(path, progress=False)
    assert "model.norm.weight" in str(e.value) and "extra.weight" in str(e.value)


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("kv_lora_rank"), "'kv_lora_rank' is missing"),
    (lambda c: c.update(hidden_size="64"), "'hidden_size' must be an integer"),
    (lambda c: c.update(n_group=3), "'n_routed_experts' (8) must be divisible by n_group (3)"),
    (lambda c: c.update(topk_group=5), "'topk_group'"),
    (lambda c: c.update(scoring_func="softmax"), "'scoring_func'"),
    (lambda c: c.update(model_type="llama"), "'model_type'"),
    (lambda c: c.update(num_key_value_heads=2), "'num_key_value_heads'"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), "'rope_scaling.type'"),
    (lambda c: c.update(routed_scaling_factor=-1), "'routed_scaling_factor'"),
])
def test_broken_config_names_the_field(tmp_path, tiny_checkpoint, edit, field):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(path, progress=False)
    assert field in str(e.value)


def test_unreadable_files(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "bad")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(path)
    path = copy_ckpt(tiny_checkpoint, tmp_path / "trunc")
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(path, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", empty)
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_model(empty, progress=False)
    (empty / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_model(empty, progress=False)


def test_mtp_layers_are_skipped(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "mtp")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    rewrite(path, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(64, 128)}))
    load_model(path, progress=False)


@pytest.mark.parametrize("name", [
    "model.layers.0.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
    "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.gate.weight",
    "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.up_proj.weight",
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_high_precision_tensor_is_rejected(tmp_path, tiny_checkpoint, name, bad):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "bad")

    def damage(t):
        t[name].view(-1)[t[name].numel() // 2] = bad
        t.pop("model.layers.2.post_attention_layernorm.weight")
    rewrite(path, damage)
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    assert f"tensor {name!r} holds NaN/inf values" in str(e.value)
    assert "missing tensor 'model.layers.2.post_attention_layernorm.weight'" in str(e.value)  # one error for all


def test_nonfinite_bf16_tensor_beside_mxfp8_is_rejected(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = synthetic.make_checkpoint(cfg, tmp_path / "mx", mxfp8=True, progress=False)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    rewrite(path, lambda t: (t[name].__setitem__((3, 4), float("nan")),
                             t.__setitem__(name, t[name].to(torch.bfloat16))))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds NaN/inf values"):
        load_model(path, progress=False)
