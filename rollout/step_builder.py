"""StepBuilder: a step's inputs written into buffers that live as long as the engine.

The scheduler's Python state (token lists, page lists) is written into host staging buffers (pinned
on CUDA) and reaches the device in one non_blocking copy into a fixed device buffer; nothing is read
back from the device. The attention page table stays on the host as int32 tensors (FlashInfer plans
on the CPU; the backend copies the page indices itself). A decode batch bound for a captured CUDA
graph is padded here, on the host, to the graph's size: padding rows hold token 0 at position 0 and
attend and write one slot of the cache's scratch page, so a replay needs no device-side fix-ups.

Device layout: [ids | pos | slots | sample (S)] for a step of n tokens (padding included), the first
three n long each on a 16-element stride, so a graph of size n always finds its inputs at the same
addresses (`token_views(n)`).
Host buffers are rewritten only after the copies of the previous step that read them have run: the
runner calls `release()` once it has enqueued them (and the attention plan's), before the forward, and
`build` waits on that event (normally already passed, also when the engine builds step N + 1 while the
device runs step N). A step built before the previous step's tokens are known (overlap) takes its token
ids from the device (`next_ids`): copied on the device after the host copy, no host sync.
Reference: `StepInputs.build` (tests/rollout/test_step_builder.py compares the two).
Steady decode: a decode step scheduled from the last one (overlap: `ahead_of`, each row's row index there) keeps
every row's pages and appends at most a page a row, so its page table, positions and slots are derived from the last
step's arrays with numpy (`_build_next`): no per-token Python work, which at 1024 rows of 1000 tokens cost
milliseconds a step. It holds while the scheduler only ever appends to a running sequence's `pages` in place (any
other change binds a new list); every row is checked for that (same sequence, same list, one position on) and a
step that does not pass is built the plain way.
Legend: B rows, T tokens, P pages in the page table, S sampled rows.
"""
from __future__ import annotations

import numpy as np
import torch

from .step_inputs import PageTable, RowPages, StepInputs

_ALIGN = 64  # int32 elements: 256 bytes


def _padded(n: int) -> int:
    """Token-buffer segments start on 128-byte boundaries (int64)."""
    return 16 * -(-n // 16)


class StepBuilder:
    def __init__(self, page_size: int, max_tokens: int, max_samples: int, device: torch.device, scratch_page: int,
                 steady_min_rows: int = 16):
        """steady_min_rows: the smallest decode step built from the last one's arrays (below it numpy's per-call
        cost exceeds the plain loop's: 73 vs 44 us at one row, 102 vs 168 us at 32, on a 2-core CPU)."""
        self.page_size, self.device, self.scratch_page = page_size, torch.device(device), scratch_page
        self.steady_min_rows = steady_min_rows
        self.steady_steps = 0  # steps built by `_build_next`
        self.max_tokens, self.max_samples = max_tokens, max_samples
        self._pin = self.device.type == "cuda"
        n = 3 * _padded(max_tokens) + max_samples
        self._tok_host = torch.zeros(n, dtype=torch.int64, pin_memory=self._pin)
        self._tok_np = self._tok_host.numpy()
        self._tok_dev = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._table_host = torch.zeros(0, dtype=torch.int32)
        self._table_np = self._table_host.numpy()
        self._copied: torch.cuda.Event | None = None
        self._pending = False  # a built step whose copies have not been released yet
        self._last: _Decode | None = None  # the last built decode step, for `_build_next`

    def token_views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, pos, slots) device views of a step of n tokens: fixed addresses for a given n."""
        d, m = self._tok_dev, _padded(n)
        return d[:n], d[m:m + n], d[2 * m:2 * m + n]

    def release(self) -> None:
        """The step's host-to-device copies are enqueued: the host buffers may be reused once they ran.
        Once per built step (a second call is a no-op)."""
        if self._pin and self._pending:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._pending = False

    def _wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _table_buffer(self, n: int) -> np.ndarray:
        if self._table_host.numel() < n:
            self._table_host = torch.zeros(max(n, 2 * self._table_host.numel()), dtype=torch.int32,
                                           pin_memory=self._pin)
            self._table_np = self._table_host.numpy()
        return self._table_np

    def build(self, rows, pad_to: int | None = None, next_ids: torch.Tensor | None = None,
              ahead_of: list[int] | None = None) -> StepInputs:
        """`rows`: the scheduler's Batch.rows. pad_to: a decode batch's captured graph size (>= len(rows)).
        next_ids: a decode step's token ids on the device (int64 [len(rows)]), for rows whose token the host
        does not know yet. ahead_of: the batch's `ahead_of` (each row's index in the last built step)."""
        if ahead_of is not None and next_ids is not None and len(rows) >= self.steady_min_rows:
            step = self._build_next(rows, pad_to, next_ids, ahead_of)
            if step is not None:
                return step
        self._last = None
        G = self.page_size
        ids, pos, slots, qo, kv_lens, pages, indices, kv_indptr, sample = [], [], [], [0], [], [], [], [0], []
        decode = True
        for row in rows:
            seq, start, n = row.seq, row.start, row.length
            end = start + n
            table = seq.pages[:-(-end // G)]
            if n == 1:
                ids.append(seq.tokens[start] if next_ids is None else 0)
                pos.append(start)
                slots.append(table[start // G] * G + start % G)
            else:
                decode = False
                ids += seq.tokens[start:end]
                pos += range(start, end)
                slots += [table[p // G] * G + p % G for p in range(start, end)]
            qo.append(qo[-1] + n)
            kv_lens.append(end)
            pages.append(table)
            indices += table
            kv_indptr.append(len(indices))
            sample += [qo[-1] - 1] * row.num_samples
        B, T, S = len(rows), qo[-1], len(sample)
        pad = 0
        if pad_to is not None:
            if not decode or pad_to < B:
                raise ValueError(f"StepBuilder: only a decode batch pads to a graph size ({B} rows, pad_to={pad_to})")
            pad = pad_to - B
        n = T + pad
        if n > self.max_tokens or S > self.max_samples:
            raise ValueError(f"StepBuilder: {n} tokens / {S} samples exceed the buffers "
                             f"({self.max_tokens} / {self.max_samples})")
        self._wait()
        tok, m = self._tok_np, _padded(n)
        tok[:T], tok[m:m + T], tok[2 * m:2 * m + T] = ids, pos, slots
        if pad:
            tok[T:n] = 0
            tok[m + T:m + n] = 0
            tok[2 * m + T:2 * m + n] = self.scratch_page * G
        tok[3 * m:3 * m + S] = sample
        dev = self._tok_dev[:3 * m + S]
        dev.copy_(self._tok_host[:3 * m + S], non_blocking=True)
        self._pending = True
        ids_T, pos_T, slots_T = self.token_views(n)
        if next_ids is not None:
            if not decode or next_ids.shape != (B,):
                raise ValueError(f"StepBuilder: next_ids {tuple(next_ids.shape)} for a "
                                 f"{'decode' if decode else 'prefill'} step of {B} rows")
            ids_T[:B].copy_(next_ids)
        table = self._page_table(qo, kv_indptr, indices, kv_lens, pad)
        if decode and B >= self.steady_min_rows and sample == list(range(T)):  # smaller steps never go steady
            self._last = _Decode([row.seq for row in rows], [row.seq.pages for row in rows],
                                 np.array(pos, dtype=np.int64), np.diff(np.array(kv_indptr, dtype=np.int64)),
                                 table.kv_indices[:len(indices)].numpy().copy())
        return StepInputs(ids_T, pos_T, slots_T, qo, kv_lens, pages, dev[3 * m:], G, decode, table=table,
                          graph=pad_to is not None, pad_rows=pad, sample_rows_in_order=sample == list(range(T)))

    def _build_next(self, rows, pad_to: int | None, next_ids: torch.Tensor, ahead_of: list[int]) -> StepInputs | None:
        """The decode step after the last built one, from its arrays (see the module doc); None when a row is not
        that step's row one position on with its pages only appended to."""
        last, G, B = self._last, self.page_size, len(rows)
        if last is None or not B or len(ahead_of) != B or ahead_of[-1] >= len(last.seqs):
            return None
        seqs, lists, lpos = last.seqs, last.pages, last.pos
        for row, i in zip(rows, ahead_of):
            seq = row.seq
            if seqs[i] is not seq or lists[i] is not seq.pages or row.length != 1 or row.num_samples != 1:
                return None
        src = np.array(ahead_of, dtype=np.int64)
        if B > 1 and not (np.diff(src) > 0).all():
            return None
        pos = lpos[src] + 1
        if not (pos == np.fromiter((row.start for row in rows), np.int64, B)).all():
            return None
        need = pos // G + 1  # pages of positions [0, pos]
        had = last.counts[src]
        grow = need - had
        if (grow < 0).any():
            return None
        if len(src) == len(seqs):
            kept = last.indices
        else:
            keep = np.zeros(len(seqs), dtype=bool)
            keep[src] = True
            kept = last.indices[np.repeat(keep, last.counts)]
        grown = np.flatnonzero(grow)
        if len(grown):
            new = [p for r in grown.tolist() for p in rows[r].seq.pages[had[r]:need[r]]]
            if len(new) != int(grow.sum()):
                return None  # a row whose pages were not appended for this step
            at = np.repeat(np.cumsum(had)[grown], grow[grown])
            indices = np.insert(kept, at, np.array(new, dtype=np.int32))
        else:
            indices = kept
        indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(need, out=indptr[1:])
        slots = indices[indptr[:-1] + pos // G].astype(np.int64) * G + pos % G
        pad = 0 if pad_to is None else pad_to - B
        if pad < 0 or B + pad > self.max_tokens or B > self.max_samples:
            return None
        n = B + pad
        self._wait()
        tok, m = self._tok_np, _padded(n)
        tok[:n] = 0
        tok[m:m + B], tok[2 * m:2 * m + B] = pos, slots
        if pad:
            tok[m + B:m + n] = 0
            tok[2 * m + B:2 * m + n] = self.scratch_page * G
        tok[3 * m:3 * m + B] = np.arange(B)
        dev = self._tok_dev[:3 * m + B]
        dev.copy_(self._tok_host[:3 * m + B], non_blocking=True)
        self._pending = True
        ids_T, pos_T, slots_T = self.token_views(n)
        ids_T[:B].copy_(next_ids)
        qo = np.arange(B + 1)
        kv_lens = pos + 1
        table = self._page_table(qo, indptr, indices, kv_lens, pad)
        self._last = _Decode([row.seq for row in rows], [row.seq.pages for row in rows], pos, need, indices)
        self.steady_steps += 1
        return StepInputs(ids_T, pos_T, slots_T, qo.tolist(), kv_lens.tolist(), RowPages(indices, indptr),
                          dev[3 * m:], G, True, table=table, graph=pad_to is not None, pad_rows=pad,
                          sample_rows_in_order=True)

    def _page_table(self, qo, kv_indptr, indices, kv_lens, pad: int) -> PageTable:
        """Host int32 qo_indptr [B'+1], kv_indptr [B'+1], kv_lens [B'], kv_indices [P'] (B' = B + pad) in one
        buffer, each part starting on a 256-byte boundary (what DLPack consumers may expect). The parts come as
        lists or numpy arrays."""
        B, P, T = len(kv_lens), len(indices), qo[-1]
        Bp, Pp = B + pad, P + pad
        a = _ALIGN * -(-(Bp + 1) // _ALIGN)
        b, c = 2 * a, 2 * a + _ALIGN * -(-Bp // _ALIGN)
        buf = self._table_buffer(c + Pp)
        buf[:B + 1] = qo
        buf[B + 1:Bp + 1] = np.arange(T + 1, T + pad + 1, dtype=np.int32)
        buf[a:a + B + 1] = kv_indptr
        buf[a + B + 1:a + Bp + 1] = np.arange(P + 1, P + pad + 1, dtype=np.int32)
        buf[b:b + B] = kv_lens
        buf[b + B:b + Bp] = 1
        buf[c:c + P] = indices
        buf[c + P:c + Pp] = self.scratch_page
        t = self._table_host
        return PageTable(t[:Bp + 1], t[a:a + Bp + 1], t[c:c + Pp], t[b:b + Bp])


class _Decode:
    """What `_build_next` needs of the last built decode step: its rows' sequences and page lists (identity
    checks), positions, page counts and flat page indices."""

    def __init__(self, seqs: list, pages: list, pos: np.ndarray, counts: np.ndarray, indices: np.ndarray):
        self.seqs, self.pages, self.pos, self.counts, self.indices = seqs, pages, pos, counts, indices
