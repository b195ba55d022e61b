"""The engine's RL controls (sglang names): abort, pause / continue, the prefix cache's flush, and handing GPU
memory to a colocated trainer and taking it back. Each runs on the engine loop between two steps."""
from __future__ import annotations

import torch

from .gc_watch import freeze_gc
from .profile import StepProfiler

PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang's GPU_MEMORY_TYPE_* values


class ControlsAPI:
    """Mixed into `Engine`; expects `_command`, `_check_open`, `_complete`, `scheduler`, `cache`, `model`, `runner`,
    `device` and the graph / weight-layout helpers."""

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort one request (all its samples) or, with abort_all, every request in flight; their
        generate() calls return what was produced so far with finish_reason {"type": "abort"}."""
        def run():
            seqs = self.scheduler.abort_all() if abort_all else self.scheduler.abort(rid)
            self._complete(seqs)
        self._command(run)

    def pause_generation(self, mode: str = "abort") -> None:
        """Stop stepping. mode "abort": requests in flight end now (finish_reason abort); "retract": they
        go back to the queue, their cache freed, and resume by recompute; "in_place": they keep their
        cache and resume where they were. New requests queue until continue_generation()."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation mode={mode!r}; supported: {PAUSE_MODES}")

        def run():
            self._paused = True
            if mode == "abort":
                self._complete(self.scheduler.abort_all())
            elif mode == "retract":
                self.scheduler.retract_all()
        self._command(run)

    def continue_generation(self) -> None:
        def run():
            self._paused = False
        self._command(run)

    def freeze_gc(self) -> None:
        """sglang's freeze_gc: collect garbage once, then freeze every object alive now (`gc.freeze`) so that later
        collections skip the start-up heap; call it after warm-up requests. Process-wide: the engine runs in the
        caller's process, whose own objects are frozen too (rollout.gc_watch)."""
        self._check_open()
        freeze_gc()

    def start_profile(self, output_dir: str | None = None, start_step: int | None = None, num_steps: int | None = None,
                      activities: list[str] | None = None, with_stack: bool | None = None,
                      record_shapes: bool | None = None, profile_by_stage: bool = False, merge_profiles: bool = False,
                      profile_prefix: str | None = None) -> None:
        """sglang's start_profile: torch.profiler over the engine's next steps (`num_steps` of them, or until
        stop_profile), written as a Chrome trace (rollout.profile; activities "CPU" and "GPU", default both on CUDA).
        start_step, profile_by_stage and merge_profiles are sglang's multi-stage / multi-rank options: refused."""
        if start_step is not None:
            raise ValueError(f"start_step={start_step!r}: not supported; call start_profile when the profile should start")
        for name, value in (("profile_by_stage", profile_by_stage), ("merge_profiles", merge_profiles)):
            if value is not False:
                raise ValueError(f"{name}={value!r}: not supported (one engine, one trace of its steps)")
        self._check_open()
        prof = StepProfiler(self.device, output_dir, num_steps, activities, with_stack, record_shapes, profile_prefix)

        def run():
            if self._profiler is not None:
                raise ValueError("a profile is already running; call stop_profile() first")
            prof.start()
            self._profiler = prof
        self._command(run)

    def stop_profile(self) -> str:
        """Stop the running profile and write its trace; returns the trace's path."""
        def run():
            prof, self._profiler = self._profiler, None
            if prof is None:
                raise ValueError("no profile is running (it may have ended after its num_steps); call start_profile "
                                   "first")
            return str(prof.stop())
        return self._command(run)

    def flush_cache(self) -> bool:
        """Drop the prefix cache (enable_prefix_caching); requests in flight keep the pages they use. True."""
        self._check_open()
        self._command(self.scheduler.flush_prefix_cache)
        return True

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Hand GPU memory to a colocated trainer: "kv_cache" (the paged cache), "weights" (moved to host memory),
        "cuda_graph" (the decode graphs' memory; every release drops them: they hold the cache's and weights'
        addresses). Generation waits until a resume brings both cache and weights back (graphs are captured again
        then). Needs no request holding cache pages (pause first)."""
        tags = self._tags(tags)

        def run():
            if self.scheduler.running:
                raise ValueError(f"release_memory_occupation: {len(self.scheduler.running)} requests hold KV-cache "
                                 "pages; call pause_generation(mode='abort' or 'retract') first")
            self._released = True
            self._memory_epoch += 1
            self.runner.graphs = None
            if "kv_cache" in tags:
                self.scheduler.flush_prefix_cache()
                self.cache.release()
            if "weights" in tags:
                self.model.drop_derived()
                for p in self.model.parameters():
                    p.data = p.data.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._command(run)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        tags = self._tags(tags)

        def run():
            self._memory_epoch += 1
            if "weights" in tags:
                for p in self.model.parameters():
                    p.data = p.data.to(self.device)
                self._postprocess_weights()
                self._attach_moe_workspace()
            if "kv_cache" in tags and not self.cache.allocated:
                self.cache.allocate()
            weights_home = next(self.model.parameters()).device.type == self.device.type
            self._released = not (self.cache.allocated and weights_home)
            if not self._released:
                self.runner.graphs = self._new_graphs()  # new addresses: graphs are captured again
                self._capture_graphs()
        self._command(run)

    @staticmethod
    def _tags(tags) -> list[str]:
        tags = list(MEMORY_TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ValueError(f"memory tags {bad}; supported: {MEMORY_TAGS}")
        return tags
