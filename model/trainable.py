"""The trainer's DeepseekV3: trainable high-precision master weights whose forward is the engine's
MXFP8 numerics, and the MXFP8 state it pushes to the engine after each optimizer step.

The model is `DeepseekV3` built from the engine's own storage plan with `qat=True`: every module the
recipe stores MXFP8 holds a master weight that `precision.linear` / the grouped-expert seam
fake-quantize along K (and, in w8a8, the input activations), straight-through for the gradient.
Router, norms, embeddings, lm_head and kv_b_proj stay high precision, as in the engine. The recipe
alone decides which modules are MXFP8 (as `quantization="mxfp8"` does in the engine); a source
checkpoint's own format only matters for loading (MXFP8 tensors are dequantized exactly).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..precision import GemmConfig, Recipe
from ..precision.mxfp8 import has_nonfinite, quantize
from .config import ModelConfig
from .deepseek import DeepseekV3
from .loader import build_model, destination, expected_slots, iter_checkpoint, load_weights
from .names import SCALE_SUFFIX, Target, engine_to_hf, module_of
from .synthetic import mxfp8_quantization_config, random_tensor, tensor_specs
from .tokenizer import ByteTokenizer

# Updated by the aux-loss-free balancing rule, not by gradients (DeepSeek-V3 section 2.1.2).
FROZEN = ("e_score_correction_bias",)


def build_trainable_model(source: str | Path | ModelConfig | dict, dtype: torch.dtype = torch.float32,
                          recipe: Recipe = Recipe(), seed: int = 0, device: str | torch.device = "cpu",
                          progress: bool = False) -> DeepseekV3:
    """A checkpoint directory (bf16/fp32, or MXFP8 dequantized exactly into the masters), or a config
    (`ModelConfig` or config.json dict) with the seeded weights `synthetic.make_checkpoint(cfg, seed=seed)`
    would write. Every parameter but the routing bias is a trainable `dtype` master."""
    path = None
    if isinstance(source, (str, Path)):
        path, cfg = Path(source), ModelConfig.from_file(source)
    else:
        cfg = source if isinstance(source, ModelConfig) else ModelConfig.from_dict(source)
    gemm = GemmConfig(recipe.act_mode, recipe.scale_mode, "torch")  # the differentiable reference
    model = build_model(cfg, dtype, "mxfp8", recipe, gemm, qat=True).to_empty(device=device)
    if path is not None:
        tensors = iter_checkpoint(path, progress)
    else:
        tdtype = getattr(torch, cfg.torch_dtype)
        tensors = ((name, random_tensor(name, shape, kind, seed, tdtype)) for name, shape, kind in tensor_specs(cfg))
    load_weights(model, tensors, cfg, model.plan)
    # The engine's modules freeze their parameters; the trainer chooses what it trains.
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith(FROZEN))
    return model.train()


def export_mxfp8_state(model: DeepseekV3, hp_dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every weight, per expert in HF naming: each MXFP8 module's master as
    `X.weight` float8_e4m3fn + `X.weight_scale_inv` uint8 E8M0, quantized along K with the recipe's
    scale rule (the bytes its fake-quant forward used); the rest as `hp_dtype` copies (the routing
    bias stays fp32, as trainers keep it)."""
    plan = model.plan
    if plan is None or not plan.qat:
        raise ValueError("export_mxfp8_state takes a model from build_trainable_model")
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if plan.is_mxfp8(module_of(name)):
                data, scale = quantize(p.detach(), scale_mode=plan.recipe.scale_mode)
                if has_nonfinite(data, scale):
                    raise ValueError(f"{name}: the master weight holds NaN/inf; nothing exported")
                out += _pieces(name, data) + _pieces(name + SCALE_SUFFIX, scale)
            else:
                dtype = torch.float32 if name.endswith(FROZEN) else hp_dtype
                out += _pieces(name, p.detach().to(dtype, copy=True))
    return out


def _pieces(param: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split a stacked expert tensor into HF per-expert gate/up/down tensors (others pass whole)."""
    slots = sorted(expected_slots(param, t), key=lambda s: (s[0] or 0, s[1] or 0))
    return [(engine_to_hf(param, e, h), destination(t, Target(param, e, h)).contiguous()) for e, h in slots]


def save_mxfp8_checkpoint(model: DeepseekV3, out: str | Path, hp_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `export_mxfp8_state` as an MXFP8 checkpoint an `Engine` loads as-is (the recipe's
    quantization_config; a byte tokenizer for small vocabularies, as synthetic checkpoints have)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(export_mxfp8_state(model, hp_dtype)), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    qc = mxfp8_quantization_config(model.plan.recipe)
    if model.plan.quantized_inputs:  # the engine must quantize kv_b_proj's input as this model does
        qc["modules_to_not_convert"].remove("kv_b_proj")
    cfg = {**model.cfg.raw, "quantization_config": qc}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if model.cfg.vocab_size <= 4096:
        ByteTokenizer.for_config(model.cfg).save(out)
    return out
