"""W&B-logged rollout job: generate n samples per prompt for a few steps, log metrics and rollouts."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from .config import RolloutJobConfig, check_engine_config
from .sampling_params import SEED_LIMIT, SamplingParams

log = logging.getLogger("mxroll.job")

WANDB_MODES = ("online", "offline", "disabled")
OUTPUTS = ("rollouts.jsonl", "metrics.jsonl")


class MetricsLogger:
    """W&B when installed and enabled (imported lazily), always a local metrics.jsonl (`file`)."""

    def __init__(self, cfg: RolloutJobConfig, out: Path, file: TextIO):
        self.file = file
        self.run = None
        if cfg.wandb.mode == "disabled":
            log.info("W&B disabled; metrics -> %s", out / "metrics.jsonl")
            return
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
        if self.run is not None:
            self.run.finish()


def check_rollout_job(cfg: RolloutJobConfig) -> None:
    """Everything that needs no model, checked before any output file is touched."""
    check_engine_config(cfg.engine)
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps!r}: must be an integer >= 1")
    if not isinstance(cfg.prompts, list) or not cfg.prompts or not all(isinstance(p, str) for p in cfg.prompts):
        raise ValueError(f"prompts={cfg.prompts!r:.80}: must be a non-empty list of strings")
    SamplingParams.from_dict(asdict(cfg.sampling))
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}; use one of {WANDB_MODES}")


def step_sampling(cfg: RolloutJobConfig, step: int) -> dict:
    """The step's sampling params: a seeded job moves its seed by 1000 per step (wrapping at 2**64)."""
    sampling = asdict(cfg.sampling)
    if sampling["seed"] is not None:
        sampling["seed"] = (sampling["seed"] + 1000 * step) % SEED_LIMIT
    return sampling


def run_rollout_job(cfg: RolloutJobConfig) -> list[dict]:
    """Run the job. rollouts.jsonl and metrics.jsonl are written fresh, to temp files that replace the
    previous run's only when the job completes: a failed run leaves them as they were."""
    from .engine import Engine

    check_rollout_job(cfg)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir={cfg.output_dir!r}: cannot create it ({e})") from None
    engine = Engine(cfg.engine)
    staged: list[_Staged] = []
    try:
        for name in OUTPUTS:
            staged.append(_Staged(out / name))
        history = _run_steps(engine, cfg, out, *(s.file for s in staged))
    except BaseException:
        for s in staged:
            s.discard()
        raise
    finally:
        engine.shutdown()
    for s in staged:
        s.commit()
    print(f"{'step':>4} {'samples':>7} {'tokens':>6} {'mean_len':>8} {'mean_logprob':>12} {'tok/s':>8}")
    for i, m in enumerate(history):
        print(f"{i:>4} {m['samples']:>7} {m['completion_tokens']:>6} {m['mean_completion_len']:>8.2f} "
              f"{m['mean_token_logprob']:>12.4f} {m['tokens_per_s']:>8.1f}")
    print(f"rollouts -> {out / 'rollouts.jsonl'}, metrics -> {out / 'metrics.jsonl'}")
    return history


def _run_steps(engine, cfg: RolloutJobConfig, out: Path, rollouts: TextIO, metrics_file: TextIO) -> list[dict]:
    logger = MetricsLogger(cfg, out, metrics_file)
    history = []
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            results = engine.generate(prompt=list(cfg.prompts), sampling_params=step_sampling(cfg, step),
                                      return_logprob=True)
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
    return history


class _Staged:
    """A temp file beside `path`: `commit()` moves it over `path` (atomically), `discard()` removes it."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # not mkstemp: keep umask's mode
        self.file = self.tmp.open("x")

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        with suppress(FileNotFoundError):
            os.unlink(self.tmp)


def step_metrics(results: list[dict], elapsed: float) -> dict:
    lens = [r["meta_info"]["completion_tokens"] for r in results]
    lps = [lp for r in results for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
    stopped = sum(r["meta_info"]["finish_reason"]["type"] == "stop" for r in results)
    return {"samples": len(results), "completion_tokens": sum(lens),
            "mean_completion_len": sum(lens) / len(lens), "mean_token_logprob": sum(lps) / max(len(lps), 1),
            "stop_fraction": stopped / len(results), "tokens_per_s": sum(lens) / max(elapsed, 1e-9)}
