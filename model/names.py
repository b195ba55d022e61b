"""The one map from HF checkpoint names to engine parameters.

Engine parameter names are the module paths of `model.deepseek.DeepseekV3` (HF names without the
`model.` prefix), except routed experts, which are stacked: `layers.{i}.mlp.experts.w13_weight`
[E, 2F, D] (gate rows then up rows) and `w2_weight` [E, D, F].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj")  # transformers>=5 in-memory
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Buffers some exporters write that carry no weights.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor lands: a parameter, optionally one expert's slot and gate/up half."""

    param: str
    expert: int | None = None
    half: int | None = None  # 0 = gate rows of w13, 1 = up rows

    @property
    def slot(self) -> tuple:
        return (self.expert, self.half)


def hf_to_engine(name: str, cfg: ModelConfig) -> Target | None:
    """Map an HF name; None for tensors that are knowingly skipped (MTP layers, rotary buffers).
    Raises KeyError for names this architecture does not have."""
    if _IGNORED.match(name):
        return None
    m = _LAYER.match(name)
    if m and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers:
        return None  # multi-token-prediction layers: not used for generation
    m = _EXPERT.fullmatch(name)
    if m:
        layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        base = f"layers.{layer}.mlp.experts."
        if proj == "down":
            return Target(base + "w2_weight", expert)
        return Target(base + "w13_weight", expert, 0 if proj == "gate" else 1)
    m = _FUSED_EXPERTS.fullmatch(name)
    if m:
        return Target(f"layers.{m.group(1)}.mlp.experts.{'w13' if m.group(2) == 'gate_up' else 'w2'}_weight")
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else Target(name)
    if name.startswith("model."):
        return Target(name[len("model."):])
    raise KeyError(name)


def engine_to_hf(param: str, expert: int | None = None, half: int | None = None) -> str:
    """Inverse of `hf_to_engine` (for error messages and weight export)."""
    if param.endswith("experts.w13_weight") or param.endswith("experts.w2_weight"):
        base = param.rsplit(".", 1)[0]
        if expert is None:
            return f"model.{base}.{'gate_up_proj' if 'w13' in param else 'down_proj'}"
        proj = "down" if "w2" in param else ("gate" if half == 0 else "up")
        return f"model.{base}.{expert}.{proj}_proj.weight"
    return param if param == "lm_head.weight" else f"model.{param}"
