"""Prompt-token logprobs (sglang's input_token_logprobs, asked with logprob_start_len >= 0).

A prefill step scores the prompt positions its rows compute: the logprob of each position's next prompt token,
with DESIGN.md's definition (fp32 log_softmax(logits / logprob temperature) over the full vocabulary, greedy and
raw_logprob rows at temperature 1), and optionally the top-k. The lm_head runs over the scored positions' hidden
states in chunks of at most 1 GiB of fp32 logits.
Legend: T tokens of the step, P scored positions, V vocab, K top logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import host_to_device

CHUNK_BYTES = 1 << 30  # fp32 logits of one lm_head chunk


@dataclass
class ScoreRows:
    index_T: torch.Tensor  # int64 [P]: the scored positions' token indices in the step
    target: torch.Tensor  # int64 [P]: each position's next prompt token
    temperature: torch.Tensor  # fp32 [P]: logprob temperature (1 for greedy and raw_logprob)
    top: int  # top logprobs per position (0: none)
    owners: list[tuple[int, int]]  # host: (seq_id, prompt position) of each scored position


def score_plan(batch, records: dict) -> list[tuple[int, int, int, object]]:
    """(row index, first, end, sequence) of the prompt positions a batch computes whose next-token logprobs were
    asked (logprob_start_len) and are not recorded yet (`records`: the engine's, by seq_id)."""
    plan = []
    for r, row in enumerate(batch.rows):
        if row.start >= row.seq.num_prompt - 1:  # decode rows: nothing of the prompt left to score
            continue
        rec = records.get(row.seq.seq_id)
        if rec is None or not rec.return_logprob:
            continue
        lo, hi = max(row.start, rec.scored_from()), min(row.start + row.length, row.seq.num_prompt - 1)
        if lo < hi:
            plan.append((r, lo, hi, row.seq))
    return plan


def score_rows(plan, batch, step, records: dict, device: torch.device) -> ScoreRows | None:
    """The plan's positions as tensors on the device: token indices in the step (`step.qo_indptr`), targets,
    temperatures; None for an empty plan."""
    if not plan:
        return None
    index, target, temperature, owners, top = [], [], [], [], 0
    for r, lo, hi, seq in plan:
        t = seq.params.logprob_temperature
        base = step.qo_indptr[r] - batch.rows[r].start
        index += range(base + lo, base + hi)
        target += seq.tokens[lo + 1:hi + 1]
        temperature += [t] * (hi - lo)
        owners += [(seq.seq_id, pos) for pos in range(lo, hi)]
        top = max(top, records[seq.seq_id].top_logprobs_num)
    return ScoreRows(host_to_device(torch.tensor(index, dtype=torch.int64), device),
                     host_to_device(torch.tensor(target, dtype=torch.int64), device),
                     host_to_device(torch.tensor(temperature, dtype=torch.float32), device), top, owners)


def score(model, h_TD: torch.Tensor, rows: ScoreRows) -> dict[str, torch.Tensor]:
    """{"input_logprobs": [P]} (+ "input_top_ids" / "input_top_logprobs" [P, K] when rows.top)."""
    P, V = rows.index_T.numel(), model.cfg.vocab_size
    chunk = max(1, CHUNK_BYTES // (4 * V))
    lps, top_ids, top_lps = [], [], []
    for a in range(0, P, chunk):
        logits_PV = model.logits(h_TD.index_select(0, rows.index_T[a:a + chunk]))
        logp_PV = torch.log_softmax(logits_PV / rows.temperature[a:a + chunk, None], dim=-1)
        lps.append(logp_PV.gather(1, rows.target[a:a + chunk, None])[:, 0])
        if rows.top:
            vals, ids = logp_PV.topk(min(rows.top, V), dim=-1)
            top_lps.append(vals)
            top_ids.append(ids)
    out = {"input_logprobs": torch.cat(lps)}
    if rows.top:
        out["input_top_ids"], out["input_top_logprobs"] = torch.cat(top_ids), torch.cat(top_lps)
    return out
