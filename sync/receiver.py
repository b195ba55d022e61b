"""Engine side of live weight updates: receive -> validate -> stage -> commit.

1. Receive (the caller's thread, while generation goes on): per-tensor broadcasts in `names` order
   (sglang's protocol) or one flattened bucket, into staging buffers allocated once per
   (tensor, dtype, shape) and reused by every later update; or tensors handed over in process, or a
   checkpoint on disk.
2. Validate the whole update with the loader's rules (`model.loader._Loader` in staging mode):
   names (HF per-expert or fused naming), dtypes, shapes, NaN/inf, MXFP8 data with its scales.
   MXFP8 bytes are kept as they are; a high-precision tensor for an MXFP8-stored weight is quantized
   once with the recipe's scale rule (logged once); e4m3 + scale for a high-precision weight is
   dequantized exactly. Any problem rejects the whole update: nothing has been written.
3. Commit (the engine loop, between two steps): in-place copies into the live parameters (addresses
   unchanged, so CUDA graphs stay valid), kernel layouts re-derived with the cached indices.
"""
from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import ModelConfig
from ..model.loader import CheckpointError, _Loader, destination, iter_checkpoint
from ..model.names import Target, hf_to_engine
from .bucket import nbytes, parse_dtype, unpack
from .group import GroupError, UpdateGroup
from .runs import merge_pairs
from .validate import FiniteCheck

log = logging.getLogger(__name__)
LOAD_FORMATS = (None, "auto", "flattened_bucket")
MAX_NAMED = 10
ALIGN = 256  # bytes: per-tensor staging slices start aligned for any dtype and vectorized copies
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "num_attention_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok", "q_lora_rank",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
               "tie_word_embeddings")


class WeightUpdateError(ValueError):
    """A weight update was rejected; the engine keeps serving the previous weights and version."""


class WeightReceiver:
    def __init__(self, model, layouts, device: torch.device, timeout: float = 300.0, check_finite: bool = True):
        self.model, self.cfg, self.layouts, self.device = model, model.cfg, layouts, device
        self.timeout = timeout
        self.groups: dict[str, UpdateGroup] = {}
        self.staging: dict[str, torch.Tensor] = {}  # "device/slot" -> arena
        self.pending: dict[str, list] = {}  # group -> calls received with commit=False: their (name, tensor) lists
        self.staging_allocations = 0  # buffers ever allocated (stays flat after the first update)
        self.lock = threading.Lock()  # one update at a time: updates share the staging arena
        self._quantize_logged = False
        self.check_finite = check_finite
        self._plans: dict[tuple, _Plan] = {}
        self._layouts: dict[tuple, _Layout] = {}  # (device, slot) -> the last call's parsed metadata

    # ---- process groups --------------------------------------------------------------------
    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> None:
        if group_name in self.groups:
            raise WeightUpdateError(f"update group {group_name!r} exists; destroy_weights_update_group first")
        if not isinstance(rank_offset, int) or not isinstance(world_size, int) or world_size < 2:
            raise WeightUpdateError(f"rank_offset={rank_offset!r} / world_size={world_size!r}: the trainer is rank 0 "
                                    "and the engine ranks follow it, so world_size >= 2")
        try:
            self.groups[group_name] = UpdateGroup(group_name, backend, master_address, master_port, rank_offset,
                                                  world_size, self.timeout)
        except (GroupError, ValueError) as e:
            raise WeightUpdateError(str(e)) from e

    def destroy_group(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        self.pending.pop(group_name, None)
        if group is None:
            raise WeightUpdateError(f"no update group {group_name!r} (known: {sorted(self.groups)})")
        group.destroy()

    def close(self) -> None:
        """Destroy the update groups and drop the model, staging buffers and plans (the engine shut down)."""
        for name in list(self.groups):
            try:
                self.destroy_group(name)
            except Exception as e:  # noqa: BLE001 - shutting down: report, free the rest
                log.warning("update group %r: destroy failed on shutdown: %r", name, e)
        self.model = self.layouts = None
        self.staging.clear()
        self.pending.clear()
        self._plans.clear()
        self._layouts.clear()

    # ---- receiving -------------------------------------------------------------------------
    def _arena(self, nbytes_: int, device, slot: int = 0) -> torch.Tensor:
        """Uint8 staging buffers, one per (device, call slot of a multi-call update), each grown to the
        largest call seen and reused after that: later updates of the same shape allocate nothing."""
        key = f"{device}/{slot}"
        buf = self.staging.get(key)
        if buf is None or buf.numel() < nbytes_:
            if self.staging.pop(key, None) is not None and torch.device(device).type == "cuda":
                torch.cuda.empty_cache()  # hand the smaller one back before taking the larger (no fragments)
            buf = self.staging[key] = torch.empty(nbytes_, dtype=torch.uint8, device=device)
            self.staging_allocations += 1
        return buf[:nbytes_]

    def receive(self, calls: list[tuple[list, list, list]], group_name: str, load_format: str | None,
                slot: int = 0) -> list[Received]:
        """Post the broadcasts of one engine call (one or more buckets of (names, dtypes, shapes)) into
        one staging arena (slot: the call's place in a multi-call update); `finish()` waits for them.
        Returns per bucket the tensors' key (metadata + staging address) and views."""
        group = self.groups.get(group_name)
        if group is None:
            raise WeightUpdateError(f"no update group {group_name!r}; call init_weights_update_group first")
        if load_format not in LOAD_FORMATS:
            raise WeightUpdateError(f"load_format={load_format!r}; supported: {LOAD_FORMATS}")
        device = self.device if group.backend == "nccl" else torch.device("cpu")
        layouts, starts, total = [], [], 0
        for i, (names, dtypes, shapes) in enumerate(calls):
            if not (len(names) == len(dtypes) == len(shapes)) or not names:
                raise WeightUpdateError(f"names/dtypes/shapes must be non-empty lists of one length, got "
                                        f"{len(names)}/{len(dtypes)}/{len(shapes)}")
            layouts.append(self._layout(names, dtypes, shapes, load_format, device, (slot, i)))
            starts.append(total)
            total += _aligned(layouts[-1].nbytes)
        whole = self._arena(total, device, slot)
        out = []
        try:
            for (names, _, _), layout, start in zip(calls, layouts, starts):
                arena = whole[start:start + layout.nbytes]
                if layout.offsets is None:  # one flattened bucket
                    out.append(Received(layout.key + (arena.data_ptr(),), _unpacked(names, arena, layout),
                                        [group.post(arena)]))
                else:  # per-tensor broadcasts into aligned slices of the arena
                    views = [arena[off:off + nbytes(d, s)].view(d).view(s)
                             for d, s, off in zip(layout.dtypes, layout.shapes, layout.offsets)]
                    out.append(Received(layout.key + (arena.data_ptr(),), lambda n=names, v=views: list(zip(n, v)),
                                        [group.post(v) for v in views]))
        except GroupError as e:
            raise self._broken(group_name, group, e) from e
        return out

    def finish(self, group_name: str, received: list[Received]) -> None:
        """Wait (on the host, at most the timeout in all) for every broadcast posted by `received`."""
        group = self.groups.get(group_name)
        if group is None:
            raise WeightUpdateError(f"update group {group_name!r} was closed during the update")
        try:
            group.wait([w for r in received for w in r.works])
        except GroupError as e:
            raise self._broken(group_name, group, e) from e

    def _broken(self, group_name: str, group: UpdateGroup, e: Exception) -> WeightUpdateError:
        self.groups.pop(group_name, None)
        group.destroy()
        return WeightUpdateError(f"{e}; the update group {group_name!r} was closed (init it again)")

    def _layout(self, names, dtypes, shapes, load_format, device, slot) -> _Layout:
        """Parsed metadata of one call, reused when the same call (same names, dtypes, shapes) comes again:
        a trainer sends the same metadata every step."""
        cached = self._layouts.get((str(device), slot))  # slot: (call slot, bucket index)
        if cached is not None and cached.load_format == load_format and cached.names == names \
                and cached.raw_dtypes == dtypes and cached.raw_shapes == shapes:
            return cached
        try:  # unreadable metadata cannot be drained: the trainer's broadcast then times out on its side
            dts = [parse_dtype(d) for d in dtypes]
            shapes_ = [tuple(int(x) for x in shape) for shape in shapes]
        except (ValueError, TypeError) as e:
            raise WeightUpdateError(f"update metadata: {e}") from e
        sizes = [nbytes(d, s) for d, s in zip(dts, shapes_)]
        offsets = None
        if load_format == "flattened_bucket":
            total = sum(sizes)
        else:
            offsets, total = [], 0
            for n in sizes:
                offsets.append(total)
                total += _aligned(n)
        layout = _Layout(list(names), list(dtypes), list(shapes), load_format, dts, shapes_, offsets,
                         total, (tuple(names), tuple(dts), tuple(shapes_), load_format == "flattened_bucket"))
        self._layouts[(str(device), slot)] = layout
        return layout

    # ---- validate, stage, commit ----------------------------------------------------------
    def stage(self, named_tensors, full: bool = False, key: tuple | None = None) -> list:
        """Validate an update; returns (live destination view, source tensor) pairs. Raises
        WeightUpdateError naming every problem. `full`: every weight must be present (a checkpoint).
        `named_tensors`: (name, tensor) pairs or a function returning them. `key` (the update's metadata
        and staging addresses): an update with the key of the previous one reuses its routing and views
        (name mapping, shape and dtype checks depend on metadata only); only the NaN/inf check runs again."""
        plan = self._plans.get(key) if key is not None else None
        if plan is not None:  # same metadata into the same staging buffers: routing and views are reusable
            self._reject_nonfinite(plan.finite)
            return plan.staged
        items = list(named_tensors() if callable(named_tensors) else named_tensors)
        for name, tensor in items:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise WeightUpdateError(f"an update is (name, tensor) pairs; got ({type(name).__name__}, "
                                        f"{type(tensor).__name__})")
        finite = FiniteCheck(items) if self.check_finite else None
        self._reject_nonfinite(finite)
        staged: list = []
        loader = _Loader(self.model, self.cfg, self.model.plan, staged=staged, partial=not full, quantize_hp=True,
                         check_finite=False)
        for name, tensor in items:
            loader.add(name, tensor)
        loader.finish(error=WeightUpdateError, what="weight update rejected; the engine keeps its weights")
        if not staged:
            raise WeightUpdateError("weight update rejected: it holds no tensor of this model")
        if loader.quantized and not self._quantize_logged:
            self._quantize_logged = True
            log.info("weight update: %d high-precision tensors for MXFP8-stored weights were quantized with the "
                     "recipe's %s rule (e.g. %s); send e4m3 + weight_scale_inv to keep the trainer's bytes",
                     len(loader.quantized), self.model.plan.recipe.scale_mode, loader.quantized[0])
        if key is not None and _reads_only(staged, items):
            self._plans = {key: _Plan(staged, finite)}  # the latest update shape only: it holds live-weight views
        return staged

    @staticmethod
    def _reject_nonfinite(finite: FiniteCheck | None) -> None:
        bad = finite.run() if finite is not None else []
        if bad:
            raise WeightUpdateError(f"weight update rejected; the engine keeps its weights: {len(bad)} tensors hold "
                                    f"NaN/inf values: {bad[:MAX_NAMED]}")

    @torch.no_grad()
    def commit(self, staged: list) -> None:
        """In-place copies into the live parameters, then kernel layouts. Pairs that are neighbours on both
        sides (a bucket's experts landing in a stacked expert parameter) merge into one copy; the merged
        list of a reused plan is kept. The copies go as multi-tensor copies per dtype."""
        plan = next((p for p in self._plans.values() if p.staged is staged), None)
        copies = plan.copies if plan is not None else None
        if copies is None:
            copies = merge_pairs(staged)
            if plan is not None:
                plan.copies = copies
        groups: dict[tuple, tuple[list, list]] = {}
        for dest, src in copies:
            if src.dtype != dest.dtype:
                src = src.to(dest.dtype)
            # one dtype and device pair per list: foreach's multi-tensor kernels (a launch per ~100
            # tensors) only take uniform lists; a mixed list falls back to a copy kernel per tensor
            dests, srcs = groups.setdefault((dest.device, src.device, dest.dtype), ([], []))
            dests.append(dest)
            srcs.append(src)
        for dests, srcs in groups.values():
            torch._foreach_copy_(dests, srcs)
        self.model.postprocess(self.layouts)

    # ---- other sources ---------------------------------------------------------------------
    def from_tensors(self, named_tensors) -> list:
        return self.stage(deserialize_named_tensors(named_tensors))

    def from_disk(self, model_path: str | Path) -> list:
        try:
            other = ModelConfig.from_file(model_path)
        except ValueError as e:
            raise WeightUpdateError(f"update_weights_from_disk: {e}") from e
        diff = [f for f in ARCH_FIELDS if getattr(other, f) != getattr(self.cfg, f)]
        if diff:
            raise WeightUpdateError("update_weights_from_disk: the checkpoint's architecture differs in "
                                    + ", ".join(f"{f} ({getattr(other, f)} != {getattr(self.cfg, f)})" for f in diff))
        try:
            return self.stage(iter_checkpoint(model_path, progress=False), full=True)
        except CheckpointError as e:
            raise WeightUpdateError(f"update_weights_from_disk: {e}") from e

    def get(self, name: str, truncate_size: int = 100) -> list:
        """A stored weight as sglang returns it: a list, its first `truncate_size` rows."""
        try:
            target = hf_to_engine(name, self.cfg)
        except KeyError:
            target = None
        params = dict(self.model.named_parameters())
        if target is None or target.param not in params:
            raise WeightUpdateError(f"no weight {name!r} in this model")
        t = destination(params[target.param], Target(target.param, target.expert, target.half))
        return t[:truncate_size].float().tolist() if t.dtype == torch.float8_e4m3fn else t[:truncate_size].tolist()


@dataclass
class Received:
    """One call's tensors in staging: `key` = its metadata and staging address, `named()` the views,
    `works` its posted broadcasts (wait for them before reading)."""

    key: tuple
    named: Callable[[], list]
    works: list = field(default_factory=list)


@dataclass
class _Layout:
    """One call's parsed metadata and where its tensors sit in the staging arena."""

    names: list
    raw_dtypes: list
    raw_shapes: list
    load_format: str | None
    dtypes: list
    shapes: list
    offsets: list | None  # per-tensor protocol: aligned byte offsets; None: one flattened bucket
    nbytes: int
    key: tuple


@dataclass
class _Plan:
    staged: list  # (live destination view, staging view) pairs
    finite: FiniteCheck | None
    copies: list | None = None  # `staged` with neighbouring pairs merged (made at the first commit)


def _aligned(nbytes_: int) -> int:
    return -(-nbytes_ // ALIGN) * ALIGN


def _unpacked(names: list, arena: torch.Tensor, layout: _Layout) -> Callable[[], list]:
    return lambda: list(zip(names, unpack(arena, layout.dtypes, layout.shapes)))


def _reads_only(staged: list, items: list) -> bool:
    """Every staged source is an item's own bytes (no quantization, dequantization or cast happened),
    so the same pairs stay valid for the next update received into the same buffers."""
    where = {(t.data_ptr(), t.numel() * t.element_size()) for _, t in items}
    return all((src.data_ptr(), src.numel() * src.element_size()) in where for _, src in staged)


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """For a colocated trainer: (name, tensor) pairs pickled with torch's multiprocessing reductions
    (CUDA tensors travel as IPC handles, CPU tensors through shared memory), as base64 text."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(n, t if t.is_cuda else t.share_memory_()) for n, t in named_tensors])
    return base64.b64encode(buf.getvalue()).decode()


def deserialize_named_tensors(payload) -> list[tuple[str, torch.Tensor]]:
    if isinstance(payload, (str, bytes)):
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401
        try:
            raw = base64.b64decode(payload) if isinstance(payload, str) else payload
            payload = ForkingPickler.loads(raw)
        except Exception as e:  # noqa: BLE001 - anything unreadable is the caller's error
            raise WeightUpdateError(f"named_tensors: not a serialized tensor list ({e})") from e
    if isinstance(payload, dict):
        payload = list(payload.items())
    if not isinstance(payload, (list, tuple)):
        raise WeightUpdateError(f"named_tensors must be (name, tensor) pairs, got {type(payload).__name__}")
    return list(payload)
