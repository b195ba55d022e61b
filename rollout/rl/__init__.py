"""`mxroll rl`: an RL loop on the rollout engine. GRPO on a verifiable task (task.py), the trainer's MXFP8
model (trainer.py), the engine in its own process (engines.py), orchestration (loop.py), the summary and
plot (report.py), the config (config.py; defaults in configs/rl/default.yaml)."""
from .config import RLConfig, rl_config

__all__ = ["RLConfig", "rl_config", "run_rl"]


def __getattr__(name: str):
    if name == "run_rl":  # lazy: the config imports without torch's model code
        from .loop import run_rl
        return run_rl
    raise AttributeError(f"module 'mxroll.rollout.rl' has no attribute {name!r}")
