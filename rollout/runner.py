"""Reference model runner: one sequence at a time, prefill through the naive MLA path, decode
through the absorbed path over the latent cache. The batched engine reuses its pieces."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import DeepseekV3

from .sampler import logprobs, sample
from .sampling_params import SamplingParams


@dataclass
class SequenceOutput:
    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: dict


def finish_reason(token: int, params: SamplingParams, eos_ids: tuple[int, ...], produced: int) -> dict | None:
    if token in params.stop_token_ids:
        return {"type": "stop", "matched": token}
    if not params.ignore_eos and token in eos_ids:
        return {"type": "stop", "matched": token}
    if produced >= params.max_new_tokens:
        return {"type": "length", "length": produced}
    return None


@torch.inference_mode()
def generate_sequence(model: DeepseekV3, prompt_ids: list[int], params: SamplingParams,
                      generator: torch.Generator | None) -> SequenceOutput:
    device = model.embed_tokens.weight.device
    if params.max_new_tokens == 0:
        return SequenceOutput([], [], {"type": "length", "length": 0})
    cache = model.new_cache(len(prompt_ids) + params.max_new_tokens)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    logits_V = model.sequence_logits(ids, torch.arange(len(prompt_ids), device=device), cache)[-1]
    out_ids: list[int] = []
    out_lp: list[float] = []
    while True:
        token_t = sample(logits_V[None], params, generator)
        token = int(token_t[0])
        out_ids.append(token)
        out_lp.append(float(logprobs(logits_V[None], params)[0, token]))
        reason = finish_reason(token, params, model.cfg.eos_token_ids, len(out_ids))
        if reason is not None:
            return SequenceOutput(out_ids, out_lp, reason)
        pos = torch.tensor([len(prompt_ids) + len(out_ids) - 1], device=device)
        logits_V = model.sequence_logits(token_t, pos, cache)[-1]
