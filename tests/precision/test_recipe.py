"""The recipe's high_precision list and a checkpoint's modules_to_not_convert are read by one rule."""
from __future__ import annotations

import json

import pytest
import torch

from mxroll import configs
from mxroll.model.synthetic import make_checkpoint
from mxroll.precision import Recipe, RecipeError, storage_plan
from mxroll.precision.recipe import in_module_list
from mxroll.rollout import Engine

SHARED_UP = "layers.3.mlp.shared_experts.up_proj"


@pytest.mark.parametrize("module, entries, expected", [
    (SHARED_UP, ["shared_experts"], True),
    (SHARED_UP, ["mlp.shared_experts"], True),
    (SHARED_UP, ["model.layers.3.mlp.shared_experts"], True),
    (SHARED_UP, ["layers.3"], True),
    (SHARED_UP, ["experts"], False),  # a component, not a substring of one
    (SHARED_UP, ["up_proj"], True),
    (SHARED_UP, ["shared_experts.up_proj.weight"], False),  # names a child, not the module or a parent
    ("layers.1.mlp.up_proj", ["layers.1"], True),
    ("layers.12.mlp.up_proj", ["layers.1"], False),
    ("layers.19.self_attn.o_proj", ["layers.1"], False),
    ("layers.1.mlp.up_proj", ["model.layers.1"], True),
    ("model.layers.1.mlp.up_proj", ["layers.1"], True),
    ("layers.0.mlp.gate_proj", ["mlp.gate"], False),
    ("layers.3.mlp.gate", ["mlp.gate"], True),
    ("layers.3.mlp.experts", ["mlp.experts"], True),
    ("layers.3.mlp.experts", ["shared_experts"], False),
    ("layers.0.self_attn.kv_b_proj", ["model.layers.0.self_attn.kv_b_proj"], True),
    ("layers.1.self_attn.kv_b_proj", ["model.layers.0.self_attn.kv_b_proj"], False),
    ("embed_tokens", ["model.embed_tokens"], True),
    ("lm_head", ["lm_head"], True),
    ("layers.3.mlp.shared_experts.up_proj", [], False),
])
def test_module_list_matches_by_dotted_components(module, entries, expected):
    assert in_module_list(module, entries) is expected


def test_recipe_and_checkpoint_lists_agree():
    entries = ("kv_b_proj", "shared_experts", "layers.1")
    recipe = Recipe(high_precision=entries)
    qc = {"quant_method": "mxfp8", "modules_to_not_convert": list(entries)}
    modules = ["layers.0.self_attn.kv_b_proj", SHARED_UP, "layers.1.mlp.up_proj", "layers.12.mlp.up_proj",
               "layers.3.mlp.experts", "layers.3.self_attn.o_proj"]
    plan = storage_plan({m: (64,) for m in modules}, qc, None, Recipe())
    for m in modules:
        assert recipe.wants_mxfp8(m) == plan.is_mxfp8(m), m
    assert plan.mxfp8_modules == {"layers.12.mlp.up_proj", "layers.3.mlp.experts", "layers.3.self_attn.o_proj"}


def test_single_expert_exclusions_are_refused_in_either_naming():
    for entry in ("model.layers.3.mlp.experts.5", "layers.3.mlp.experts.5.up_proj"):
        qc = {"quant_method": "mxfp8", "modules_to_not_convert": [entry]}
        with pytest.raises(RecipeError, match="single experts of layers.3.mlp.experts"):
            storage_plan({"layers.3.mlp.experts": (64,)}, qc, None, Recipe())


def test_checkpoint_with_bf16_shared_experts_loads_with_the_default_recipe(tmp_path):
    """A trainer that keeps shared experts bf16 writes `shared_experts` into modules_to_not_convert;
    an engine with the default recipe keeps them high precision instead of expecting MXFP8."""
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = make_checkpoint(cfg, tmp_path / "ck", mxfp8=True, progress=False,
                           recipe=Recipe(high_precision=("kv_b_proj", "shared_experts")))
    assert "shared_experts" in json.loads((path / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    engine = Engine(model_path=str(path), device="cpu", progress=False)
    mlp = engine.model.layers[1].mlp
    assert mlp.shared_experts.up_proj.weight.dtype == torch.float32
    assert mlp.experts.w13_weight.dtype == torch.float8_e4m3fn
    assert "layers.1.mlp.shared_experts.up_proj" not in engine.model.plan.mxfp8_modules
    out = engine.generate(input_ids=[0, 5, 6], sampling_params={"max_new_tokens": 3, "temperature": 0})
    assert len(out["output_ids"]) == 3


@pytest.mark.parametrize("qc, message", [
    ("mxfp8", "quantization_config must be an object"),
    (["mxfp8"], "quantization_config must be an object"),
    ({"quant_method": "fp8"}, "quantization_config.quant_method='fp8'"),
    ({"quant_method": "mxfp8", "modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
    ({"quant_method": "mxfp8", "modules_to_not_convert": [3]}, "modules_to_not_convert must be a list"),
])
def test_bad_quantization_config(qc, message):
    with pytest.raises(RecipeError, match=message):
        storage_plan({"layers.0.mlp.up_proj": (64,)}, qc, None, Recipe())


def test_quantization_config_string_in_config_json(tmp_path):
    cfg = json.loads(configs.model_preset_path("tiny").read_text())
    path = make_checkpoint(cfg, tmp_path / "ck", progress=False)
    (path / "config.json").write_text(json.dumps(dict(cfg, quantization_config="mxfp8")))
    with pytest.raises(RecipeError, match="quantization_config must be an object.*got str 'mxfp8'"):
        Engine(model_path=str(path), device="cpu", progress=False)


@pytest.mark.parametrize("hp", ["shared_experts", ("kv_b_proj", 3), ("",)])
def test_recipe_high_precision_must_be_names(hp):
    with pytest.raises(RecipeError, match="high_precision"):
        Recipe(high_precision=hp)
