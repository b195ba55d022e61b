"""Token sampling and logprobs.

Logprobs follow DESIGN.md: log_softmax(logits / temperature) in fp32 over the full vocabulary,
before top-k/top-p/min-p filtering (what the trainer recomputes); greedy and raw_logprob requests
report temperature-1 logprobs. Legend: B rows, V vocab.
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def logprobs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    t = 1.0 if params.greedy or params.raw_logprob else params.temperature
    return torch.log_softmax(logits_BV.float() / t, dim=-1)


def filtered_probs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution after temperature, top-k, top-p and min-p (renormalized)."""
    probs = torch.softmax(logits_BV.float() / params.temperature, dim=-1)
    if params.top_k != -1 and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= params.top_p * sorted_p.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B]."""
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    probs = filtered_probs(logits_BV, params)
    return torch.multinomial(probs, 1, generator=generator)[..., 0]
