"""The cyclic garbage collector and the engine loop (sglang's `freeze_gc` and `gc_warning_threshold_secs`).

The engine runs in its caller's process, whose heap after start-up holds hundreds of thousands of long-lived
objects (model modules, tokenizer, the caller's own). Every full collection scans them all: at the RL shape (1024
rows) the loop's host work triggers collections every step, some of them long, and a long one delays the next
step's launch. `freeze_gc` (after warm-up requests, as sglang advises) collects once and moves every object alive
then into the permanent generation, which later collections skip. `GcWatch` logs collections longer than a
threshold, naming the fix.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_gc(context: str = "engine") -> int:
    """gc.collect(), then gc.freeze(): process-wide (the caller's objects alive now are frozen too: never collected,
    until `gc.unfreeze()`). Returns the number of frozen objects, logged."""
    before = gc.get_count()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collection frozen (%s): %d objects in the permanent generation; counts %s -> %s", context,
             frozen, before, gc.get_count())
    return frozen


class GcWatch:
    """While installed (`gc.callbacks`), counts the collections by generation and their seconds, and logs a warning
    for each that takes longer than `threshold` seconds (float("inf"): count only). Remove it with `close()`."""

    def __init__(self, threshold: float):
        if threshold <= 0:
            raise ValueError(f"gc_warning_threshold_secs={threshold}: must be > 0 to watch (0 = off)")
        self.threshold = threshold
        self.long = 0  # collections over the threshold so far
        self.collections, self.seconds, self.longest = [0, 0, 0], [0.0, 0.0, 0.0], 0.0  # by generation; the longest
        self._start = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        g = info.get("generation", 2)
        self.collections[g] += 1
        self.seconds[g] += took
        self.longest = max(self.longest, took)
        if took > self.threshold:
            self.long += 1
            log.warning("long garbage collection: generation %d took %.4f s (%d objects collected, %s tracked); "
                        "call freeze_gc() (POST /freeze_gc) after warm-up requests to stop scanning the start-up "
                        "heap", g, took, info.get("collected", 0), gc.get_count())

    def close(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
