"""Seeded random checkpoints in HF DeepseekV3 naming, for tests, demos and benchmarks.

Weights are drawn with std 1/sqrt(fan_in) (activations stay O(1) through depth), norm weights
near 1, a small random routing bias and a lm_head scaled for logits of std ~2, so greedy
generation is neither uniform nor stuck on one token. Each tensor has its own generator seeded
by (seed, name): shards can be produced in any order and large presets stream to disk.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..precision import Recipe
from ..precision.mxfp8 import BLOCK, quantize

from .config import ModelConfig
from .names import hf_to_engine, module_of
from .tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer

SHARD_BYTES = 4 << 30
INDEX_FILE = "model.safetensors.index.json"
# What --overwrite removes besides *.safetensors: files of an old checkpoint the new one may not rewrite.
CHECKPOINT_FILES = (INDEX_FILE, "config.json", BYTE_TOKENIZER_FILE, "tokenizer.json")
# What a trainer keeps high precision, in the sglang/miles MXFP8 checkpoint convention.
MXFP8_NOT_CONVERTED = ["lm_head", "model.embed_tokens", "kv_b_proj", "mlp.gate"]


def mxfp8_quantization_config(recipe: Recipe) -> dict:
    return {"quant_method": "mxfp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [1, BLOCK],
            "activation_scheme": "dynamic",
            "modules_to_not_convert": MXFP8_NOT_CONVERTED + [p for p in recipe.high_precision
                                                             if p not in MXFP8_NOT_CONVERTED]}


def tensor_specs(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(hf_name, shape, kind) for every tensor of the model, in HF naming."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    yield "model.embed_tokens.weight", (cfg.vocab_size, D), "embed"
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (D,), "norm"
        yield p + "post_attention_layernorm.weight", (D,), "norm"
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            yield a + "q_proj.weight", (H * cfg.qk_head_dim, D), "linear"
        else:
            yield a + "q_a_proj.weight", (cfg.q_lora_rank, D), "linear"
            yield a + "q_a_layernorm.weight", (cfg.q_lora_rank,), "norm"
            yield a + "q_b_proj.weight", (H * cfg.qk_head_dim, cfg.q_lora_rank), "linear"
        yield a + "kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D), "linear"
        yield a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm"
        yield a + "kv_b_proj.weight", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), "linear"
        yield a + "o_proj.weight", (D, H * cfg.v_head_dim), "linear"
        if not cfg.is_moe_layer(i):
            yield from _mlp(p + "mlp.", D, cfg.intermediate_size)
            continue
        F = cfg.moe_intermediate_size
        yield p + "mlp.gate.weight", (cfg.n_routed_experts, D), "linear"
        yield p + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias"
        for e in range(cfg.n_routed_experts):
            yield from _mlp(f"{p}mlp.experts.{e}.", D, F)
        if cfg.n_shared_experts:
            yield from _mlp(p + "mlp.shared_experts.", D, F * cfg.n_shared_experts)
    yield "model.norm.weight", (D,), "norm"
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, D), "lm_head"


def _mlp(prefix: str, dim: int, inter: int):
    yield prefix + "gate_proj.weight", (inter, dim), "linear"
    yield prefix + "up_proj.weight", (inter, dim), "linear"
    yield prefix + "down_proj.weight", (dim, inter), "linear"


def random_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "linear":
        x = x / shape[-1] ** 0.5
    elif kind == "lm_head":
        x = x * (2.0 / shape[-1] ** 0.5)
    elif kind == "norm":
        x = 1.0 + 0.1 * x
    elif kind == "bias":
        return 0.1 * x  # routing bias stays fp32, as trainers keep it
    return x.to(dtype)


def make_checkpoint(cfg_dict: dict, out: str | Path, seed: int = 0, dtype: str | None = None,
                    progress: bool = True, with_tokenizer: bool | None = None, mxfp8: bool = False,
                    recipe: Recipe | None = None, overwrite: bool = False) -> Path:
    """Write config.json + safetensors (sharded above SHARD_BYTES) with seeded random weights.
    mxfp8=True writes what an MXFP8 trainer exports: the recipe's weights as e4m3 `weight` +
    E8M0 `weight_scale_inv` (quantized from the same bf16 values, recipe's scale rule).
    A non-empty `out` is refused unless `overwrite`; then its checkpoint files are removed first, so
    that no shard of the old checkpoint stays beside the new ones."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = Path(out)
    cfg_dict = dict(cfg_dict)
    if dtype is not None:
        cfg_dict["torch_dtype"] = dtype
    cfg_dict.pop("quantization_config", None)
    cfg = ModelConfig.from_dict(cfg_dict)
    _prepare_dir(out, overwrite)
    tdtype = getattr(torch, cfg.torch_dtype)
    recipe = recipe or Recipe()
    specs = list(tensor_specs(cfg))
    shards: list[list[tuple]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _numel(spec[1]) * (4 if spec[2] == "bias" else tdtype.itemsize)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=len(specs), desc=f"writing {out.name}", unit="tensor", disable=not progress)
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        tensors = {}
        for name, shape, kind in shard:
            tensors[name] = random_tensor(name, shape, kind, seed, tdtype)
            target = hf_to_engine(name, cfg)
            if mxfp8 and kind == "linear" and target and recipe.wants_mxfp8(module_of(target.param)):
                tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name], BLOCK, recipe.scale_mode)
                weight_map[name + "_scale_inv"] = fname
            weight_map[name] = fname
            bar.update()
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    bar.close()
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if mxfp8:
        cfg_dict["quantization_config"] = mxfp8_quantization_config(recipe)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    if with_tokenizer if with_tokenizer is not None else cfg.vocab_size <= 4096:
        ByteTokenizer.for_config(cfg).save(out)
    return out


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to replace the "
                             "checkpoint in it")
        for f in [*out.glob("*.safetensors"), *(out / name for name in CHECKPOINT_FILES)]:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
