"""The one map from HF checkpoint names to engine parameters.

Engine parameter names are the module paths of `model.deepseek.DeepseekV3` (HF names without the
`model.` prefix), except routed experts, which are stacked: `layers.{i}.mlp.experts.w13_weight`
[E, 2F, D] (gate rows then up rows) and `w2_weight` [E, D, F].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?")
# transformers>=5 in-memory naming: gate_up_proj [E, 2F, D], down_proj [E, D, F] (+ their E8M0 scales)
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(_scale_inv)?")
SCALE_SUFFIX = "_scale_inv"
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
        layer, expert, proj, suffix = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) or ""
        base = f"layers.{layer}.mlp.experts."
        if proj == "down":
            return Target(base + "w2_weight" + suffix, expert)
        return Target(base + "w13_weight" + suffix, expert, 0 if proj == "gate" else 1)
    m = _FUSED_EXPERTS.fullmatch(name)
    if m:
        which = "w13" if m.group(2) == "gate_up" else "w2"
        return Target(f"layers.{m.group(1)}.mlp.experts.{which}_weight{m.group(3) or ''}")
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else Target(name)
    if name.startswith("model."):
        return Target(name[len("model."):])
    raise KeyError(name)


def engine_to_hf(param: str, expert: int | None = None, half: int | None = None) -> str:
    """Inverse of `hf_to_engine` (for error messages and weight export)."""
    m = re.fullmatch(r"(.*experts)\.(w13|w2)_weight(_scale_inv)?", param)
    if m:
        base, which, suffix = m.group(1), m.group(2), m.group(3) or ""
        if expert is None:
            return f"model.{base}.{'gate_up_proj' if which == 'w13' else 'down_proj'}{suffix}"
        proj = "down" if which == "w2" else ("gate" if half == 0 else "up")
        return f"model.{base}.{expert}.{proj}_proj.weight{suffix}"
    return param if param == "lm_head.weight" else f"model.{param}"


def module_of(param: str) -> str:
    """Engine module owning a parameter: `layers.1.mlp.experts.w13_weight` -> `layers.1.mlp.experts`."""
    base = param.removesuffix(SCALE_SUFFIX)
    for suffix in (".w13_weight", ".w2_weight", ".weight"):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return param.rsplit(".", 1)[0]
