"""The tensors of one engine step, built from the scheduler's Batch (host lists -> one set of
device tensors). Passed explicitly to the runner and the attention backend; nothing global.

Rows are the batch's sequences; each computes positions [start, start + length) of its tokens.
Legend: B rows, T new tokens (sum of lengths), S sampled rows (sum of num_samples).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    ids_T: torch.Tensor  # int64 token ids of every row's new tokens, row after row
    pos_T: torch.Tensor  # int64 their positions
    slots_T: torch.Tensor  # int64 flat cache slot (page * page_size + offset) each token's latent is written to
    qo_indptr: list[int]  # [B + 1] row r owns tokens qo_indptr[r] .. qo_indptr[r + 1] - 1
    kv_lens: list[int]  # [B] positions visible to the row's last token (start + length)
    pages: list[list[int]]  # [B] the row's pages covering [0, kv_len)
    sample_T: torch.Tensor  # int64 [S] token index whose hidden state gives each sampled row's logits
    page_size: int
    is_decode: bool  # every row computes exactly one token

    @property
    def num_rows(self) -> int:
        return len(self.kv_lens)

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr[-1]

    @classmethod
    def build(cls, rows, page_size: int, device: torch.device) -> "StepInputs":
        """`rows`: the scheduler's Batch.rows (seq, start, length, num_samples)."""
        ids, pos, slots, qo, kv_lens, pages, sample = [], [], [], [0], [], [], []
        for row in rows:
            seq, start, n = row.seq, row.start, row.length
            end = start + n
            ids += seq.tokens[start:end]
            pos += range(start, end)
            table = seq.pages[:-(-end // page_size)]
            slots += [table[p // page_size] * page_size + p % page_size for p in range(start, end)]
            qo.append(qo[-1] + n)
            kv_lens.append(end)
            pages.append(table)
            sample += [qo[-1] - 1] * row.num_samples
        host = torch.tensor([ids, pos, slots], dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
        return cls(dev[0], dev[1], dev[2], qo, kv_lens, pages,
                   torch.tensor(sample, dtype=torch.long).to(device, non_blocking=True), page_size,
                   all(r.length == 1 for r in rows))

    def kv_indices(self) -> tuple[list[int], list[int]]:
        """CSR page table: (kv_indptr [B + 1], kv_indices [sum of pages]) as host lists."""
        indptr, indices = [0], []
        for table in self.pages:
            indices += table
            indptr.append(len(indices))
        return indptr, indices
