"""Streaming checkpoint loading.

`iter_checkpoint(path)` yields `(hf_name, tensor)` from one safetensors file or a sharded set with
`model.safetensors.index.json`; `load_weights(model, named_tensors)` writes them in place into the
engine's preallocated parameters. The same `(name, tensor)` interface feeds live weight updates.
Every problem (unknown, missing, duplicated, mis-shaped or mis-typed tensor) is collected and
reported in one `CheckpointError`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .deepseek import DeepseekV3
from .names import Target, engine_to_hf, hf_to_engine

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_LISTED = 25


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending tensor."""


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {path} (expected model.safetensors or {INDEX_FILE})")
    return files


def iter_checkpoint(path: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time; memory stays at one tensor beyond the model."""
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    files = checkpoint_files(path)
    for file in tqdm(files, desc="loading shards", unit="file", disable=not progress or len(files) < 2):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def expected_slots(param: str, tensor: torch.Tensor) -> set[tuple]:
    """Which (expert, half) slots fill a parameter completely."""
    if param.endswith("experts.w13_weight"):
        return {(e, h) for e in range(tensor.shape[0]) for h in (0, 1)}
    if param.endswith("experts.w2_weight"):
        return {(e, None) for e in range(tensor.shape[0])}
    return {(None, None)}


def destination(param: torch.Tensor, target: Target) -> torch.Tensor:
    """The view of `param` a tensor for `target` is written into."""
    view = param if target.expert is None else param[target.expert]
    if target.half is not None:
        rows = view.shape[0] // 2
        view = view[target.half * rows:(target.half + 1) * rows]
    return view


def load_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig) -> LoadReport:
    """Copy every tensor into its parameter, then raise one CheckpointError if anything did not fit."""
    params = dict(model.named_parameters())
    filled: dict[str, set] = {name: set() for name in params}
    problems: list[str] = []
    report = LoadReport()
    for name, tensor in named_tensors:
        try:
            target = hf_to_engine(name, cfg)
        except KeyError:
            problems.append(f"unexpected tensor {name!r} (not part of this {cfg.num_hidden_layers}-layer model)")
            continue
        if target is None:
            report.skipped.append(name)
            continue
        if target.param not in params:
            problems.append(f"unexpected tensor {name!r} (this model has no {target.param})")
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name!r} has dtype {tensor.dtype}; expected one of bf16/fp16/fp32")
            continue
        param = params[target.param]
        if target.expert is not None and not 0 <= target.expert < param.shape[0]:
            problems.append(f"unexpected tensor {name!r} (expert {target.expert}; the model has {param.shape[0]})")
            continue
        dest = destination(param, target)
        if tuple(tensor.shape) != tuple(dest.shape):
            problems.append(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {tuple(dest.shape)}")
            continue
        slots = {"all"} if target.expert is None and target.half is None else {target.slot}
        if filled[target.param] & slots or ("all" in filled[target.param]):
            problems.append(f"tensor {name!r} appears twice")
            continue
        with torch.no_grad():
            dest.copy_(tensor)
        filled[target.param] |= slots
        report.loaded += 1
    for pname, param in params.items():
        got = filled[pname]
        if "all" in got:
            continue
        need = expected_slots(pname, param)
        if need == {(None, None)}:
            problems.append(f"missing tensor {engine_to_hf(pname)!r}")
        else:
            for expert, half in sorted(need - got, key=lambda s: (s[0], s[1] or 0)):
                problems.append(f"missing tensor {engine_to_hf(pname, expert, half)!r}")
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(f"checkpoint does not match the model ({len(problems)} problems):\n  "
                              + "\n  ".join(shown) + more)
    if report.skipped:
        log.info("skipped %d tensors not used for generation (e.g. %s)", len(report.skipped), report.skipped[0])
    return report


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True) -> DeepseekV3:
    """Build DeepseekV3 from `path/config.json` directly on `device` and stream the weights into it."""
    cfg = ModelConfig.from_file(path)
    if cfg.quantization_config is not None:
        method = cfg.quantization_config.get("quant_method") if isinstance(cfg.quantization_config, dict) else None
        raise CheckpointError(f"{path}: quantized checkpoints (quant_method={method!r}) are not supported yet")
    with torch.device(device):
        model = DeepseekV3(cfg, dtype)
    load_weights(model, iter_checkpoint(path, progress), cfg)
    return model.eval()
