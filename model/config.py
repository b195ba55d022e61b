"""DeepSeek-V3 model config read from an HF ``config.json``.

Every field is validated on the way in; a broken config raises ``ConfigError`` naming the field.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)
# What transformers' DeepseekV3Config uses for a field that config.json leaves out; an explicit null
# stays null (q_lora_rank: plain q_proj; bos/eos: none).
HF_DEFAULTS = {"n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
               "first_k_dense_replace": 3, "q_lora_rank": 1536, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "rope_interleave": True, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
               "bos_token_id": 0, "eos_token_id": 1}


class ConfigError(ValueError):
    """A config.json (or engine config) field is missing or invalid."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    # YaRN (DeepSeek-V3's long-context rope); factor 1.0 means plain rope.
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True

    @property
    def is_yarn(self) -> bool:
        return self.factor != 1.0 or self.original_max_position > 0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_nextn_predict_layers: int = 0
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek-V3 does."""
        scale = self.qk_head_dim**-0.5
        if self.rope.is_yarn and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        d = {**HF_DEFAULTS, **raw}
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"field 'model_type' is {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        for name, expected in (("scoring_func", "sigmoid"), ("hidden_act", "silu"), ("topk_method", "noaux_tc")):
            if name in d and d[name] != expected:
                raise ConfigError(f"field {name!r} is {d[name]!r}; only {expected!r} is supported")
        heads = _int(d, "num_attention_heads")
        kv_heads = d.get("num_key_value_heads", heads)
        if kv_heads != heads:
            raise ConfigError(f"field 'num_key_value_heads' ({kv_heads}) must equal num_attention_heads "
                              f"({heads}) for MLA")
        if d.get("attention_bias"):
            raise ConfigError("field 'attention_bias' = true is not supported (DeepSeek-V3 has no attention bias)")
        q_lora = d.get("q_lora_rank")
        if q_lora is not None:
            q_lora = _int(d, "q_lora_rank")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_ids):
            raise ConfigError(f"field 'eos_token_id' must be an int or list of ints, got {eos!r}")
        cfg = cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            intermediate_size=_int(d, "intermediate_size"),
            moe_intermediate_size=_int(d, "moe_intermediate_size"),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            n_shared_experts=_int(d, "n_shared_experts", minimum=0),
            n_routed_experts=_int(d, "n_routed_experts"),
            num_experts_per_tok=_int(d, "num_experts_per_tok"),
            n_group=_int(d, "n_group"),
            topk_group=_int(d, "topk_group"),
            norm_topk_prob=_bool(d, "norm_topk_prob"),
            routed_scaling_factor=_float(d, "routed_scaling_factor"),
            first_k_dense_replace=_int(d, "first_k_dense_replace", minimum=0),
            q_lora_rank=q_lora,
            kv_lora_rank=_int(d, "kv_lora_rank"),
            qk_nope_head_dim=_int(d, "qk_nope_head_dim"),
            qk_rope_head_dim=_int(d, "qk_rope_head_dim"),
            v_head_dim=_int(d, "v_head_dim"),
            max_position_embeddings=_int(d, "max_position_embeddings"),
            rms_norm_eps=_float(d, "rms_norm_eps"),
            rope=_rope(d),
            tie_word_embeddings=_bool(d, "tie_word_embeddings"),
            bos_token_id=None if d["bos_token_id"] is None else _int(d, "bos_token_id", minimum=0),
            eos_token_ids=eos_ids,
            num_nextn_predict_layers=_int(d, "num_nextn_predict_layers", minimum=0),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            quantization_config=d.get("quantization_config"),
            raw=dict(raw),
        )
        cfg._check()
        return cfg

    def _check(self) -> None:
        n_group, topk_group = self._given("n_group"), self._given("topk_group")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"field 'n_routed_experts' ({self.n_routed_experts}) must be divisible by "
                              f"n_group ({n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"field 'topk_group' ({topk_group}) must be in [1, n_group={n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(f"field 'n_group' ({n_group}): each group needs >= 2 of the {self.n_routed_experts} "
                              "experts (group score = sum of top-2)")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ConfigError(
                f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                f"topk_group groups ({self.topk_group * per_group})")
        # An absent field's default (3) on a shallower model makes every layer dense, as in transformers.
        if "first_k_dense_replace" in self.raw and self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError("field 'first_k_dense_replace' exceeds num_hidden_layers")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("field 'qk_rope_head_dim' must be even")
        if self.vocab_size and self.eos_token_ids and max(self.eos_token_ids) >= self.vocab_size:
            raise ConfigError(f"field 'eos_token_id' {self.eos_token_ids} outside vocab_size {self.vocab_size}")

    def _given(self, name: str) -> str:
        """The field's value for a message, saying when it is transformers' default."""
        value = getattr(self, name)
        return f"{value}" if name in self.raw else f"{value}: absent from config.json, transformers' default"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope(d: dict) -> RopeConfig:
    # Older configs carry `rope_scaling` + top-level `rope_theta`; transformers >= 5 writes `rope_parameters`.
    key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(key) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field {key!r} must be an object or null, got {params!r}")
    theta_name = f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = _number(params.get("rope_theta", d["rope_theta"]), theta_name, positive=True)
    interleave = _bool(d, "rope_interleave")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return RopeConfig(theta=theta, interleave=interleave)
    if kind != "yarn":
        raise ConfigError(f"field '{key}.type' is {kind!r}; supported: 'yarn' or none")
    if theta == 1:
        raise ConfigError(f"field {theta_name!r} is 1; YaRN divides by log(rope_theta)")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"field '{key}.original_max_position_embeddings' is required for yarn")
    original = _int(params, "original_max_position_embeddings", name=f"{key}.original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:  # DeepSeek-V3 convention, as transformers reads it
        factor = _int(d, "max_position_embeddings") / original
    factor = _number(factor, f"{key}.factor", positive=True)
    if factor < 1:
        log.warning("field '%s.factor' is %s; YaRN expects >= 1", key, factor)

    def optional(name: str, default: float, positive: bool) -> float:
        v = params.get(name)
        return default if v is None else _number(v, f"{key}.{name}", positive)

    beta_fast, beta_slow = optional("beta_fast", 32.0, True), optional("beta_slow", 1.0, True)
    if beta_fast < beta_slow:
        log.warning("field '%s.beta_fast' (%s) is below beta_slow (%s)", key, beta_fast, beta_slow)
    attention = params.get("attention_factor")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"field '{key}.truncate' must be true or false, got {truncate!r}")
    return RopeConfig(
        theta=theta,
        factor=factor,
        original_max_position=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=optional("mscale", 0.0, False),
        mscale_all_dim=optional("mscale_all_dim", 0.0, False),
        attention_factor=None if attention is None else _number(attention, f"{key}.attention_factor", positive=True),
        truncate=truncate,
        interleave=interleave,
    )


def _number(v: Any, name: str, positive: bool) -> float:
    """A finite number, > 0 when `positive`, else >= 0."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or
                                                                                        (not positive and v == 0))
    if not ok:
        raise ConfigError(f"field {name!r} must be a {'positive' if positive else 'non-negative'} finite number, "
                          f"got {v!r}")
    return float(v)


def _int(d: dict, key: str, minimum: int = 1, default: int | None = None, name: str | None = None) -> int:
    v, name = d.get(key, default), name or key
    if v is None:
        raise ConfigError(f"field {name!r} is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"field {name!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(d: dict, name: str) -> float:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"field {name!r} must be a positive number, got {v!r}")
    return float(v)


def _bool(d: dict, name: str) -> bool:
    v = d.get(name)
    if not isinstance(v, bool):
        raise ConfigError(f"field {name!r} must be true or false, got {v!r}")
    return v
