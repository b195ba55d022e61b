"""Trainer side of live weight updates: recipe -> buckets -> broadcast -> the engine swaps them in.

    sender = WeightSender(engine_or_client, master_port=29600, backend="nccl")   # trainer is rank 0
    sender.connect()                           # the engine joins as rank 1 (in process or over HTTP)
    stats = sender.push(model.state_dict())    # after every optimizer step; HF names
    sender.close()

`engine` is anything with the engine's weight-sync methods: a `rollout.Engine` in this process or a
`sync.http_client.EngineClient` for a server. The recipe decides what travels MXFP8: a
high-precision tensor for a weight the recipe stores MXFP8 is quantized here (e4m3 + E8M0
`weight_scale_inv`, the recipe's scale rule), tensors already in MXFP8 pass through untouched,
everything else travels in its dtype. Tensors are packed back to back into buckets of `bucket_bytes`
(a weight and its scales never split); each bucket is one broadcast (load_format="flattened_bucket").
One engine call carries the whole update's metadata (`bucket_sizes`) and the engine applies it at once
after the last bucket; `one_call=False` makes one call per bucket instead (commit=False until the last).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.names import SCALE_SUFFIX, hf_to_engine, module_of
from ..precision.mxfp8 import quantize
from ..precision.recipe import Recipe
from .bucket import dtype_name, pack
from .group import UpdateGroup

log = logging.getLogger(__name__)
DEFAULT_BUCKET_BYTES = 512 << 20
DEFAULT_GROUP = "weight_update_group"


def mxfp8_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], recipe: Recipe | None, cfg: ModelConfig,
                        hp_dtype: torch.dtype | None = torch.bfloat16,
                        actions: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """The update as it travels: MXFP8-stored weights as e4m3 data + `_scale_inv` E8M0 bytes (quantized
    here when they are high precision), other tensors cast to `hp_dtype` (None keeps their dtype;
    the router's correction bias always stays fp32). recipe=None quantizes nothing. `actions`: a dict
    the per-name decisions are cached in across calls (a trainer sends the same names every step)."""
    items = list(named_tensors)
    actions = {} if actions is None else actions
    out, names = [], None
    for name, t in items:
        if t.requires_grad:
            t = t.detach()
        key = (name, t.dtype)
        action = actions.get(key)
        if action is None:
            action = actions[key] = _action(name, t, recipe, cfg, hp_dtype)
        if action == "skip":
            continue
        if action == "bytes":
            out.append((name, t if t.dtype == torch.uint8 else t.view(torch.uint8)))
        elif action == "quantize":
            if names is None:
                names = {n for n, _ in items}
            if name + SCALE_SUFFIX in names:
                raise ValueError(f"{name!r} is {t.dtype} but comes with a weight_scale_inv")
            data, scale = quantize(t, scale_mode=recipe.scale_mode)
            out += [(name, data), (name + SCALE_SUFFIX, scale)]
        elif action == "cast":
            out.append((name, t.to(hp_dtype)))
        else:
            out.append((name, t))
    return out


def _action(name: str, t: torch.Tensor, recipe: Recipe | None, cfg: ModelConfig, hp_dtype) -> str:
    target = hf_to_engine(name, cfg)
    if target is None:
        return "skip"
    if name.endswith(SCALE_SUFFIX):
        return "bytes"
    if t.dtype == torch.float8_e4m3fn:
        return "keep"
    if recipe is not None and t.is_floating_point() and recipe.wants_mxfp8(module_of(target.param)):
        return "quantize"
    if hp_dtype is not None and t.is_floating_point() and t.dtype != hp_dtype \
            and "e_score_correction_bias" not in name:
        return "cast"
    return "keep"


def buckets(named_tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of at most `bucket_bytes` (a larger tensor goes alone); a weight is never
    separated from the `_scale_inv` that follows it."""
    out: list[list] = []
    size = 0
    for i, (name, t) in enumerate(named_tensors):
        n = t.numel() * t.element_size()
        follows_its_weight = name.endswith(SCALE_SUFFIX) and i and named_tensors[i - 1][0] == name[:-len(SCALE_SUFFIX)]
        if out and (follows_its_weight or size + n <= bucket_bytes):
            out[-1].append((name, t))
            size += n
        else:
            out.append([(name, t)])
            size = n
    return out


class WeightSender:
    def __init__(self, engine, master_address: str = "127.0.0.1", master_port: int = 29600,
                 backend: str | None = None, group_name: str = DEFAULT_GROUP, world_size: int = 2,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, recipe: Recipe | None = None,
                 model_config: ModelConfig | None = None, device: str | torch.device | None = None,
                 timeout: float = 300.0, mxfp8: bool = True, hp_dtype: torch.dtype | None = torch.bfloat16,
                 one_call: bool = True):
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes!r}: must be a positive integer")
        self.engine, self.address, self.port = engine, master_address, int(master_port)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device(device or ("cuda" if self.backend == "nccl" else "cpu"))
        self.group_name, self.world_size, self.bucket_bytes = group_name, world_size, bucket_bytes
        self.recipe = recipe or Recipe()
        self.mxfp8 = mxfp8  # False: weights travel in their own dtype (an engine storing bf16)
        # High-precision tensors travel as hp_dtype (None: their own dtype, e.g. fp32 masters into an fp32
        # engine, which then holds exactly what the trainer's forward reads).
        self.hp_dtype = hp_dtype
        # True: one engine call per update carrying every bucket's metadata (bucket_sizes); False: one
        # call per bucket with commit=False until the last (sglang-style engines)
        self.one_call = one_call
        self.cfg = model_config
        self.timeout = timeout
        self.group: UpdateGroup | None = None
        self._buffers: list[torch.Tensor] | None = None  # two packing buffers, allocated once
        self._actions: dict = {}  # per-name recipe decisions, made on the first push
        self._orders: dict = {}  # per-name place in the engine (parameter, expert, half)
        self._plan: _Update | None = None  # the last update's plan, reused for the same tensors

    def connect(self) -> None:
        """Form the update group: this process is rank 0; the engine joins as rank 1 (its call runs in
        a thread because the rendezvous needs both sides)."""
        if self.group is not None:
            raise RuntimeError("WeightSender is already connected")
        joined = _Background(self.engine.init_weights_update_group, master_address=self.address,
                             master_port=self.port, rank_offset=1, world_size=self.world_size,
                             group_name=self.group_name, backend=self.backend)
        try:
            self.group = UpdateGroup(self.group_name, self.backend, self.address, self.port, 0, self.world_size,
                                     self.timeout)
        finally:
            joined.result()

    def prepare(self, weights: nn.Module | Mapping | Iterable) -> list[tuple[str, torch.Tensor]]:
        """HF-named (name, tensor) pairs on the broadcast device, MXFP8 by the recipe."""
        items = _items(weights)
        if self.cfg is None:
            raise ValueError("WeightSender needs model_config (the engine's ModelConfig) to apply the recipe")
        dev = self.device
        on_device = [(n, t if t.device == dev else t.to(dev)) for n, t in items]
        return mxfp8_named_tensors(on_device, self.recipe if self.mxfp8 else None,
                                   self.cfg, hp_dtype=self.hp_dtype, actions=self._actions)

    def plan(self, weights) -> _Update:
        """The update as it travels: prepared tensors in buckets (each bucket ordered by dtype, then by
        where its tensors land in the engine, so the engine's checks and copies see long runs of
        neighbours), the engine call's metadata, and each bucket's byte views. Reused while the trainer
        hands over the same tensors (same names, storage, dtypes, shapes): only their bytes changed."""
        items = _items(weights)
        fingerprint = tuple((n, t.data_ptr(), t.dtype, t.shape, t.device) for n, t in items)
        cached = self._plan
        if cached is not None and cached.fingerprint == fingerprint and cached.bucket_bytes == self.bucket_bytes:
            return cached
        prepared = self.prepare(items)
        parts = [sorted(part, key=lambda item: self._order(*item)) for part in buckets(prepared, self.bucket_bytes)]
        flat = [[t.reshape(-1).view(torch.uint8) for _, t in part] for part in parts]
        ordered = [item for part in parts for item in part]
        update = _Update(fingerprint if _passes_through(items, prepared) else None, self.bucket_bytes, parts, flat,
                         names=[n for n, _ in ordered], dtypes=[dtype_name(t.dtype) for _, t in ordered],
                         shapes=[list(t.shape) for _, t in ordered], bucket_sizes=[len(p) for p in parts],
                         nbytes=[sum(f.numel() for f in fl) for fl in flat])
        self._plan = update
        return update

    def _order(self, name: str, t: torch.Tensor) -> tuple:
        key = self._orders.get(name)
        if key is None:
            target = hf_to_engine(name, self.cfg)
            key = self._orders[name] = (target.param, -1 if target.expert is None else target.expert,
                                        -1 if target.half is None else target.half) if target else (name, -1, -1)
        # wider dtypes first: every tensor then starts aligned for its dtype inside the flat bucket
        return (-t.element_size(), str(t.dtype)) + key

    def push(self, weights, weight_version: str | None = None, flush_cache: bool = True) -> dict:
        """Send one update; returns timings and bytes. The engine applies it atomically after the last
        bucket (or rejects all of it, keeping its weights). Buckets are packed into two alternating
        buffers: packing bucket i+1 overlaps the broadcast of bucket i."""
        if self.group is None:
            raise RuntimeError("call connect() before push()")
        t0 = time.perf_counter()
        update = self.plan(weights)
        reused, update.uses = update.uses > 0, update.uses + 1
        t1 = time.perf_counter()
        need = max(update.nbytes)
        if self._buffers is None or self._buffers[0].numel() < need:
            self._buffers = None  # release the smaller ones first
            n_buffers = 2 if len(update.parts) > 1 else 1
            self._buffers = [torch.empty(need, dtype=torch.uint8, device=self.device) for _ in range(n_buffers)]
        meta = dict(group_name=self.group_name, flush_cache=flush_cache, weight_version=weight_version,
                    load_format="flattened_bucket")
        if self.one_call:  # the whole update in one engine call: no round trip per bucket
            call = _Background(self.engine.update_weights_from_distributed, names=update.names,
                               dtypes=update.dtypes, shapes=update.shapes, bucket_sizes=update.bucket_sizes, **meta)
            try:
                self._send_all(update)
            finally:
                call.result()
        else:  # one call per bucket (commit=False until the last), for engines without bucket_sizes
            start = 0
            for i, part in enumerate(update.parts):
                last = i == len(update.parts) - 1
                sl = slice(start, start + len(part))
                start += len(part)
                buf = pack(update.flat[i], self._buffers[0])
                call = _Background(self.engine.update_weights_from_distributed, names=update.names[sl],
                                   dtypes=update.dtypes[sl], shapes=update.shapes[sl], commit=last,
                                   **{**meta, "flush_cache": flush_cache and last,
                                      "weight_version": weight_version if last else None})
                try:
                    self.group.broadcast(buf)
                finally:
                    call.result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        return {"prepare_s": t1 - t0, "send_s": t2 - t1, "total_s": t2 - t0, "bytes": sum(update.nbytes),
                "tensors": len(update.names), "buckets": len(update.parts), "plan_reused": reused}

    def _send_all(self, update: _Update) -> None:
        works: list = []
        for i, views in enumerate(update.flat):
            buf = self._buffers[i % len(self._buffers)]
            if i >= len(self._buffers):
                works[i - len(self._buffers)].wait()  # a stream wait: that broadcast has read this buffer
            works.append(self.group.post(pack(views, buf)))
        self.group.wait(works)

    def close(self) -> None:
        if self.group is None:
            return
        remote = _Background(self.engine.destroy_weights_update_group, group_name=self.group_name)
        try:
            self.group.destroy()  # at the same time as the engine's side: neither waits on the other
        finally:
            self.group = None
            remote.result()


@dataclass
class _Update:
    fingerprint: tuple | None  # the trainer's tensors it was made from; None: never reused (tensors made here)
    bucket_bytes: int
    parts: list  # buckets of (name, tensor)
    flat: list  # per bucket, its tensors' bytes as flat uint8 views
    names: list
    dtypes: list
    shapes: list
    bucket_sizes: list
    nbytes: list  # per bucket
    uses: int = 0


def _items(weights) -> list[tuple[str, torch.Tensor]]:
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    return list(weights.items() if isinstance(weights, Mapping) else weights)


def _passes_through(items: list, prepared: list) -> bool:
    """Every prepared tensor is (a contiguous view of) one of the trainer's tensors: the plan's views
    then read the trainer's current bytes at every later push."""
    storages = {t.untyped_storage().data_ptr() for _, t in items}
    return all(t.is_contiguous() and t.untyped_storage().data_ptr() in storages for _, t in prepared)


class _Background:
    """Run an engine call in a thread while this one broadcasts; result() re-raises its error."""

    def __init__(self, fn, **kwargs):
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, kwargs):
        try:
            self._out.append((True, fn(**kwargs)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._out.append((False, e))

    def result(self):
        self._thread.join()
        ok, value = self._out[0]
        if not ok:
            raise value
        return value
