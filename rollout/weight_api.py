"""The engine's weight-update methods (sglang names): receive in the caller's thread, commit between steps.

Each update: (1) the caller's thread receives the tensors into the receiver's staging arena while the
engine keeps generating, (2) the whole update is validated (names, dtypes, shapes, NaN/inf, MXFP8 data
with its scales) — a rejected update raises `WeightUpdateError` and changes nothing, (3) the engine
loop copies the staged tensors into the live parameters in place between two steps (no forward pass
sees a mix; CUDA graphs keep their addresses), re-derives kernel layouts from the cached indices and
moves `weight_version`. Requests in flight continue on the new weights unless the caller paused them
(`pause_generation(mode=...)`); their meta_info says at which output token the version changed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..sync.receiver import WeightReceiver, WeightUpdateError

log = logging.getLogger("mxroll.rollout.engine")
DEFAULT_GROUP = "weight_update_group"


class WeightUpdateAPI:
    """Mixed into `Engine`; expects `_command`, `_check_open`, `model`, `layouts`, `device`, `config`."""

    receiver: WeightReceiver
    weight_version: str

    def _init_weight_updates(self) -> None:
        self.receiver = WeightReceiver(self.model, self.layouts, self.device, self.config.weight_update_timeout,
                                       self.config.weight_update_check_finite)
        self._memory_epoch = 0  # bumped by memory release/resume: staged destinations must be re-derived
        self.last_update: dict = {}

    # ---- process group -----------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = DEFAULT_GROUP, backend: str = "nccl") -> tuple[bool, str]:
        """Join the trainer's update group as rank `rank_offset` (the trainer is rank 0). Blocks until
        every rank has joined (or the timeout). backend: "nccl" (GPU) or "gloo" (CPU)."""
        self._check_open()
        self.receiver.init_group(master_address, master_port, rank_offset, world_size, group_name, backend)
        return True, f"joined weight update group {group_name!r} as rank {rank_offset} of {world_size} ({backend})"

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP) -> tuple[bool, str]:
        self.receiver.destroy_group(group_name)
        return True, f"destroyed weight update group {group_name!r}"

    # ---- updates -----------------------------------------------------------------------------
    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list,
                                        group_name: str = DEFAULT_GROUP, flush_cache: bool = True,
                                        weight_version: str | None = None,
                                        load_format: str | None = None, commit: bool = True,
                                        bucket_sizes: list[int] | None = None) -> tuple[bool, str]:
        """Receive tensors broadcast by trainer rank 0: one broadcast per tensor in `names` order, or
        with load_format="flattened_bucket" one uint8 buffer holding them all back to back.
        commit=False keeps them staged: the next call with commit=True validates and applies everything
        staged at once (one update made of several buckets is still atomic). bucket_sizes (flattened
        buckets only): the tensors of `names` form consecutive buckets of these counts, broadcast one
        after another within this one call (a whole update in one request, no round trip per bucket)."""
        self._check_open()
        groups = _split(names, dtypes, shapes, bucket_sizes, load_format)
        with self.receiver.lock:
            pending = self.receiver.pending.setdefault(group_name, [])
            try:
                t0 = time.perf_counter()
                # every bucket's broadcast posted back to back into one arena, then one wait for all
                posted = self.receiver.receive(groups, group_name, load_format, slot=len(pending))
                self.receiver.finish(group_name, posted)
                pending += posted
                if not commit:
                    return True, f"staged {len(names)} tensors ({len(pending)} buckets pending until commit=True)"
                t1 = time.perf_counter()
                key = (self._memory_epoch,) + tuple(r.key for r in pending)
                received = list(pending)  # one entry per bucket
                return self._apply(lambda: self.receiver.stage(lambda: [x for r in received for x in r.named()],
                                                               key=key),
                                   weight_version, flush_cache,
                                   {"source": "distributed", "receive_s": t1 - t0, "buckets": len(received)}, t0)
            except BaseException:
                commit = True  # a failed call drops everything staged with it
                raise
            finally:
                if commit:
                    self.receiver.pending.pop(group_name, None)

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None) -> tuple[bool, str]:
        """Tensors from this process (a list of (name, tensor) pairs) or from a colocated trainer
        (`sync.receiver.serialize_named_tensors`: CUDA IPC handles / shared memory, as base64 text)."""
        self._check_open()
        if load_format not in (None, "auto", "direct"):
            raise WeightUpdateError(f"update_weights_from_tensor load_format={load_format!r}; supported: None, "
                                    "'auto', 'direct'")
        with self.receiver.lock:
            t0 = time.perf_counter()
            return self._apply(lambda: self.receiver.from_tensors(named_tensors), weight_version, flush_cache,
                               {"source": "tensor"}, t0)

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, flush_cache: bool = True,
                                 weight_version: str | None = None) -> tuple[bool, str]:
        """Every weight from a checkpoint of the same architecture (validated before any byte is applied)."""
        self._check_open()
        if load_format not in (None, "auto"):
            raise WeightUpdateError(f"update_weights_from_disk load_format={load_format!r}; supported: auto")
        with self.receiver.lock:
            t0 = time.perf_counter()
            ok, msg = self._apply(lambda: self.receiver.from_disk(model_path), weight_version, flush_cache,
                                  {"source": "disk"}, t0)
            self.model_path = Path(model_path)
            return ok, msg

    def update_weight_version(self, new_version: str, abort_all_requests: bool = True) -> tuple[bool, str]:
        """sglang's: relabel the weights being served as `new_version` (no weight changes), between two steps;
        requests in flight are aborted first unless `abort_all_requests=False` (then their later tokens carry the
        new label, listed in meta_info's `weight_version_switches`)."""
        if isinstance(new_version, bool) or not isinstance(new_version, (str, int)) or str(new_version) == "":
            raise ValueError(f"new_version={new_version!r}: must be a non-empty string")
        if not isinstance(abort_all_requests, bool):
            raise ValueError(f"abort_all_requests={abort_all_requests!r}: must be true or false")
        self._check_open()
        if abort_all_requests:
            self.abort_request(abort_all=True)

        def relabel():
            old, self.weight_version = self.weight_version, str(new_version)
            return old

        old = self._command(relabel)
        log.info("weight_version %s -> %s (relabelled, weights unchanged)", old, self.weight_version)
        return True, f"weight_version updated to {self.weight_version}"

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """A stored weight's first `truncate_size` rows as nested lists (MXFP8 data as its e4m3 values,
        `..._scale_inv` as the E8M0 bytes): read between two steps."""
        if isinstance(truncate_size, bool) or not isinstance(truncate_size, int) or truncate_size < 1:
            raise ValueError(f"truncate_size={truncate_size!r}: must be an integer >= 1")
        return self._command(lambda: self.receiver.get(name, truncate_size))

    def _apply(self, stage, weight_version, flush_cache, stats: dict, t0: float) -> tuple[bool, str]:
        if weight_version is not None and not isinstance(weight_version, (str, int)):
            raise WeightUpdateError(f"weight_version={weight_version!r}: must be a string")
        if not isinstance(flush_cache, bool):
            raise WeightUpdateError(f"flush_cache={flush_cache!r}: must be true or false")
        epoch = self._memory_epoch
        staged = stage()  # validates the whole update; raises before anything is written
        t1 = time.perf_counter()

        def commit():
            if self._memory_epoch != epoch:
                raise WeightUpdateError("weight update rejected: memory was released or resumed while it was "
                                        "received; send it again")
            self.receiver.commit(staged)
            old = self.weight_version
            self.weight_version = str(weight_version) if weight_version is not None else _next_version(old)
            self.scheduler.flush_prefix_cache()  # cached KV of the old weights never serves a new request, whatever
            #                                      flush_cache says (requests in flight keep theirs: pause_generation)
            return old

        old = self._command(commit)
        t2 = time.perf_counter()
        self.last_update = {**stats, "validate_s": t1 - t0 - stats.get("receive_s", 0.0), "commit_s": t2 - t1,
                            "total_s": t2 - t0, "tensors_applied": len(staged), "weight_version": self.weight_version}
        log.info("weights updated (%s): %d tensors in %.3f s, weight_version %s -> %s", stats["source"],
                 len(staged), t2 - t0, old, self.weight_version)
        return True, f"updated {len(staged)} tensors; weight_version {self.weight_version}"


def _split(names, dtypes, shapes, bucket_sizes, load_format) -> list[tuple[list, list, list]]:
    if bucket_sizes is None:
        return [(names, dtypes, shapes)]
    if load_format != "flattened_bucket":
        raise WeightUpdateError("bucket_sizes needs load_format='flattened_bucket'")
    if not isinstance(bucket_sizes, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                               and n >= 1 for n in bucket_sizes):
        raise WeightUpdateError(f"bucket_sizes={bucket_sizes!r:.80}: must be a list of tensor counts >= 1")
    if sum(bucket_sizes) != len(names) or not (len(names) == len(dtypes) == len(shapes)):
        raise WeightUpdateError(f"bucket_sizes add up to {sum(bucket_sizes)} tensors; names/dtypes/shapes have "
                                f"{len(names)}/{len(dtypes)}/{len(shapes)}")
    out, start = [], 0
    for n in bucket_sizes:
        out.append((names[start:start + n], dtypes[start:start + n], shapes[start:start + n]))
        start += n
    return out


def _next_version(version: str) -> str:
    """Without an explicit weight_version an update counts up: "default" -> "1" -> "2"."""
    return str(int(version) + 1) if version.isdigit() else "1"
