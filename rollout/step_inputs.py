"""The tensors of one engine step, built from the scheduler's Batch (host lists -> one set of
device tensors). Passed explicitly to the runner and the attention backend; nothing global.

Rows are the batch's sequences; each computes positions [start, start + length) of its tokens.
`StepInputs.build` is the plain builder (fresh tensors each step) and the reference for
`rollout.step_builder.StepBuilder`, which fills reused host/device buffers instead.
Legend: B rows, T new tokens (sum of lengths), S sampled rows (sum of num_samples).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PageTable:
    """The attention metadata as host int32 tensors (what FlashInfer's planner reads on the CPU)."""
    qo_indptr: torch.Tensor  # [B + 1]
    kv_indptr: torch.Tensor  # [B + 1]
    kv_indices: torch.Tensor  # [sum of pages]
    kv_lens: torch.Tensor  # [B]

    @classmethod
    def from_lists(cls, qo_indptr: list[int], pages: list[list[int]], kv_lens: list[int]) -> "PageTable":
        indptr, indices = [0], []
        for table in pages:
            indices += table
            indptr.append(len(indices))
        i32 = torch.int32
        return cls(torch.tensor(qo_indptr, dtype=i32), torch.tensor(indptr, dtype=i32),
                   torch.tensor(indices, dtype=i32), torch.tensor(kv_lens, dtype=i32))


class RowPages(Sequence):
    """`StepInputs.pages` from a flat page table (int32 indices, CSR indptr): row r's pages as a list on access."""

    def __init__(self, indices: np.ndarray, indptr: np.ndarray):
        self.indices, self.indptr = indices, indptr

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} of {len(self)}")
        r %= len(self)
        return self.indices[self.indptr[r]:self.indptr[r + 1]].tolist()

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented


@dataclass
class StepInputs:
    ids_T: torch.Tensor  # int64 token ids of every row's new tokens, row after row (then padding tokens)
    pos_T: torch.Tensor  # int64 their positions
    slots_T: torch.Tensor  # int64 flat cache slot (page * page_size + offset) each token's latent is written to
    qo_indptr: list[int]  # [B + 1] row r owns tokens qo_indptr[r] .. qo_indptr[r + 1] - 1
    kv_lens: list[int]  # [B] positions visible to the row's last token (start + length)
    pages: Sequence[list[int]]  # [B] the row's pages covering [0, kv_len) (lists, or RowPages)
    sample_T: torch.Tensor  # int64 [S] token index whose hidden state gives each sampled row's logits
    page_size: int
    is_decode: bool  # every row computes exactly one token
    # Filled by StepBuilder: host page table of the rows and padding rows (None: derived from the lists).
    table: PageTable | None = None
    graph: bool = False  # padded to a captured CUDA-graph size: num_rows + pad_rows
    pad_rows: int = 0  # one-token rows after the B real ones; they attend and write the scratch page
    sample_rows_in_order: bool = False  # sample_T == arange(T): every row samples once, from its only token

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
                   all(r.length == 1 for r in rows), sample_rows_in_order=sample == list(range(qo[-1])))

    def page_table(self) -> PageTable:
        """Host int32 CSR page table of every row the kernels see (padding rows included)."""
        if self.table is not None:
            return self.table
        return PageTable.from_lists(self.qo_indptr, self.pages, self.kv_lens)

    def kv_indices(self) -> tuple[list[int], list[int]]:
        """CSR page table: (kv_indptr [B + 1], kv_indices [sum of pages]) as host lists."""
        indptr, indices = [0], []
        for table in self.pages:
            indices += table
            indptr.append(len(indices))
        return indptr, indices
