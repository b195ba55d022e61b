"""Per-token logprobs of whole sequences, differentiable: what a GRPO trainer recomputes.

Sequences are packed into one flat batch (the model's own forward) with an attention backend that
needs no cache: each token attends to the tokens of its own sequence at positions up to its own,
through the engine reference's naive MLA formulation. Nothing is written in place into a shared
buffer, so autograd sees the whole graph (the engine's caches do write in place, and
`DeepseekV3.sequence_logits` runs under inference mode).
Legend: T tokens of all sequences, S scored rows (one per output token), V vocab.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .deepseek import DeepseekV3


class PackedCausalAttention:
    """Whole sequences in one flat batch: key s is visible to query t when both belong to the same
    sequence and pos[s] <= pos[t]."""

    def __init__(self, seq_T: torch.Tensor, pos_T: torch.Tensor):
        self.mask_TS = (seq_T[:, None] == seq_T[None, :]) & (pos_T[None, :] <= pos_T[:, None])

    def forward(self, mla, q_nope_THP, q_pe_THR, kv_TC, k_pe_TR) -> torch.Tensor:
        return mla.attend_naive(q_nope_THP, q_pe_THR, mla.latent(kv_TC), k_pe_TR, self.mask_TS)


def batch_logprobs(model: DeepseekV3, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                   temperature: float = 1.0) -> list[torch.Tensor]:
    """fp32 [len(outputs[i])] per sequence: log_softmax(fp32 logits / temperature) at each output token,
    the engine's logprob definition (DESIGN.md, Logprobs). One forward over all sequences."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    ids, pos, seq, rows, targets = [], [], [], [], []
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if not prompt:
            raise ValueError(f"sequence {i}: empty prompt (the first output token needs a position before it)")
        tokens = list(prompt) + list(out)[:-1]  # the last output token is scored, never fed
        start = len(ids)
        rows += range(start + len(prompt) - 1, start + len(prompt) - 1 + len(out))
        ids += tokens
        pos += range(len(tokens))
        seq += [i] * len(tokens)
        targets += [int(t) for t in out]
    device = model.embed_tokens.weight.device
    ids_T, pos_T, seq_T = (torch.tensor(v, dtype=torch.long, device=device) for v in (ids, pos, seq))
    h_TD = model(ids_T, pos_T, PackedCausalAttention(seq_T, pos_T))
    logits_SV = model.logits(h_TD.index_select(0, torch.tensor(rows, dtype=torch.long, device=device)))
    lp_SV = torch.log_softmax(logits_SV / temperature, dim=-1)
    lp_S = lp_SV.gather(1, torch.tensor(targets, dtype=torch.long, device=device)[:, None])[:, 0]
    return list(lp_S.split([len(o) for o in outputs]))


def sequence_logprobs(model: DeepseekV3, prompt_ids: Sequence[int], output_ids: Sequence[int],
                      temperature: float = 1.0) -> torch.Tensor:
    """fp32 [len(output_ids)]: one sequence's `batch_logprobs`."""
    return batch_logprobs(model, [prompt_ids], [output_ids], temperature)[0]
