"""sglang's start_profile / stop_profile: a torch.profiler run over the engine loop's steps, written as a Chrome trace
(`<output_dir>/<prefix>-<ms>.trace.json.gz`; chrome://tracing or Perfetto open it). Each step is a
`mxroll.step#N` range holding its launches and, with GPU activity, its kernels. The run starts and stops on the
engine loop (between two steps), after `num_steps` steps or at `stop_profile()`.
output_dir: the argument, else $MXROLL_TORCH_PROFILER_DIR, else $SGLANG_TORCH_PROFILER_DIR, else the temp dir.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

log = logging.getLogger(__name__)

ACTIVITIES = {"CPU": ProfilerActivity.CPU, "GPU": ProfilerActivity.CUDA}  # sglang's names


class StepProfiler:
    """One profile: arguments checked at construction (on the caller's thread), `start` / `stop` on the loop."""

    def __init__(self, device: torch.device, output_dir: str | None = None, num_steps: int | None = None,
                 activities: list[str] | None = None, with_stack: bool | None = None,
                 record_shapes: bool | None = None, profile_prefix: str | None = None):
        acts = list(activities) if activities is not None else ["CPU"] + (["GPU"] if device.type == "cuda" else [])
        bad = [a for a in acts if a not in ACTIVITIES]
        if bad or not acts:
            raise ValueError(f"activities={activities!r}: choose from {list(ACTIVITIES)}")
        if "GPU" in acts and device.type != "cuda":
            raise ValueError(f"activities={activities!r}: 'GPU' needs a CUDA engine; this one runs on {device}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps={num_steps!r}: must be null (until stop_profile) or an integer >= 1")
        for name, v in (("with_stack", with_stack), ("record_shapes", record_shapes)):
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name}={v!r}: must be true or false")
        folder = Path(output_dir or os.environ.get("MXROLL_TORCH_PROFILER_DIR")
                      or os.environ.get("SGLANG_TORCH_PROFILER_DIR") or tempfile.gettempdir()).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"output_dir={str(folder)!r}: cannot create it ({e.strerror})") from None
        prefix = profile_prefix or "mxroll"
        if "/" in prefix or os.sep in prefix:
            raise ValueError(f"profile_prefix={profile_prefix!r}: must be a file name prefix, not a path")
        self.path = folder / f"{prefix}-{int(time.time() * 1000)}.trace.json.gz"
        self.num_steps, self.steps, self.activities = num_steps, 0, acts
        self._prof = torch.profiler.profile(activities=[ACTIVITIES[a] for a in acts], with_stack=bool(with_stack),
                                            record_shapes=bool(record_shapes))

    def start(self) -> None:
        self._prof.start()
        log.info("profiling engine steps (%s%s) -> %s", "+".join(self.activities),
                 f", {self.num_steps} steps" if self.num_steps else ", until stop_profile", self.path)

    def step_scope(self) -> record_function:
        return record_function(f"mxroll.step#{self.steps}")

    def stepped(self) -> bool:
        """Count a step; True when num_steps are done (then `stop`)."""
        self.steps += 1
        return self.num_steps is not None and self.steps >= self.num_steps

    def stop(self) -> Path:
        self._prof.stop()
        self._prof.export_chrome_trace(str(self.path))
        log.info("profile of %d engine steps written to %s", self.steps, self.path)
        return self.path
