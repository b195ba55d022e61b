"""config.json reading: transformers' defaults for absent fields, and every rope field validated."""
from __future__ import annotations

import json
import math

import pytest

from mxroll import configs
from mxroll.model import ConfigError, ModelConfig
from mxroll.model.config import HF_DEFAULTS

transformers = pytest.importorskip("transformers")

TINY = json.loads(configs.model_preset_path("tiny").read_text())
YARN = TINY["rope_scaling"]


def test_defaults_are_transformers_defaults():
    hf = transformers.DeepseekV3Config()
    for name, value in HF_DEFAULTS.items():
        ref = hf.rope_parameters["rope_theta"] if name == "rope_theta" else getattr(hf, name)
        assert value == ref and type(value) is type(ref), name


def test_absent_fields_take_transformers_values():
    d = {k: v for k, v in TINY.items() if k not in HF_DEFAULTS}
    d.update(n_routed_experts=64, num_hidden_layers=4)  # room for 8 groups of >= 2 experts and 3 dense layers
    ours = ModelConfig.from_dict(d)
    hf = transformers.DeepseekV3Config(**d)
    assert (ours.routed_scaling_factor, ours.n_group, ours.topk_group, ours.first_k_dense_replace) == (2.5, 8, 4, 3)
    for name in ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "norm_topk_prob",
                 "rms_norm_eps", "tie_word_embeddings", "q_lora_rank", "bos_token_id", "num_nextn_predict_layers"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.eos_token_ids == (hf.eos_token_id,) and ours.rope.interleave == hf.rope_interleave
    assert [ours.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert ours.rope.theta == hf.rope_parameters["rope_theta"]


def test_explicit_null_stays_null():
    ours = ModelConfig.from_dict(dict(TINY, q_lora_rank=None, bos_token_id=None, eos_token_id=None))
    assert ours.q_lora_rank is None and ours.bos_token_id is None and ours.eos_token_ids == ()


def test_transformers_default_that_does_not_fit_is_named():
    d = {k: v for k, v in TINY.items() if k not in ("n_group", "topk_group")}  # 8 experts in 8 groups of one
    with pytest.raises(ConfigError, match=r"'n_group' \(8: absent from config.json, transformers' default\)"):
        ModelConfig.from_dict(d)
    shallow = {k: v for k, v in TINY.items() if k != "first_k_dense_replace"}
    shallow["num_hidden_layers"] = 2
    assert not any(ModelConfig.from_dict(shallow).is_moe_layer(i) for i in range(2))  # all dense, as transformers


@pytest.mark.parametrize("edit, field", [
    (dict(factor=0), "rope_scaling.factor"),
    (dict(factor=-4), "rope_scaling.factor"),
    (dict(factor=math.inf), "rope_scaling.factor"),
    (dict(factor=math.nan), "rope_scaling.factor"),
    (dict(factor="4"), "rope_scaling.factor"),
    (dict(factor=True), "rope_scaling.factor"),
    (dict(original_max_position_embeddings=0), "rope_scaling.original_max_position_embeddings"),
    (dict(original_max_position_embeddings=-512), "rope_scaling.original_max_position_embeddings"),
    (dict(original_max_position_embeddings=512.5), "rope_scaling.original_max_position_embeddings"),
    (dict(original_max_position_embeddings=None), "rope_scaling.original_max_position_embeddings"),
    (dict(beta_fast=-1), "rope_scaling.beta_fast"),
    (dict(beta_fast=0), "rope_scaling.beta_fast"),
    (dict(beta_slow=math.inf), "rope_scaling.beta_slow"),
    (dict(beta_slow=-1), "rope_scaling.beta_slow"),
    (dict(mscale=-1), "rope_scaling.mscale"),
    (dict(mscale=math.nan), "rope_scaling.mscale"),
    (dict(mscale_all_dim=-0.5), "rope_scaling.mscale_all_dim"),
    (dict(mscale_all_dim=math.inf), "rope_scaling.mscale_all_dim"),
    (dict(attention_factor=0), "rope_scaling.attention_factor"),
    (dict(attention_factor=-1.0), "rope_scaling.attention_factor"),
    (dict(truncate="no"), "rope_scaling.truncate"),
    (dict(rope_theta=0), "rope_scaling.rope_theta"),
    (dict(rope_theta=1), "rope_scaling.rope_theta"),
])
def test_bad_rope_field_is_named(edit, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(dict(TINY, rope_scaling=dict(YARN, **edit)))


@pytest.mark.parametrize("theta", [0, -1, math.inf, math.nan, "10000", None])
def test_bad_rope_theta_is_named(theta):
    with pytest.raises(ConfigError, match="'rope_theta'"):
        ModelConfig.from_dict(dict(TINY, rope_theta=theta, rope_scaling=None))


def test_rope_parameters_are_named_as_given():
    with pytest.raises(ConfigError, match="'rope_parameters.factor'"):
        ModelConfig.from_dict(dict(TINY, rope_scaling=None, rope_parameters=dict(YARN, rope_type="yarn", factor=0)))


def test_valid_yarn_fields_are_kept():
    rope = ModelConfig.from_dict(dict(TINY, rope_scaling=dict(YARN, attention_factor=1.25, truncate=False))).rope
    assert (rope.factor, rope.original_max_position, rope.attention_factor, rope.truncate) == (4.0, 512, 1.25, False)
    # factor may be left out: max_position_embeddings / original_max_position_embeddings, as transformers reads it
    rope = ModelConfig.from_dict(dict(TINY, rope_scaling={k: v for k, v in YARN.items() if k != "factor"})).rope
    assert rope.factor == TINY["max_position_embeddings"] / YARN["original_max_position_embeddings"]
