"""`mxroll rl`: the RL loop. The trainer (this process) and the rollout engine (its own process, behind
HTTP) connected by a weight update group (gloo on CPU, NCCL between GPUs).

Each step: the engine samples n outputs per prompt with their logprobs -> the task scores them -> the
trainer recomputes the logprobs with its own MXFP8 w8a8 forward (the mismatch is measured here) and
takes one GRPO step -> the sender pushes the new MXFP8 weights -> the engine swaps them in (weight
version = step number). A bf16 control engine, fed the same weights, samples a few of the prompts so
that its mismatch against the same trainer forward shows what matching the precision buys.
"""
from __future__ import annotations

import json
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...model.config import ModelConfig
from ...model.tokenizer import load_tokenizer
from ...precision import Recipe
from ...sync.http_client import EngineClient
from ...sync.sender import WeightSender
from ..engine import DTYPES
from ..job import MetricsLogger
from ..presets import resolve_model_path
from .config import RLConfig, check_rl_config
from .engines import EngineProcess
from .report import run_summary, step_table, summary_lines, write_plot
from .task import CharsetTask
from .trainer import Batch, GRPOTrainer, group_advantages, mismatch

log = logging.getLogger("mxroll.rl")
PLOT, METRICS = "rl.png", "metrics.jsonl"


@dataclass
class RLResult:
    history: list[dict]  # one metrics dict per step (what metrics.jsonl holds)
    summary: dict  # run-level figures (report.run_summary) plus the engine's final weight_version and wall time
    plot: Path
    metrics: Path


@dataclass(frozen=True)
class Placement:
    trainer: torch.device
    engine: torch.device
    backend: str  # the update group's: gloo | nccl


def placement(cfg: RLConfig) -> Placement:
    """Trainer on cfg.device (cuda when present); the engine on engine.device, else the second GPU when
    there is one, else the trainer's device; NCCL only between two different GPUs."""
    cuda = torch.cuda.is_available()
    trainer = torch.device(cfg.device or ("cuda" if cuda else "cpu"))
    if trainer.type == "cuda" and trainer.index is None:
        trainer = torch.device("cuda", 0)
    if cfg.engine.device is not None:
        engine = torch.device(cfg.engine.device)
        engine = torch.device("cuda", 0) if engine.type == "cuda" and engine.index is None else engine
    elif trainer.type == "cuda" and torch.cuda.device_count() > 1:
        engine = torch.device("cuda", 1 if trainer.index == 0 else 0)
    else:
        engine = trainer
    apart = trainer.type == engine.type == "cuda" and trainer != engine
    backend = cfg.sync_backend or ("nccl" if apart else "gloo")
    if backend == "nccl" and not apart:
        raise ValueError(f"sync_backend=nccl needs the trainer and the engine on two different GPUs (trainer "
                         f"{trainer}, engine {engine}; NCCL refuses two ranks on one device); use gloo")
    return Placement(trainer, engine, backend)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rl(cfg: RLConfig) -> RLResult:
    t0 = time.perf_counter()
    check_rl_config(cfg)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir={cfg.output_dir!r}: cannot create it ({e})") from None
    where = placement(cfg)
    torch.manual_seed(cfg.seed)
    e = cfg.engine
    model_path = resolve_model_path(e.model_path, e.seed, e.cache_dir, cfg.progress)  # written once, here
    model_cfg = ModelConfig.from_file(model_path)
    task = CharsetTask(list(cfg.task.charsets), cfg.task.prompt_len, cfg.max_new_tokens,
                       load_tokenizer(e.tokenizer_path or model_path, model_cfg.bos_token_id))
    trainer = GRPOTrainer(model_path, Recipe(e.act_mode, e.scale_mode, tuple(e.high_precision)), where.trainer,
                          cfg.lr, cfg.clip_eps, cfg.max_grad_norm, cfg.temperature)
    engine_dtype = e.dtype or ("bfloat16" if where.engine.type == "cuda" else "float32")
    main = replace(e, model_path=str(model_path), device=str(where.engine), dtype=engine_dtype, progress=False)
    engines = [main] + ([replace(main, quantization=None, dtype=cfg.control_dtype)] if cfg.control else [])
    log.info("trainer on %s (fp32 masters, MXFP8 %s); engine on %s (%s, MXFP8 bytes)%s; weights over %s",
             where.trainer, e.act_mode, where.engine, engine_dtype,
             f" + {cfg.control_dtype} control engine" if cfg.control else "", where.backend)
    token = secrets.token_urlsafe(24)  # this run's admin token: only the trainer may push weights
    with EngineProcess(engines, token, e.log_level, cfg.engine_start_timeout) as urls:
        clients = [EngineClient(url, admin_token=token) for url in urls]
        _check_control(clients)
        senders = [WeightSender(c, master_port=free_port(), backend=where.backend, bucket_bytes=cfg.bucket_bytes,
                                model_config=model_cfg, device=where.trainer if where.backend == "nccl" else "cpu",
                                timeout=e.weight_update_timeout, hp_dtype=DTYPES[ec.dtype])
                   for c, ec in zip(clients, engines)]
        try:
            for s in senders:
                s.connect()
            first = _push(trainer, senders, version=0)[0]  # the engines start from the trainer's exact bytes
            log.info("initial weights pushed (weight_version 0): %d tensors, %.2f MB in %d buckets, %.3f s",
                     first["tensors"], first["bytes"] / 1e6, first["buckets"], first["total_s"])
            history = _train(cfg, task, trainer, clients, senders, out)
            version = clients[0].get_weight_version()
        finally:
            for s in senders:
                _close(s)
    summary = {**run_summary(history), "weight_version": version, "wall_s": time.perf_counter() - t0}
    try:
        plot = write_plot(history, out / PLOT, f"mxroll rl: {model_path.name}, charset task, GRPO "
                                               f"({cfg.prompts_per_step} prompts x {cfg.n} samples per step)")
    except ImportError as e:  # the run's figures stay in metrics.jsonl and the printed table
        log.warning("no plot (%s): pip install matplotlib to get %s", e, PLOT)
        plot = None
    print(step_table(history))
    for line in summary_lines(summary):
        print(line)
    print(f"{len(history)} steps in {summary['wall_s']:.0f} s; engine weight_version {version}; "
          f"metrics -> {out / METRICS}, plot -> {plot}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return RLResult(history, summary, plot, out / METRICS)


def _close(sender: WeightSender) -> None:
    """Leave the update group; a failure here (the engine already gone) must not hide the run's own error."""
    try:
        sender.close()
    except Exception as e:  # noqa: BLE001
        log.warning("closing the weight update group: %s", e)


def _check_control(clients: list[EngineClient]) -> None:
    if len(clients) > 1 and clients[1].get_model_info()["quantization"] is not None:
        raise ValueError("the bf16 control engine loaded MXFP8 weights (an MXFP8 checkpoint keeps its format); "
                         "use a high-precision checkpoint for engine.model_path, or control=false")


def _push(trainer: GRPOTrainer, senders: list[WeightSender], version: int) -> list[dict]:
    """Export once (fp32 high-precision parts; each sender casts to its engine's dtype) and push to every
    engine; the senders' stats per engine, total_s counting the export too."""
    t0 = time.perf_counter()
    state = trainer.export(torch.float32)
    export_s = time.perf_counter() - t0
    stats = []
    for s in senders:
        st = s.push(state, weight_version=str(version))
        stats.append({**st, "total_s": export_s + st["total_s"]})
    return stats


def _train(cfg: RLConfig, task: CharsetTask, trainer: GRPOTrainer, clients: list[EngineClient],
           senders: list[WeightSender], out: Path) -> list[dict]:
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    history: list[dict] = []
    with open(out / METRICS, "w") as file:
        logger = MetricsLogger(cfg, out, file)
        bar = tqdm(range(cfg.steps), desc="rl", unit="step", disable=None if cfg.progress else True)
        try:
            for step in bar:
                metrics = _step(cfg, task, trainer, clients, senders, rng, step)
                logger.log(metrics, step)
                history.append({"step": step, **metrics})
                log.info("step %d/%d: reward %.3f | mismatch mean %.2e max %.2e%s | sync %.3f s | %.0f tok/s",
                         step + 1, cfg.steps, metrics["reward_mean"], metrics["mismatch_mean"], metrics["mismatch_max"],
                         f" | bf16 control mean {metrics['control_mismatch_mean']:.2e} max "
                         f"{metrics['control_mismatch_max']:.2e}" if cfg.control else "",
                         metrics["sync_time_s"], metrics["tokens_per_s"])
                bar.set_postfix({"reward": f"{metrics['reward_mean']:.3f}",
                                 "mismatch": f"{metrics['mismatch_mean']:.1e}"}, refresh=False)
        finally:
            bar.close()
            logger.close()
    return history


def _step(cfg: RLConfig, task: CharsetTask, trainer: GRPOTrainer, clients: list[EngineClient],
          senders: list[WeightSender], rng: random.Random, step: int) -> dict:
    t_step = time.perf_counter()
    prompts = task.sample(rng, cfg.prompts_per_step)
    ids = [p.input_ids for p in prompts]
    sampling = {"n": cfg.n, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "ignore_eos": True, "seed": cfg.seed + 1000 * step}
    t0 = time.perf_counter()
    outs = clients[0].generate(input_ids=ids, sampling_params=sampling, return_logprob=True)
    rollout_s = time.perf_counter() - t0
    n = cfg.n
    rewards = [task.reward(prompts[i // n], o["output_ids"]) for i, o in enumerate(outs)]
    batch = Batch(prompts=[ids[i // n] for i in range(len(outs))], outputs=[o["output_ids"] for o in outs],
                  rollout_logprobs=[[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs],
                  advantages=group_advantages(torch.tensor(rewards).view(-1, n)).view(-1).tolist())
    metrics = {"reward_mean": sum(rewards) / len(rewards),
               "reward_std": torch.tensor(rewards).std(unbiased=False).item()}
    if cfg.control:  # before the update: the control engine holds the weights the trainer has now
        metrics.update(_control(cfg, task, trainer, clients[1], prompts, sampling))
    t0 = time.perf_counter()
    metrics.update(trainer.step(batch))
    train_s = time.perf_counter() - t0
    sync = _push(trainer, senders, version=step + 1)
    tokens = sum(len(o) for o in batch.outputs)
    metrics.update(sync_time_s=sync[0]["total_s"], sync_bytes=sync[0]["bytes"], sync_buckets=sync[0]["buckets"],
                   tokens_per_s=tokens / rollout_s, rollout_time_s=rollout_s, train_time_s=train_s,
                   completion_tokens=tokens, weight_version=str(step + 1))
    if cfg.control:
        metrics["control_sync_time_s"] = sync[1]["total_s"]
    metrics["step_time_s"] = time.perf_counter() - t_step
    return metrics


def _control(cfg: RLConfig, task: CharsetTask, trainer: GRPOTrainer, client: EngineClient, prompts,
             sampling: dict) -> dict:
    chosen = prompts[:cfg.control_prompts]
    outs = client.generate(input_ids=[p.input_ids for p in chosen], sampling_params=sampling, return_logprob=True)
    n = cfg.n
    ps = [chosen[i // n].input_ids for i in range(len(outs))]
    lps = trainer.logprobs(ps, [o["output_ids"] for o in outs])
    m = mismatch(lps, [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs])
    rewards = [task.reward(chosen[i // n], o["output_ids"]) for i, o in enumerate(outs)]
    return {**{f"control_mismatch_{k}": v for k, v in m.items()}, "control_reward_mean": sum(rewards) / len(rewards)}
