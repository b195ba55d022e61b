"""Streaming checkpoint loading.

`iter_checkpoint(path)` yields `(hf_name, tensor)` from one safetensors file or a sharded set with
`model.safetensors.index.json`; `load_weights(model, named_tensors, cfg, plan)` writes them in
place into the engine's preallocated parameters. The same `(name, tensor)` interface feeds live
weight updates. Per tensor, by the storage plan:
- MXFP8 parameter <- e4m3 data / E8M0 scale bytes: copied unchanged (no requantization);
- MXFP8 parameter <- high-precision tensor: quantized by the recipe (only with quantization="mxfp8");
- high-precision parameter <- e4m3 + its scale (e.g. kv_b_proj): dequantized exactly;
- high-precision parameter <- bf16/fp16/fp32: cast.
Every problem (unknown, missing, duplicated, mis-shaped, mis-typed or non-finite tensor) is
collected and reported in one `CheckpointError`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..precision import GemmConfig, Precision, Recipe, StoragePlan, storage_plan
from ..precision.mxfp8 import check_pair, dequantize, has_nonfinite, quantize

from .config import ModelConfig
from .deepseek import DeepseekV3
from .kernels import ModelKernels
from .layers import Linear
from .moe import Experts
from .names import SCALE_SUFFIX as SCALE
from .names import Target, engine_to_hf, hf_to_engine

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)
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
    if "experts.w13_weight" in param:
        return {(e, h) for e in range(tensor.shape[0]) for h in (0, 1)}
    if "experts.w2_weight" in param:
        return {(e, None) for e in range(tensor.shape[0])}
    return {(None, None)}


def destination(param: torch.Tensor, target: Target) -> torch.Tensor:
    """The view of `param` a tensor for `target` is written into."""
    view = param if target.expert is None else param[target.expert]
    if target.half is not None:
        rows = view.shape[0] // 2
        view = view[target.half * rows:(target.half + 1) * rows]
    return view


def _finite(tensor: torch.Tensor) -> bool:
    # min/max propagate NaN and need no tensor-sized temporary (embeddings are GBs)
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class _Loader:
    """One pass of `load_weights`: routes each tensor, pairs data with scales, tracks coverage.
    With `staged` (a list), nothing is written: each validated (destination view, tensor) pair is
    appended there for the caller to copy later (live weight updates: atomic, see sync.receiver);
    `partial` accepts a subset of the weights; `quantize_hp` quantizes high-precision tensors for
    MXFP8-stored parameters with the recipe (updates always may; loading only with quantization='mxfp8')."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, plan: StoragePlan | None,
                 staged: list | None = None, partial: bool = False, quantize_hp: bool = False,
                 check_finite: bool = True):
        self.cfg, self.plan, self.check_finite = cfg, plan, check_finite
        self.staged, self.partial, self.quantize_hp = staged, partial, quantize_hp
        self.quantized: list[str] = []
        self.params = dict(model.named_parameters())
        self.filled: dict[str, set] = {name: set() for name in self.params}
        self.pending: dict[tuple, dict[str, tuple[str, torch.Tensor]]] = {}
        self.problems: list[str] = []
        self.report = LoadReport()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        try:
            target = hf_to_engine(name, self.cfg)
        except KeyError:
            return self.problems.append(f"unexpected tensor {name!r} (not part of this "
                                        f"{self.cfg.num_hidden_layers}-layer model)")
        if target is None:
            return self.report.skipped.append(name)
        is_scale = target.param.endswith(SCALE)
        data_param = target.param[:-len(SCALE)] if is_scale else target.param
        if data_param not in self.params:
            return self.problems.append(f"unexpected tensor {name!r} (this model has no {target.param})")
        param = self.params[data_param]
        if target.expert is not None and not 0 <= target.expert < param.shape[0]:
            return self.problems.append(f"unexpected tensor {name!r} (expert {target.expert}; "
                                        f"the model has {param.shape[0]})")
        if is_scale and tensor.dtype not in SCALE_DTYPES:
            return self.problems.append(f"tensor {name!r} has dtype {tensor.dtype}; expected uint8 E8M0 scales")
        if not is_scale and tensor.dtype not in FLOAT_DTYPES + (torch.float8_e4m3fn,):
            return self.problems.append(f"tensor {name!r} has dtype {tensor.dtype}; expected bf16/fp16/fp32 "
                                        "or float8_e4m3fn")
        if param.dtype == torch.float8_e4m3fn:
            self._into_mxfp8(name, tensor, target, is_scale)
        elif tensor.dtype == torch.float8_e4m3fn or is_scale:
            self._pair_for_dequant(name, tensor, Target(data_param, target.expert, target.half), is_scale)
        elif self.check_finite and not _finite(tensor):
            self.problems.append(f"tensor {name!r} holds NaN/inf values")
        else:
            self._copy(name, tensor, target)

    def _into_mxfp8(self, name, tensor, target, is_scale):
        if is_scale or tensor.dtype == torch.float8_e4m3fn:
            if self.check_finite and has_nonfinite(None if is_scale else tensor, tensor if is_scale else None):
                return self.problems.append(f"tensor {name!r} holds NaN/inf MXFP8 blocks")
            return self._copy(name, tensor.view(torch.uint8) if is_scale else tensor, target)
        if not (self.quantize_hp or (self.plan and self.plan.quantize_at_load)):
            return self.problems.append(f"tensor {name!r} is {tensor.dtype} but this engine stores it MXFP8 "
                                        "(pass quantization='mxfp8' to quantize high-precision weights at load)")
        dev = self.params[target.param].device  # quantize where the weights live (GPU: seconds, not minutes)
        data, scale = quantize(tensor.to(dev), scale_mode=self.plan.recipe.scale_mode if self.plan else "rceil")
        self.quantized.append(name)
        if self.check_finite and has_nonfinite(data, scale):
            return self.problems.append(f"tensor {name!r} holds NaN/inf values")
        if self._copy(name, data, target):
            self._copy(name + SCALE, scale, Target(target.param + SCALE, target.expert, target.half))

    def _pair_for_dequant(self, name, tensor, data_target: Target, is_scale: bool):
        key = (data_target.param, data_target.slot)
        entry = self.pending.setdefault(key, {})
        kind = "scale" if is_scale else "data"
        if kind in entry:
            return self.problems.append(f"tensor {name!r} appears twice")
        entry[kind] = (name, tensor)
        if len(entry) == 2:
            del self.pending[key]
            (dname, data), (_, scale) = entry["data"], entry["scale"]
            scale = scale.view(torch.uint8)
            try:
                check_pair(data, scale)
            except (TypeError, ValueError) as e:
                return self.problems.append(f"tensor {dname!r} with its weight_scale_inv: {e}")
            if self.check_finite and has_nonfinite(data, scale):
                return self.problems.append(f"tensor {dname!r} holds NaN/inf MXFP8 blocks")
            dev = self.params[data_target.param].device
            hp = dequantize(data.to(dev), scale.to(dev), self.params[data_target.param].dtype)
            self._copy(dname, hp, data_target)

    def _copy(self, name, tensor, target: Target) -> bool:
        dest = destination(self.params[target.param], target)
        if tuple(tensor.shape) != tuple(dest.shape):
            self.problems.append(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected {tuple(dest.shape)}")
            return False
        slots = {"all"} if target.slot == (None, None) else {target.slot}
        got = self.filled[target.param]
        if got & slots or "all" in got:
            self.problems.append(f"tensor {name!r} appears twice")
            return False
        if self.staged is not None:
            self.staged.append((dest, tensor))
        else:
            with torch.no_grad():
                dest.copy_(tensor)
        got |= slots
        self.report.loaded += 1
        return True

    def finish(self, error: type[Exception] = CheckpointError, what: str = "checkpoint does not match the model"
               ) -> LoadReport:
        for (param, slot), entry in self.pending.items():
            have = next(iter(entry.values()))[0]
            missing = "weight_scale_inv" if "data" in entry else "float8_e4m3fn weight"
            self.problems.append(f"tensor {have!r} came without its {missing}")
        self._check_scales_paired()
        for pname, param in self.params.items():
            got = self.filled[pname]
            if self.partial:
                break
            if "all" in got:
                continue
            for expert, half in sorted(expected_slots(pname, param) - got, key=lambda s: (s[0] or 0, s[1] or 0)):
                self.problems.append(f"missing tensor {engine_to_hf(pname, expert, half)!r}")
        if self.problems:
            shown = self.problems[:MAX_LISTED]
            more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
            raise error(f"{what} ({len(self.problems)} problems):\n  " + "\n  ".join(shown) + more)
        if self.report.skipped:
            log.info("skipped %d tensors not used for generation (e.g. %s)", len(self.report.skipped),
                     self.report.skipped[0])
        return self.report

    def _check_scales_paired(self) -> None:
        """An MXFP8 weight and its E8M0 scales must arrive together: a partial update may not change one
        without the other (loading checks this through coverage)."""
        if not self.partial:
            return
        for pname, got in self.filled.items():
            if pname.endswith(SCALE) or pname + SCALE not in self.filled:
                continue
            differ = got ^ self.filled[pname + SCALE]
            if differ:
                slot = (None, None) if "all" in differ else sorted(differ, key=str)[0]
                odd = engine_to_hf(pname, *slot)
                self.problems.append(f"MXFP8 weight and weight_scale_inv must be updated together ({odd!r})")


def load_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig,
                 plan: StoragePlan | None = None) -> LoadReport:
    """Copy every tensor into its parameter, then raise one CheckpointError if anything did not fit."""
    loader = _Loader(model, cfg, plan)
    for name, tensor in named_tensors:
        loader.add(name, tensor)
    return loader.finish()


def build_model(cfg: ModelConfig, dtype: torch.dtype, quantization: str | None, recipe: Recipe,
                gemm: GemmConfig, qat: bool = False, kernels: ModelKernels = ModelKernels()) -> DeepseekV3:
    """DeepseekV3 on the meta device, each module constructed with its storage decided by the plan
    (recipe + the checkpoint's own format + `quantization`). `qat`: the trainer's model of the same
    plan, MXFP8 modules holding `dtype` master weights that the forward fake-quantizes."""
    with torch.device("meta"):
        probe = DeepseekV3(cfg, dtype)
        k_dims = {name: m.k_dims for name, m in probe.named_modules() if isinstance(m, (Linear, Experts))}
        plan = replace(storage_plan(k_dims, cfg.quantization_config, quantization, recipe), qat=qat)
        return DeepseekV3(cfg, dtype, Precision(plan, gemm), kernels)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True, quantization: str | None = None, recipe: Recipe | None = None,
               gemm: GemmConfig | None = None, load_format: str = "auto", seed: int = 0,
               kernels: ModelKernels = ModelKernels()) -> DeepseekV3:
    """Build DeepseekV3 from `path/config.json` with the storage plan, allocate it once on `device`,
    and stream the weights into it (load_format="dummy": seeded random weights made on the device)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format={load_format!r}; supported: auto, dummy")
    cfg = ModelConfig.from_file(path)
    recipe = recipe or Recipe()
    gemm = gemm or GemmConfig(recipe.act_mode, recipe.scale_mode, "torch")
    model = build_model(cfg, dtype, quantization, recipe, gemm, kernels=kernels).to_empty(device=device)
    if load_format == "dummy":
        from .dummy import init_dummy_weights
        init_dummy_weights(model, seed)
    else:
        load_weights(model, iter_checkpoint(path, progress), cfg, model.plan)
    n8 = len(model.plan.mxfp8_modules)
    log.info("loaded %s: %d modules MXFP8 (%s, %s scales%s), the rest %s", path, n8, recipe.act_mode,
             recipe.scale_mode, ", quantized at load" if model.plan.quantize_at_load and n8 else "",
             str(dtype).removeprefix("torch."))
    return model.eval()
