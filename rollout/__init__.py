"""The rollout engine: Engine API, scheduler, paged cache, runner, sampler, CLI and rollout jobs."""
from .sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: the pure-Python parts (scheduler, pages, sampling params) import without the engine.
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module 'mxroll.rollout' has no attribute {name!r}")
