"""Engine and rollout-job configs: dataclasses turned into omegaconf structured configs.

Unknown keys and wrongly typed values are errors that name the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import configs


@dataclass
class EngineConfig:
    # A checkpoint directory, or "preset:NAME" for a seeded synthetic checkpoint of a built-in preset.
    model_path: str = "preset:tiny"
    device: str | None = None  # "cpu" | "cuda" | "cuda:N"; None = cuda when present
    dtype: str | None = None  # high-precision parts: "float32" | "bfloat16"; None = float32 on cpu, bfloat16 on cuda
    quantization: str | None = None  # None keeps the checkpoint's format; "mxfp8" quantizes by the recipe at load
    load_format: str = "auto"  # "dummy": seeded random weights made on the device (benchmarks; needs only config.json)
    act_mode: str = "w8a8"  # MXFP8 GEMMs: w8a8 quantizes activations along K (as the trainer does) | w8a16
    scale_mode: str = "rceil"  # E8M0 scale rule for quantizing: rceil | floor
    high_precision: list[str] = field(default_factory=lambda: ["kv_b_proj"])  # extra modules kept bf16
    gemm_backend: str | None = None  # MXFP8 GEMM backend: None = best for the device | torch | triton | flashinfer
    seed: int = 0  # engine RNG for requests without their own seed; also the synthetic preset's seed
    context_length: int | None = None  # None = the model's max_position_embeddings
    # batched engine (sglang names where sglang has one)
    page_size: int = 16  # tokens per KV-cache page
    mem_fraction_static: float = 0.85  # GPU: fraction of device memory for weights + KV cache
    max_total_tokens: int | None = None  # KV-cache capacity cap in tokens (sizes it on CPU; default 65536 there)
    max_running_requests: int = 1024  # sequences decoding at once (the n samples of a request count n)
    chunked_prefill_size: int = 8192  # token budget of one step: prefill is chunked to fit it
    attention_backend: str | None = None  # None = flashinfer on CUDA when importable, else torch | torch | flashinfer
    sampling_backend: str | None = None  # None = triton kernel on CUDA when importable, else torch | torch | triton
    disable_cuda_graph: bool = False  # decode runs eagerly (CUDA graphs are on by default on GPU)
    cuda_graph_max_bs: int = 512  # largest decode batch captured in a CUDA graph
    cache_dir: str | None = None  # where preset checkpoints are written; None = $MXROLL_CACHE or ~/.cache/mxroll
    progress: bool = True
    log_level: str = "INFO"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 4
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "mxroll"
    name: str | None = None


@dataclass
class RolloutJobConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompts: list[str] = field(default_factory=lambda: ["The quick brown fox"])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    steps: int = 2
    output_dir: str = "runs/rollout"
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _structured(schema: type, *sources: Any):
    try:
        cfg = OmegaConf.structured(schema)
        for src in sources:
            if src is None:
                continue
            if isinstance(src, (str, Path)):
                src = OmegaConf.load(src)
            elif isinstance(src, list):
                src = OmegaConf.from_dotlist(src)
            cfg = OmegaConf.merge(cfg, src)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid {schema.__name__}: {e}") from None


def engine_config(*sources: Any) -> EngineConfig:
    return _structured(EngineConfig, configs.ROOT / "engine.yaml", *sources)


def rollout_config(*sources: Any) -> RolloutJobConfig:
    """Defaults < configs/rollout/default.yaml < each source (a YAML path, dict or dotlist)."""
    return _structured(RolloutJobConfig, configs.ROOT / "rollout" / "default.yaml", *sources)
