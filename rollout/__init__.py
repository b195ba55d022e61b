"""The rollout engine: Engine API, sampler, runner, CLI and W&B-logged rollout jobs."""
from .engine import Engine
from .sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams"]
