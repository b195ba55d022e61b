"""A step as the engine loop tracks it: launched (forward, sampling and the copies of its results to the host
enqueued, nothing waited on), then finished (results read back). With the overlap schedule the next decode step
is launched before the current one is finished. Also the per-step figures the engine keeps (`StepStat`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .step_inputs import StepInputs


@dataclass(frozen=True)
class StepStat:
    rows: int  # sequences in the step
    tokens: int  # tokens computed (prefill chunks + decode tokens)
    sampled: int  # tokens sampled
    decode: bool  # every row computed one token
    seconds: float  # wall time from its launch (or the previous step's end, if later) to its end: steps tile time
    phases: dict | None = None  # seconds per phase, with step_timing on (the device is synced between phases)
    ahead: bool = False  # launched before the previous step's tokens were read back (overlap schedule)
    launch_s: float = 0.0  # host time spent enqueueing steps (inputs, attention plan, forward, sampler, copies back)
    #                        within this step's `seconds`: its own launch, or with the overlap schedule the next
    #                        step's, which runs while this one computes; so launch_s <= seconds and the steps' sums
    #                        give the host's share of the loop's wall time
    wait_s: float = 0.0  # time the loop then blocked until its results were on the host: ~0 when the host is the
    #                      bound (the device finished first), most of `seconds` when the device is


class PhaseClock:
    """Wall time of a step and, when asked, of its phases (syncing the device at each mark)."""

    def __init__(self, device: torch.device, detailed: bool):
        self.sync = detailed and device.type == "cuda"
        self.phases = {} if detailed else None
        self.start = self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.phases is None:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now


class HostCopy:
    """A step's results copied to the host without a sync (pinned buffers + an event on CUDA); `wait()` gives
    them as Python lists (tokens, logprobs, top-logprobs) and CPU tensors (routes)."""

    def __init__(self, sampled, routes, device: torch.device, extra: dict[str, torch.Tensor] | None = None):
        """extra: more named tensors to bring back as lists (prompt-token logprobs)."""
        named = {"tokens": sampled.tokens, "logprobs": sampled.logprobs, "top_ids": sampled.top_ids,
                 "top_logprobs": sampled.top_logprobs, **(extra or {})}
        if routes is not None:
            named["route_ids"], named["route_weights"] = routes
        self.event = None
        self.waited_s = 0.0  # set by wait()
        if device.type == "cuda":
            pinned = {}
            for k, t in named.items():
                if t is not None:
                    pinned[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    pinned[k].copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            named = pinned
        else:
            named = {k: t.clone() if k.startswith("route") else t for k, t in named.items() if t is not None}
        self.named = named

    def wait(self) -> dict:
        t0 = time.perf_counter()
        if self.event is not None:
            self.event.synchronize()  # the step's one wait on the device
        self.waited_s = time.perf_counter() - t0
        out = {k: (t if k.startswith("route") else t.tolist()) for k, t in self.named.items()}
        for k in ("top_ids", "top_logprobs", "route_ids", "route_weights"):
            out.setdefault(k, None)
        return out


@dataclass
class InFlight:
    """A launched step: its batch and inputs, its sampled tokens on the device, their host copy."""
    batch: Any
    step: StepInputs
    tokens: torch.Tensor
    host: HostCopy
    clock: PhaseClock
    rows: Any  # its SamplingRows (the next decode step's are derived from them)
    scored: list[tuple[int, int]] | None = None  # (seq_id, prompt position) of each prompt-token logprob it brings
