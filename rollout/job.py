"""`mxroll job`: n samples per prompt for a few steps; rollouts and per-step metrics to jsonl and W&B.

Outputs in `output_dir`, both written fresh to temp files that replace the previous run's only when
the job completes (a failed run leaves them as they were):
- rollouts.jsonl: one line per sample (see `rollout_record`)
- metrics.jsonl: one line per step (see `step_metrics`), the same dict W&B gets
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

from .chat import ChatTemplate
from .config import RolloutJobConfig, check_engine_config
from .prompts import load_prompts, prompt_token_ids
from .rewards import RewardFn, load_reward, score
from .sampling_params import SEED_LIMIT, SamplingParams

log = logging.getLogger("mxroll.job")

WANDB_MODES = ("online", "offline", "disabled")
OUTPUTS = ("rollouts.jsonl", "metrics.jsonl")
FINISH_TYPES = ("stop", "length", "abort")


@dataclass
class JobPlan:
    """What a job needs besides the model, resolved and checked before anything is loaded or written."""

    records: list[dict]  # prompt records
    source: str  # where the prompts came from
    reward: RewardFn | None


class MetricsLogger:
    """W&B when installed and enabled (imported lazily), always a local metrics.jsonl (`file`)."""

    def __init__(self, cfg: RolloutJobConfig, out: Path, file: TextIO):
        self.file = file
        self.run = None
        w = cfg.wandb
        if w.mode == "disabled":
            log.info("W&B disabled; metrics -> %s", out / "metrics.jsonl")
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed (pip install 'mxroll[wandb]'); metrics -> %s only",
                        out / "metrics.jsonl")
            return
        self.run = wandb.init(project=w.project, entity=w.entity, name=w.name, group=w.group,
                              tags=list(w.tags) or None, mode=w.mode, dir=str(out), config=asdict(cfg))
        log.info("W&B run (%s) -> %s", w.mode, out / "wandb")

    def log(self, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def plan_rollout_job(cfg: RolloutJobConfig) -> JobPlan:
    """Everything that needs no model, checked before any output file is touched."""
    check_engine_config(cfg.engine)
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps!r}: must be an integer >= 1")
    records, source = load_prompts(cfg.prompts, cfg.prompts_file, cfg.prompts_preset, cfg.max_prompts)
    SamplingParams.from_dict(asdict(cfg.sampling))
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}; use one of {WANDB_MODES}")
    paths = cfg.sync.model_paths
    if len(paths) > cfg.steps:
        raise ValueError(f"sync.model_paths has {len(paths)} entries for {cfg.steps} steps (one per step at most)")
    for i, path in enumerate(paths):
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"sync.model_paths[{i}]={path!r}: not a checkpoint directory")
    reward = load_reward(cfg.reward, cfg.reward_args) if cfg.reward is not None else None
    if cfg.reward_args and reward is None:
        raise ValueError(f"reward_args={cfg.reward_args!r} given without a reward function (reward=module:fn)")
    return JobPlan(records, source, reward)


def step_sampling(cfg: RolloutJobConfig, step: int) -> dict:
    """The step's sampling params: a seeded job moves its seed by 1000 per step (wrapping at 2**64)."""
    sampling = asdict(cfg.sampling)
    if sampling["seed"] is not None:
        sampling["seed"] = (sampling["seed"] + 1000 * step) % SEED_LIMIT
    return sampling


def run_rollout_job(cfg: RolloutJobConfig) -> list[dict]:
    """Run the job; returns the per-step metrics."""
    from .engine import Engine

    plan = plan_rollout_job(cfg)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir={cfg.output_dir!r}: cannot create it ({e})") from None
    engine = Engine(cfg.engine if cfg.progress else replace(cfg.engine, progress=False))
    staged: list[_Staged] = []
    try:
        for name in OUTPUTS:
            staged.append(_Staged(out / name))
        history = _run_steps(engine, cfg, plan, out, *(s.file for s in staged))
    except BaseException:
        for s in staged:
            s.discard()
        raise
    finally:
        engine.shutdown()
    for s in staged:
        s.commit()
    print(summary_table(history))
    print(f"rollouts -> {out / 'rollouts.jsonl'}, metrics -> {out / 'metrics.jsonl'}")
    return history


def _run_steps(engine, cfg: RolloutJobConfig, plan: JobPlan, out: Path, rollouts: TextIO,
               metrics_file: TextIO) -> list[dict]:
    from tqdm import tqdm

    records = plan.records
    template = ChatTemplate.load(engine.tokenizer_path) if any("messages" in r for r in records) else None
    ids = prompt_token_ids(records, engine.tokenizer, plan.source, template)
    log.info("%d prompts from %s, %d samples each, %d steps", len(records), plan.source, cfg.sampling.n, cfg.steps)
    reward_records = [{**rec, "input_ids": x} for rec, x in zip(records, ids)]
    per_step = len(records) * cfg.sampling.n
    logger = MetricsLogger(cfg, out, metrics_file)
    history = []
    # disable=None: tqdm shows the bar on a terminal only
    bar = tqdm(total=cfg.steps * per_step, desc="rollout", unit="sample", disable=None if cfg.progress else True)
    try:
        for step in range(cfg.steps):
            sync_s = _sync(engine, cfg, step)
            t0 = time.perf_counter()
            results = engine.generate(input_ids=ids, sampling_params=step_sampling(cfg, step), return_logprob=True,
                                      return_routed_experts=cfg.return_routed_experts)
            elapsed = time.perf_counter() - t0
            rewards = _rewards(plan, cfg, reward_records, results, step)
            for i, r in enumerate(results):
                p, j = divmod(i, cfg.sampling.n)
                row = rollout_record(step, p, j, records[p], ids[p], r, None if rewards is None else rewards[i])
                rollouts.write(json.dumps(row) + "\n")
            metrics = step_metrics(results, elapsed, len(records), rewards)
            if sync_s is not None:
                metrics["sync_time_s"] = sync_s
            logger.log(metrics, step)
            history.append(metrics)
            log.info("step %d: %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
            bar.set_postfix({"tok/s": f"{metrics['tokens_per_s']:.1f}",
                             **({"reward": f"{metrics['reward_mean']:.3f}"} if rewards is not None else {})},
                            refresh=False)
            bar.update(per_step)
    finally:
        bar.close()
        logger.close()
    return history


def _rewards(plan: JobPlan, cfg: RolloutJobConfig, reward_records: list[dict], results: list[dict],
             step: int) -> list[float] | None:
    if plan.reward is None:
        return None
    n = cfg.sampling.n
    return [score(plan.reward, cfg.reward_args, reward_records[i // n], r,
                  f"step {step}, prompt {i // n}, sample {i % n}") for i, r in enumerate(results)]


def _sync(engine, cfg: RolloutJobConfig, step: int) -> float | None:
    """Load the step's checkpoint (sync.model_paths[step]) into the running engine; seconds it took."""
    paths = cfg.sync.model_paths
    if step >= len(paths) or paths[step] is None:
        return None
    t0 = time.perf_counter()
    engine.update_weights_from_disk(paths[step])
    elapsed = time.perf_counter() - t0
    log.info("step %d: weights from %s (weight_version %s) in %.3f s", step, paths[step], engine.weight_version,
             elapsed)
    return elapsed


def rollout_record(step: int, prompt_index: int, sample_index: int, record: dict, input_ids: list[int],
                   output: dict, reward: float | None) -> dict:
    """One line of rollouts.jsonl: the prompt (text if any, ids, extra fields), the sample (ids, text when a
    tokenizer exists, per-token logprobs, finish reason, weight version), its reward and routed experts
    ([tokens, moe_layers, top_k] nested lists, every token that went through the model as input)."""
    meta = output["meta_info"]
    row = {"step": step, "prompt_index": prompt_index, "sample_index": sample_index}
    if "prompt" in record:
        row["prompt"] = record["prompt"]
    row["input_ids"] = input_ids
    row["output_ids"] = output["output_ids"]
    if "text" in output:
        row["text"] = output["text"]
    row["logprobs"] = [lp for lp, _, _ in meta["output_token_logprobs"]]
    row["finish_reason"] = meta["finish_reason"]
    row["weight_version"] = meta["weight_version"]
    if "weight_version_switches" in meta:
        row["weight_version_switches"] = meta["weight_version_switches"]
    if reward is not None:
        row["reward"] = reward
    extra = {k: v for k, v in record.items() if k not in ("prompt", "input_ids")}
    if extra:
        row["extra"] = extra
    if "routed_experts" in meta:
        row["routed_experts"] = _nested(meta["routed_experts"])
        row["routed_expert_weights"] = _nested(meta["routed_expert_weights"])
    return row


def _nested(x):
    return x.tolist() if hasattr(x, "tolist") else x


def step_metrics(results: list[dict], elapsed: float, prompts: int, rewards: list[float] | None = None) -> dict:
    """A step's metrics: sizes, completion lengths, finish-reason fractions, throughput, weight version,
    and reward statistics when the job has a reward function."""
    lens = [r["meta_info"]["completion_tokens"] for r in results]
    lps = [lp for r in results for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
    reasons = Counter(r["meta_info"]["finish_reason"]["type"] for r in results)
    n = len(results)
    elapsed = max(elapsed, 1e-9)
    m = {"samples": n, "prompts": prompts, "completion_tokens": sum(lens), "mean_completion_len": sum(lens) / n,
         "max_completion_len": max(lens), "min_completion_len": min(lens),
         "mean_token_logprob": sum(lps) / max(len(lps), 1)}
    m.update({f"{t}_fraction": reasons[t] / n for t in FINISH_TYPES})
    m.update({"tokens_per_s": sum(lens) / elapsed, "samples_per_s": n / elapsed, "step_time_s": elapsed,
              "weight_version": ",".join(sorted({str(r["meta_info"]["weight_version"]) for r in results}))})
    if rewards is not None:
        m.update({"reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
                  "reward_positive_fraction": sum(r > 0 for r in rewards) / n})
    return m


def summary_table(history: list[dict]) -> str:
    reward = any("reward_mean" in m for m in history)
    lines = [f"{'step':>4} {'samples':>7} {'tokens':>6} {'mean_len':>8} {'mean_logprob':>12} {'tok/s':>8} "
             f"{'stop':>5} {'weights':>8}" + (f" {'reward':>8}" if reward else "")]
    for i, m in enumerate(history):
        lines.append(f"{i:>4} {m['samples']:>7} {m['completion_tokens']:>6} {m['mean_completion_len']:>8.2f} "
                     f"{m['mean_token_logprob']:>12.4f} {m['tokens_per_s']:>8.1f} {m['stop_fraction']:>5.2f} "
                     f"{m['weight_version']:>8.8}" + (f" {m.get('reward_mean', float('nan')):>8.3f}" if reward else ""))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
