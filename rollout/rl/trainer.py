"""GRPO on the trainer's MXFP8 model: group-normalised advantages, a PPO-clipped token loss whose ratio is
taken against the rollout engine's own logprobs, Adam on fp32 master weights.

The model is `build_trainable_model` with the engine's recipe: its MXFP8 modules fake-quantize weights
and activations along K (w8a8, straight-through gradient), so its forward is the forward the engine
runs on the exported bytes. The ratio exp(trainer logprob - rollout logprob) then starts each step at
1 up to the rollout mismatch, which the step measures from the same forward it trains with.
Legend: G prompts (groups), N samples per prompt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...model.logprobs import batch_logprobs
from ...model.trainable import build_trainable_model, export_mxfp8_state
from ...precision import Recipe

MISMATCH_FLOOR = 1e-4  # |delta| above which a token counts as mismatched (fp32 agreement is ~1e-6)


def group_advantages(rewards_GN: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); a group whose samples all score alike gets 0."""
    mean = rewards_GN.mean(dim=1, keepdim=True)
    std = rewards_GN.std(dim=1, keepdim=True, unbiased=False)
    return (rewards_GN - mean) / (std + eps)


def mismatch(trainer: Sequence[torch.Tensor], rollout: Sequence[Sequence[float]]) -> dict:
    """|trainer logprob - rollout logprob| over every token: mean, max and the fraction above MISMATCH_FLOOR."""
    delta = torch.cat([(t.detach().float().cpu() - torch.tensor(r, dtype=torch.float32)).abs()
                       for t, r in zip(trainer, rollout)])
    return {"mean": delta.mean().item(), "max": delta.max().item(),
            "frac": (delta > MISMATCH_FLOOR).float().mean().item(), "tokens": delta.numel()}


@dataclass
class Batch:
    """One step's samples, flat (prompt-major): what the engine generated and how each scored."""

    prompts: list[list[int]]  # the prompt of each sample
    outputs: list[list[int]]
    rollout_logprobs: list[list[float]]  # the engine's, at the sampling temperature
    advantages: list[float]


class GRPOTrainer:
    def __init__(self, model_path: str | Path, recipe: Recipe, device: torch.device, lr: float, clip_eps: float,
                 max_grad_norm: float | None, temperature: float):
        self.model = build_trainable_model(model_path, torch.float32, recipe, device=device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.clip_eps, self.max_grad_norm, self.temperature = clip_eps, max_grad_norm, temperature

    @torch.no_grad()
    def logprobs(self, prompts: list[list[int]], outputs: list[list[int]]) -> list[torch.Tensor]:
        return batch_logprobs(self.model, prompts, outputs, self.temperature)

    def step(self, batch: Batch) -> dict:
        """One optimizer step on the batch; returns the loss, gradient norm, clipped-token fraction and the
        rollout-vs-trainer mismatch of the weights the batch was sampled with (before the step)."""
        lps = batch_logprobs(self.model, batch.prompts, batch.outputs, self.temperature)
        stats = {f"mismatch_{k}": v for k, v in mismatch(lps, batch.rollout_logprobs).items()}
        device = lps[0].device
        lp_T = torch.cat(lps)
        old_T = torch.tensor([x for r in batch.rollout_logprobs for x in r], dtype=torch.float32, device=device)
        adv_T = torch.tensor([a for a, o in zip(batch.advantages, batch.outputs) for _ in o], dtype=torch.float32,
                             device=device)
        ratio_T = torch.exp(lp_T - old_T)
        clipped_T = ratio_T.clamp(1 - self.clip_eps, 1 + self.clip_eps)
        loss = -torch.minimum(ratio_T * adv_T, clipped_T * adv_T).mean()  # token mean over the whole batch
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        self.opt.step()
        stats.update(loss=loss.item(), grad_norm=norm.item(),
                     clip_fraction=((ratio_T - clipped_T).abs() > 0).float().mean().item())
        return stats

    def export(self, hp_dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        """The weights to push: MXFP8 modules as e4m3 + E8M0 (the bytes the forward used), the rest hp_dtype."""
        return export_mxfp8_state(self.model, hp_dtype)
