"""`mxroll rl` config: a dataclass turned into an omegaconf structured config (unknown keys are errors).

Defaults < configs/engine.yaml (as `engine`) < configs/rl/default.yaml < --config YAML < dotlist overrides.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf

from ... import configs
from ..config import EngineConfig, WandbConfig, _is_int, _structured, check_engine_config
from ..job import WANDB_MODES
from .task import check_task

SYNC_BACKENDS = (None, "gloo", "nccl")
CONTROL_DTYPES = ("bfloat16", "float32")


@dataclass
class TaskConfig:
    # One string of characters per prompt class: a prompt is prompt_len random characters of one set, and
    # a sample's reward is the fraction of its max_new_tokens output tokens that are characters of that set.
    charsets: list[str] = field(default_factory=lambda: [string.ascii_lowercase, string.ascii_uppercase])
    prompt_len: int = 4  # characters per prompt (after the bos token)


@dataclass
class RLConfig:
    # The rollout engine, run in its own process (keys as in configs/engine.yaml). It stores the trainer's
    # MXFP8 bytes (quantization must be mxfp8); dtype float32 matches the trainer's fp32 master weights.
    engine: EngineConfig = field(default_factory=EngineConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # the verifiable task (prompts and reward)
    steps: int = 50  # RL steps: rollouts -> rewards -> one optimizer step -> weight push
    prompts_per_step: int = 16  # fresh prompts each step
    n: int = 8  # samples per prompt (one GRPO group)
    max_new_tokens: int = 8  # tokens per sample (samples ignore eos and always run this long)
    temperature: float = 1.0  # sampling temperature; logprobs on both sides are log_softmax(logits / temperature)
    lr: float = 2.0e-3  # Adam learning rate
    clip_eps: float = 0.2  # PPO clip range of the token ratio exp(trainer logprob - rollout logprob)
    max_grad_norm: float | None = 1.0  # gradient norm clip (null = no clipping)
    seed: int = 0  # prompts, sampling seeds (step i samples with seed + 1000 * i) and torch's RNG
    device: str | None = None  # trainer device: cpu | cuda | cuda:N; null = cuda when present
    # gloo | nccl; null = nccl when the trainer and the engine are on different GPUs, else gloo (NCCL refuses
    # two ranks on one GPU, so a one-GPU machine syncs over gloo through host memory)
    sync_backend: str | None = None
    bucket_bytes: int = 262144  # weight-push bucket size in bytes (one broadcast per bucket)
    # bf16-rollout control: a second engine in the engine process holding the same weights in bf16 without
    # MXFP8 (no activation quantization), sampling control_prompts of each step's prompts; its logprobs are
    # compared against the same trainer forward. It never trains the model.
    control: bool = True
    control_prompts: int = 4  # prompts per step the control engine samples (n samples each)
    control_dtype: str = "bfloat16"  # the control engine's dtype (bfloat16 | float32)
    engine_start_timeout: float = 300.0  # seconds to wait for the engine process to serve
    output_dir: str = "runs/rl"  # metrics.jsonl, rl.png and W&B offline runs go here
    progress: bool = True  # progress bar over steps on a terminal
    wandb: WandbConfig = field(default_factory=WandbConfig)  # W&B logging (offline by default)


def rl_config(*sources: Any) -> RLConfig:
    """Defaults < configs/engine.yaml < configs/rl/default.yaml < each source (a YAML path, dict or dotlist)."""
    return _structured(RLConfig, {"engine": OmegaConf.load(configs.ROOT / "engine.yaml")},
                       configs.ROOT / "rl" / "default.yaml", *sources)


def check_rl_config(cfg: RLConfig) -> None:
    """Validate everything that needs no model; each error names its key."""
    check_engine_config(cfg.engine)
    if cfg.engine.quantization != "mxfp8":
        raise ValueError(f"engine.quantization={cfg.engine.quantization!r}: the RL loop's engine stores the "
                         "trainer's MXFP8 bytes; use mxfp8")
    for name, lo in (("steps", 1), ("prompts_per_step", 1), ("n", 2), ("max_new_tokens", 1), ("bucket_bytes", 1),
                     ("control_prompts", 1)):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < lo:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: must be an integer >= {lo}"
                             + (" (GRPO compares the samples of a prompt)" if name == "n" else ""))
    for name in ("temperature", "lr", "clip_eps", "engine_start_timeout"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}={v!r}: must be a number > 0")
    if cfg.max_grad_norm is not None and (isinstance(cfg.max_grad_norm, bool) or not cfg.max_grad_norm > 0):
        raise ValueError(f"max_grad_norm={cfg.max_grad_norm!r}: must be null or > 0")
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed!r}: must be an integer in [0, 2**32)")
    if cfg.control_prompts > cfg.prompts_per_step:
        raise ValueError(f"control_prompts={cfg.control_prompts}: at most prompts_per_step={cfg.prompts_per_step} "
                         "(the control samples the first prompts of each step)")
    check_engine_config(replace(cfg.engine, device=cfg.device))  # the trainer's device, by the engine's rules
    if cfg.sync_backend not in SYNC_BACKENDS:
        raise ValueError(f"sync_backend={cfg.sync_backend!r}; supported: {list(SYNC_BACKENDS)}")
    if cfg.control_dtype not in CONTROL_DTYPES:
        raise ValueError(f"control_dtype={cfg.control_dtype!r}; supported: {list(CONTROL_DTYPES)}")
    check_task(list(cfg.task.charsets), cfg.task.prompt_len)
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}; use one of {WANDB_MODES}")
