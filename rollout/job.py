"""W&B-logged rollout job: generate n samples per prompt for a few steps, log metrics and rollouts."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from .config import RolloutJobConfig

log = logging.getLogger("mxroll.job")


class MetricsLogger:
    """W&B when installed and enabled (imported lazily), always a local metrics.jsonl."""

    def __init__(self, cfg: RolloutJobConfig, out: Path):
        self.file = (out / "metrics.jsonl").open("a")
        self.run = None
        if cfg.wandb.mode == "disabled":
            log.info("W&B disabled; metrics -> %s", self.file.name)
            return
        if cfg.wandb.mode not in ("online", "offline"):
            raise ValueError(f"wandb.mode={cfg.wandb.mode!r}; use online, offline or disabled")
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed (pip install 'mxroll[wandb]'); metrics -> %s only",
                        out / "metrics.jsonl")
            return
        self.run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                              dir=str(out), config=asdict(cfg))

    def log(self, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish()


def run_rollout_job(cfg: RolloutJobConfig) -> list[dict]:
    from .engine import Engine

    if cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps}: must be >= 1")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(cfg.engine)
    logger = MetricsLogger(cfg, out)
    sampling = asdict(cfg.sampling)
    history = []
    try:
        with (out / "rollouts.jsonl").open("w") as rollouts:
            for step in range(cfg.steps):
                if sampling.get("seed") is not None:
                    sampling["seed"] = cfg.sampling.seed + 1000 * step
                t0 = time.perf_counter()
                results = engine.generate(prompt=list(cfg.prompts), sampling_params=sampling, return_logprob=True)
                elapsed = time.perf_counter() - t0
                for i, r in enumerate(results):
                    rollouts.write(json.dumps({"step": step, "prompt": cfg.prompts[i // cfg.sampling.n],
                                               "text": r.get("text"), "output_ids": r["output_ids"],
                                               "logprobs": [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]],
                                               "finish_reason": r["meta_info"]["finish_reason"],
                                               "weight_version": r["meta_info"]["weight_version"]}) + "\n")
                metrics = step_metrics(results, elapsed)
                logger.log(metrics, step)
                history.append(metrics)
                log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    finally:
        logger.close()
        engine.shutdown()
    print(f"{'step':>4} {'samples':>7} {'tokens':>6} {'mean_len':>8} {'mean_logprob':>12} {'tok/s':>8}")
    for i, m in enumerate(history):
        print(f"{i:>4} {m['samples']:>7} {m['completion_tokens']:>6} {m['mean_completion_len']:>8.2f} "
              f"{m['mean_token_logprob']:>12.4f} {m['tokens_per_s']:>8.1f}")
    print(f"rollouts -> {out / 'rollouts.jsonl'}, metrics -> {out / 'metrics.jsonl'}")
    return history


def step_metrics(results: list[dict], elapsed: float) -> dict:
    lens = [r["meta_info"]["completion_tokens"] for r in results]
    lps = [lp for r in results for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
    stopped = sum(r["meta_info"]["finish_reason"]["type"] == "stop" for r in results)
    return {"samples": len(results), "completion_tokens": sum(lens),
            "mean_completion_len": sum(lens) / len(lens), "mean_token_logprob": sum(lps) / max(len(lps), 1),
            "stop_fraction": stopped / len(results), "tokens_per_s": sum(lens) / max(elapsed, 1e-9)}
