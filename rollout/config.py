"""Engine and rollout-job configs: dataclasses turned into omegaconf structured configs.

Unknown keys and wrongly typed values are errors that name the key.
"""
from __future__ import annotations

import difflib
import logging
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import configs
from ..precision.mxfp8 import SCALE_MODES
from ..precision.recipe import ACT_MODES

log = logging.getLogger(__name__)


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
    # MXFP8 GEMM backend: None = best for the device | torch | triton | flashinfer (triton also runs one-token bf16
    # GEMVs)
    gemm_backend: str | None = None
    # stored-MXFP8 dense weights also kept as an exact bf16 copy (refreshed after every weight update) that GEMMs of
    # more than 16 tokens read through cuBLAS: +2 bytes per dense weight element; None = on with the Triton backend
    mxfp8_dense_bf16_copy: bool | None = None
    # stored-MXFP8 experts also kept as exact bf16 copies (refreshed after every weight update) that fused-MoE calls of
    # >= 64 rows an expert run on (prefill chunks, large decode batches): +2 bytes per expert weight element (28.8 GB
    # on moonlight-16b-a3b); MXFP8 tiles below that
    mxfp8_moe_bf16_copy: bool = False
    seed: int = 0  # engine RNG for requests without their own seed; also the synthetic preset's seed
    context_length: int | None = None  # None = the model's max_position_embeddings
    skip_tokenizer_init: bool = False  # load no tokenizer: prompts come as input_ids, outputs carry no text
    tokenizer_path: str | None = None  # a directory holding the tokenizer (and chat template); None = the checkpoint's
    # batched engine (sglang names where sglang has one)
    page_size: int = 16  # tokens per KV-cache page
    mem_fraction_static: float = 0.85  # GPU: fraction of device memory for weights + KV cache
    max_total_tokens: int | None = None  # KV-cache capacity cap in tokens (sizes it on CPU; default 65536 there)
    max_running_requests: int = 1024  # sequences decoding at once (the n samples of a request count n)
    # token budget of one step: prefill is chunked to fit it; None = 8192 on CPU, on a GPU the largest of 32768 / 16384 /
    # ... whose estimated activations fit in half the memory mem_fraction_static leaves (logged at start-up); -1 = no
    # chunking (sglang's switch): the budget is the context length, so any prompt prefills in one step
    chunked_prefill_size: int | None = None
    # keep ended requests' full KV pages for later requests that start with the same tokens (multi-turn rollouts);
    # off by default: a cached prefix's KV was computed in other batches, so its bits may differ from a fresh prefill
    enable_prefix_caching: bool = False
    attention_backend: str | None = None  # None = flashinfer on CUDA when importable, else torch | torch | flashinfer
    # with flashinfer attention: None = Triton split-KV for decode batches of <= 4 rows | flashinfer | triton
    decode_attention_backend: str | None = None
    # model ops: None = Triton on CUDA (reference roundings) | torch; norm also "flashinfer" (rounds once: opt-in)
    norm_backend: str | None = None
    router_backend: str | None = None  # None = Triton router top-k on CUDA | torch
    rope_backend: str | None = None  # None = Triton MLA rope (q and k in one kernel, bit-exact) on CUDA | torch
    latent_backend: str | None = None  # MLA latent norm + cache write: None = one Triton kernel when norm is | torch
    act_backend: str | None = None  # MLP silu(gate) * up: None = one Triton kernel on CUDA (bit-exact) | torch
    # the Triton fused MoE also runs each layer's shared experts (as extra experts; a copy of their weights)
    disable_shared_experts_fusion: bool = False
    # MXFP8 experts: prefill chunks of >= 512 rows an expert dequantize the experts once into one bf16 workspace
    # shared by all layers (3 * E * F * D elements: 1.1 GiB on moonlight-16b-a3b) and run the bf16 tiles
    disable_moe_prefill_dequant: bool = False
    attention_fast_plan: bool = True  # captured decode graphs re-plan FlashInfer MLA without its plan() wrapper
    sampling_backend: str | None = None  # None = triton kernel on CUDA when importable, else torch | torch | triton
    disable_cuda_graph: bool = False  # decode runs eagerly (CUDA graphs are on by default on GPU)
    cuda_graph_max_bs: int = 1024  # largest decode batch captured in a CUDA graph (default: max_running_requests')
    # capture each decode graph the first time a step of its size runs, not all at start-up (a faster start; the
    # first rollouts pay the captures)
    cuda_graph_lazy_capture: bool = False
    weight_update_timeout: float = 300.0  # seconds a weight-update rendezvous or broadcast may wait (then an error)
    weight_update_check_finite: bool = True  # reject updates holding NaN/inf (one batched check per update)
    disable_overlap_schedule: bool = False  # launch step N + 1 before reading step N's tokens (decode) unless set
    step_timing: bool = False  # record per-phase step times (syncs the device between phases; for profiling)
    # streamed requests get a partial output every this many tokens of a sample (and always its last); each one
    # extends the last (text decoded incrementally, logprobs appended)
    stream_interval: int = 1
    # log a warning for each garbage collection longer than this many seconds, naming freeze_gc (0 = off; sglang's)
    gc_warning_threshold_secs: float = 0.0
    cache_dir: str | None = None  # where preset checkpoints are written; None = $MXROLL_CACHE or ~/.cache/mxroll
    progress: bool = True  # progress bars while writing or loading checkpoints
    log_level: str = "INFO"  # level of the mxroll loggers


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32  # tokens generated per sample at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    top_k: int = -1  # keep the k most likely tokens (-1 = off)
    min_p: float = 0.0  # drop tokens below min_p times the top probability (0 = off)
    n: int = 4  # samples per prompt (one group sharing the prompt's KV cache)
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    stop: list[str] = field(default_factory=list)  # stop strings: a sample ends once its text holds one
    seed: int | None = None  # seeded job: step i samples with seed + 1000 * i; null = the engine's RNG


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline (`wandb sync` uploads later) | disabled
    project: str = "mxroll"  # W&B project
    entity: str | None = None  # W&B team or user; null = your default entity
    name: str | None = None  # run name; null = W&B picks one
    group: str | None = None  # W&B run group
    tags: list[str] = field(default_factory=list)  # W&B run tags


@dataclass
class SyncConfig:
    # Checkpoints hot-swapped into the engine between steps (engine.update_weights_from_disk): entry i is
    # loaded before step i, null keeps the current weights; steps past the list's end keep the last ones.
    model_paths: list[str | None] = field(default_factory=list)


@dataclass
class RolloutJobConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # the engine (keys as in configs/engine.yaml)
    # inline prompts, used unless prompts_file or prompts_preset is set
    prompts: list[str] = field(default_factory=lambda: ["The quick brown fox"])
    # jsonl, one object per line: {"prompt": "..."} or {"input_ids": [...]}; other fields (e.g. "answer")
    # are kept and passed to the reward function
    prompts_file: str | None = None
    prompts_preset: str | None = None  # a built-in prompt set, configs/prompts/NAME.jsonl (arithmetic | basic)
    max_prompts: int | None = None  # use only the first N prompts; null = all
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # sampling params of every request
    steps: int = 2  # generate calls, each over every prompt
    return_routed_experts: bool = False  # store per-token routed expert ids and weights in rollouts.jsonl
    # "module.path:function" or "path/to/file.py:function": fn(prompt_record, output, **reward_args) -> float
    reward: str | None = None
    reward_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the reward function
    sync: SyncConfig = field(default_factory=SyncConfig)  # optional weight hot-swaps between steps
    output_dir: str = "runs/rollout"  # rollouts.jsonl and metrics.jsonl go here (replaced when the job completes)
    progress: bool = True  # progress bar on a terminal (false also silences the engine's loading bars)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # W&B logging


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # a non-loopback host needs an admin token
    port: int = 30000
    admin_token: str | None = None  # bearer token of the weight-sync and control endpoints; env MXROLL_ADMIN_TOKEN
    api_key: str | None = None  # bearer token of the generation and info endpoints; env MXROLL_API_KEY
    # /generate's return_routed_experts: "list" (nested JSON lists [tokens][moe layers][top_k]) or "base64"
    # (sglang's: little-endian int32 [tokens, num_hidden_layers, top_k], dense layers 0)
    routed_experts_format: str = "list"
    # sglang's --tool-call-parser: the tool-call format chat replies are parsed with (deepseekv3, deepseekv31,
    # kimi_k2); null leaves replies as text
    tool_call_parser: str | None = None
    # sglang's --reasoning-parser: chat replies' reasoning apart as reasoning_content (deepseek-r1, deepseek-v3,
    # kimi_k2); null leaves it in the content
    reasoning_parser: str | None = None


@dataclass
class ServeConfig:
    """`mxroll serve`: the HTTP server and the engine behind it."""
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def _structured(schema: type, *sources: Any):
    cfg = OmegaConf.structured(schema)
    for src in sources:
        if src is None:
            continue
        where = f"{src}: " if isinstance(src, (str, Path)) else ""
        try:
            if isinstance(src, (str, Path)):
                src = _load_yaml(Path(src))
            elif isinstance(src, list):
                src = OmegaConf.from_dotlist(src)
            _check_keys(schema, src, where)
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as e:
            raise ValueError(f"{where}invalid {schema.__name__}: {e}") from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"invalid {schema.__name__}: {e}") from None


# sglang options with no mxroll counterpart of that name, and what to use instead
SGLANG_INSTEAD = {"max_prefill_tokens": "chunked_prefill_size (mxroll's one token budget of a step)",
                  "gpu_memory_utilization": "mem_fraction_static", "enforce_eager": "disable_cuda_graph"}


def _check_keys(schema: type, src: Any, where: str) -> None:
    """A top-level key the schema lacks: a ValueError naming it, with the closest option names (or the mxroll option
    for a known sglang / vLLM one)."""
    if not isinstance(src, (dict, DictConfig)) or not is_dataclass(schema):
        return
    names = [f.name for f in fields(schema)]
    hints = typing.get_type_hints(schema)
    for key in src:
        if key in names:
            continue
        nested = [f"{n}.{key}" for n in names if is_dataclass(hints.get(n)) and key in {f.name for f in fields(hints[n])}]
        close = nested or difflib.get_close_matches(str(key), names, n=3)
        hint = (f"; use {SGLANG_INSTEAD[key]}" if key in SGLANG_INSTEAD
                else f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
        raise ValueError(f"{where}unknown {schema.__name__} option {key!r}{hint}")


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML mapping of config keys ({e})") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path}: the top level must be a mapping of config keys, got a {type(loaded).__name__}")
    return loaded


# sglang Engine / ServerArgs keywords that RL frameworks pass: renamed ones, and the single-GPU, single-process
# values of sglang's parallel layout (mxroll runs one engine per GPU; other values are errors naming them)
SGLANG_RENAMED = {"random_seed": "seed"}
SGLANG_SINGLE_GPU = {"tp_size": 1, "dp_size": 1, "pp_size": 1, "ep_size": 1, "nnodes": 1, "node_rank": 0}
# booleans with nothing to switch here: checkpoint code is never run (config.json and safetensors are read
# directly), and release / resume_memory_occupation always work
SGLANG_NO_EFFECT = ("trust_remote_code", "enable_memory_saver", "skip_server_warmup", "enable_weights_cpu_backup",
                    "enable_draft_weights_cpu_backup",  # (released weights always wait on the CPU; no draft model)
                    "enable_metrics")  # (`mxroll serve` always serves GET /metrics)
# a launched server's and its worker processes' plumbing: an Engine runs in the caller's process on one GPU and opens
# no sockets (`mxroll serve --host --port` serves HTTP), so any value is dropped
SGLANG_PROCESS = ("host", "port", "nccl_port", "dist_init_addr", "gpu_id_step")


def from_sglang_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine keyword arguments with sglang's names mapped to mxroll's (`random_seed` -> `seed`, `base_gpu_id` N ->
    `device` cuda:N, `disable_radix_cache` -> not `enable_prefix_caching`) and the neutral ones checked and dropped
    (the single-GPU layout, no-effect switches, server / process plumbing, kv_cache_dtype 'auto', schedule_policy
    'fcfs'); other keys pass through unchanged."""
    out = dict(kwargs)
    for old, new in SGLANG_RENAMED.items():
        if old in out and out[old] is None:  # sglang's "unset": mxroll's default stands
            del out[old]
        if old in out:
            if new in out and out[new] != out[old]:
                raise ValueError(f"{old}={out[old]!r} and {new}={out[new]!r}: give one ({old} is sglang's name for "
                                 f"{new})")
            out[new] = out.pop(old)
    if "disable_radix_cache" in out:  # sglang's switch for its prefix cache (on by default there, off here)
        off = out.pop("disable_radix_cache")
        if not isinstance(off, bool):
            raise ValueError(f"disable_radix_cache={off!r}: must be true or false")
        if out.setdefault("enable_prefix_caching", not off) == off:
            raise ValueError(f"disable_radix_cache={off} and enable_prefix_caching={not off} disagree: give one")
    for name, only in SGLANG_SINGLE_GPU.items():
        if name in out:
            value = out.pop(name)
            if value != only or isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: an mxroll engine runs on one GPU in one process ({name}={only}); "
                                 "start one engine per GPU")
    for name in SGLANG_NO_EFFECT:
        if name in out and not isinstance(out.pop(name), bool):
            raise ValueError(f"{name}={kwargs[name]!r}: must be true or false")
    for name in SGLANG_PROCESS:
        if name in out:
            log.debug("sglang's %s=%r has no effect on an in-process engine", name, out.pop(name))
    if "kv_cache_dtype" in out:
        kv = out.pop("kv_cache_dtype")
        if kv not in ("auto", None) and kv != out.get("dtype"):
            raise ValueError(f"kv_cache_dtype={kv!r}: the latent cache holds the model's dtype (kv_cache_dtype='auto'); "
                             "fp8 KV caches are not supported")
    if "schedule_policy" in out:
        policy = out.pop("schedule_policy")
        if policy != "fcfs":
            raise ValueError(f"schedule_policy={policy!r}: mxroll schedules first come, first served ('fcfs', sglang's "
                             "default)")
    if "base_gpu_id" in out:
        gpu = out.pop("base_gpu_id")
        if not _is_int(gpu) or gpu < 0:
            raise ValueError(f"base_gpu_id={gpu!r}: must be an integer >= 0")
        if gpu > 0:  # 0: the default device
            if out.get("device") not in (None, f"cuda:{gpu}"):
                raise ValueError(f"base_gpu_id={gpu} and device={out['device']!r} disagree: give one")
            out["device"] = f"cuda:{gpu}"
    return out


def engine_config(*sources: Any) -> EngineConfig:
    return _structured(EngineConfig, configs.ROOT / "engine.yaml", *sources)


def rollout_config(*sources: Any) -> RolloutJobConfig:
    """Defaults < configs/rollout/default.yaml < each source (a YAML path, dict or dotlist)."""
    return _structured(RolloutJobConfig, configs.ROOT / "rollout" / "default.yaml", *sources)


def serve_config(*sources: Any) -> ServeConfig:
    """Defaults < configs/engine.yaml (as `engine`) < each source (a YAML path, dict or dotlist)."""
    return _structured(ServeConfig, {"engine": OmegaConf.load(configs.ROOT / "engine.yaml")}, *sources)


ENGINE_DTYPES = (None, "float32", "bfloat16", "float64")  # float64: CPU reference (numerical checks)
QUANTIZATIONS = (None, "mxfp8")
GEMM_BACKENDS = (None, "torch", "triton", "flashinfer")


def check_engine_config(cfg: EngineConfig) -> None:
    """Validate the fields that need no model; each error names its field."""
    if cfg.device is not None:
        try:
            device = torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device={cfg.device!r}: not a torch device; use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={cfg.device!r}: supported device types are cpu and cuda")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={cfg.device!r} but no CUDA device is available")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    for name, allowed in (("dtype", ENGINE_DTYPES), ("quantization", QUANTIZATIONS), ("act_mode", ACT_MODES),
                          ("scale_mode", SCALE_MODES), ("gemm_backend", GEMM_BACKENDS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}; supported: {list(allowed)}")
    if cfg.context_length is not None and (not _is_int(cfg.context_length) or cfg.context_length < 1):
        raise ValueError(f"context_length={cfg.context_length!r}: must be null (the model's maximum) or an "
                         "integer >= 1")
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**64:
        raise ValueError(f"seed={cfg.seed!r}: must be an integer in [0, 2**64)")
    for name, lo in (("page_size", 1), ("max_running_requests", 1), ("cuda_graph_max_bs", 1), ("stream_interval", 1)):
        if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < lo:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: must be an integer >= {lo}")
    if cfg.chunked_prefill_size is not None and (not _is_int(cfg.chunked_prefill_size) or cfg.chunked_prefill_size < 1)\
            and cfg.chunked_prefill_size != -1:
        raise ValueError(f"chunked_prefill_size={cfg.chunked_prefill_size!r}: must be null (sized from the device's "
                         "memory), -1 (no chunking: sglang's switch) or an integer >= 1")
    if cfg.max_total_tokens is not None and (not _is_int(cfg.max_total_tokens) or cfg.max_total_tokens < cfg.page_size):
        raise ValueError(f"max_total_tokens={cfg.max_total_tokens!r}: must be null or an integer >= page_size")
    if isinstance(cfg.weight_update_timeout, bool) or not cfg.weight_update_timeout > 0:
        raise ValueError(f"weight_update_timeout={cfg.weight_update_timeout!r}: must be > 0 seconds")
    if isinstance(cfg.gc_warning_threshold_secs, bool) or not isinstance(cfg.gc_warning_threshold_secs, (int, float)) \
            or not cfg.gc_warning_threshold_secs >= 0:
        raise ValueError(f"gc_warning_threshold_secs={cfg.gc_warning_threshold_secs!r}: must be >= 0 seconds (0 = off)")
    if isinstance(cfg.mem_fraction_static, bool) or not 0 < cfg.mem_fraction_static <= 1:
        raise ValueError(f"mem_fraction_static={cfg.mem_fraction_static!r}: must be in (0, 1]")
    for name, allowed in (("attention_backend", (None, "torch", "flashinfer")),
                          ("decode_attention_backend", (None, "flashinfer", "triton")),
                          ("sampling_backend", (None, "torch", "triton")), ("load_format", ("auto", "dummy")),
                          ("norm_backend", (None, "torch", "triton", "flashinfer")),
                          ("router_backend", (None, "torch", "triton")),
                          ("rope_backend", (None, "torch", "triton")),
                          ("latent_backend", (None, "torch", "triton")),
                          ("act_backend", (None, "torch", "triton"))):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r}; supported: {list(allowed)}")
    levels = logging.getLevelNamesMapping()
    if not isinstance(cfg.log_level, str) or cfg.log_level.upper() not in levels:
        raise ValueError(f"log_level={cfg.log_level!r}; supported: {sorted(set(levels) - {'NOTSET'})}")


def resolve_context_length(requested: int | None, max_position_embeddings: int) -> int:
    """The engine's context length: the model's maximum unless a shorter one is requested."""
    if requested is None:
        return max_position_embeddings
    if not _is_int(requested) or requested < 1:
        raise ValueError(f"context_length={requested!r}: must be null (the model's maximum) or an integer >= 1")
    if requested > max_position_embeddings:
        raise ValueError(f"context_length={requested} exceeds the model's max_position_embeddings "
                         f"{max_position_embeddings}")
    return requested


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
