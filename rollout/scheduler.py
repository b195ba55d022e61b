"""Continuous batching over a paged cache: pure Python, unit-tested on CPU.

Each step: running sequences first, in arrival order (a decode token each, or their next prefill
chunk), then waiting ones, first come first served, while the token budget, the running-sequence cap
and free pages allow. Prefill is chunked to fit the budget. When a running sequence needs a page and
none is free, the newest running sequence not yet in this step is preempted by recompute: its pages
are freed and it waits again, keeping its tokens, to prefill them all when it is admitted again.
Copy-on-write: a sequence about to write into a partially filled page it shares (the prompt's last
page after a group forks) gets its own copy first (recorded in the batch; the runner copies).
With the prefix cache on, a sequence that ends or is preempted leaves its full pages in the cache, and an admitted
sequence starts after the longest run of cached pages spelling its leading tokens (at least its last token is
computed); cached pages nobody uses are evicted, least recently used first, before anyone is preempted.
A sequence's `pages` list is only ever appended to in place; any other change binds a new list (the step builder
derives a decode step's page table from the last one's when every row's list is the same object).
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .pages import PagePool
from .prefix_cache import PrefixCache
from .request import ENDED, Group, Sequence, SeqStatus, stop_reason


class RequestError(ValueError):
    """A request this engine can never serve (it cannot fit the cache or the context)."""


@dataclass(slots=True)
class Row:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed when scheduled)
    length: int  # tokens computed this step: seq.tokens[start:start + length]
    num_samples: int  # tokens sampled from the row's last position: 0, 1, or seq.fork (a group's fork)


@dataclass
class Batch:
    rows: list[Row]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pages, copied before the forward
    ahead_of: list[int] | None = None  # scheduled before the previous step's tokens: each row's row index there

    @property
    def num_tokens(self) -> int:
        return sum(r.length for r in self.rows)

    @property
    def num_samples(self) -> int:
        return sum(r.num_samples for r in self.rows)

    @property
    def is_decode(self) -> bool:
        return all(r.length == 1 for r in self.rows)


def _key(seq: Sequence) -> tuple[int, int]:
    return seq.arrival_key


class Scheduler:
    def __init__(self, pool: PagePool, *, page_size: int, max_running: int, max_batch_tokens: int,
                 eos_ids: tuple[int, ...] = (), max_context: int | None = None,
                 decode: Callable[[list[int]], str] | None = None, prefix_cache: bool = False):
        """decode: token ids -> text (the tokenizer's), for requests with stop strings. prefix_cache: keep ended
        sequences' pages for later requests with the same leading tokens."""
        self.pool, self.page_size = pool, page_size
        self.prefix = PrefixCache(pool, page_size) if prefix_cache else None
        self._epoch = 0  # flushes of the prefix cache: a sequence admitted before the last one never fills it
        self.decode = decode
        self._texts: dict[int, str] = {}  # token id -> its text alone (stop-string checks)
        self.max_running, self.max_batch_tokens = max_running, max_batch_tokens
        self.eos_ids, self.max_context = tuple(eos_ids), max_context
        self.waiting: list[Sequence] = []  # arrival order
        self.running: list[Sequence] = []  # arrival order
        self.num_preemptions = 0
        self._ids = itertools.count()

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_pages * self.page_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.running), "free_pages": self.pool.num_free,
                "preemptions": self.num_preemptions, "prefix_cache_pages": len(self.prefix) if self.prefix else 0}

    def load(self) -> dict:
        """sglang's `/get_load` figures: requests running and waiting (a waiting leader counts its n samples) and
        `load`, the tokens they hold or will prefill: what a router balances servers on."""
        running, waiting = list(self.running), list(self.waiting)  # snapshots: the engine thread may move them
        tokens = sum(len(s.tokens) for s in running) + sum(len(s.tokens) for s in waiting)
        return {"load": tokens, "num_reqs": len(running), "num_waiting_reqs": sum(s.fork for s in waiting),
                "num_tokens": tokens}

    def flush_prefix_cache(self) -> int:
        """Drop the prefix cache's pages (sequences keep the ones they use); returns how many it held. Sequences
        running now never add theirs later (after a weight update their KV is partly the old weights')."""
        self._epoch += 1
        return self.prefix.flush() if self.prefix is not None else 0

    # ---- requests --------------------------------------------------------------------------
    def add(self, group: Group) -> list[Sequence]:
        """Queue a request's leader. Returns the sequences that ended at once (max_new_tokens == 0)."""
        p, prompt = group.params, group.prompt
        if self.max_context is not None and len(prompt) >= self.max_context:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit the context length {self.max_context}")
        need = len(prompt) + p.max_new_tokens
        if self.max_context is not None:
            need = min(need, self.max_context)
        if -(-need // self.page_size) > self.pool.num_pages:
            raise RequestError(f"a sequence of {len(prompt)} prompt tokens + max_new_tokens={p.max_new_tokens} "
                               f"can never fit the KV cache ({self.capacity_tokens} tokens)")
        if p.n > self.max_running:
            raise RequestError(f"n={p.n} samples exceed max_running_requests={self.max_running}")
        seq = Sequence(next(self._ids), group, 0, list(prompt), len(prompt), fork=p.n)
        group.seqs.append(seq)
        scores = group.compute_from is not None and group.compute_from < len(prompt) - 1
        if p.max_new_tokens == 0 and not scores:  # nothing to compute (a request scoring its prompt runs its prefill)
            seq.status, seq.finish_reason = SeqStatus.FINISHED, {"type": "length", "length": 0}
            return [seq]
        bisect.insort(self.waiting, seq, key=_key)
        return []

    def abort(self, rid: str) -> list[Sequence]:
        return self._abort([s for s in self.waiting + self.running if s.rid == rid])

    def abort_all(self) -> list[Sequence]:
        return self._abort(self.waiting + self.running)

    def _abort(self, seqs: list[Sequence]) -> list[Sequence]:
        for seq in seqs:
            self._release(seq)
            seq.status, seq.finish_reason = SeqStatus.ABORTED, {"type": "abort", "message": "aborted"}
        return seqs

    def retract_all(self) -> int:
        """Every running sequence back to the queue, its pages freed (pause mode "retract")."""
        n = len(self.running)
        for seq in list(self.running):
            self._preempt(seq)
        return n

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        batch, budget = Batch([]), self.max_batch_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            length = min(len(seq.tokens) - seq.num_computed, budget)
            if self._reserve(seq, length, batch, scheduled):
                budget -= self._add_row(batch, seq, length, scheduled)
        watermark = max(1, self.pool.num_pages // 100) if self.running else 0
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + seq.fork > self.max_running:
                break
            admit = self._admission(seq, budget, watermark)
            if admit is None:
                break  # first come, first served: no overtaking
            chain, length = admit
            self.waiting.pop(0)
            seq.epoch = self._epoch
            if self.prefix is not None:
                seq.pages = self.prefix.acquire(chain, len(seq.tokens))
                seq.num_computed = len(seq.pages) * self.page_size
                if seq.num_outputs == 0:
                    seq.num_cached = seq.num_computed
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_key)
            reserved = self._reserve(seq, length, batch, scheduled, preempt=False)
            assert reserved, "admission counted pages that could not be allocated"
            budget -= self._add_row(batch, seq, length, scheduled)
        return batch if batch.rows else None

    def schedule_next_decode(self, batch: Batch, ready=None) -> Batch | None:
        """The decode step after `batch`, scheduled before `batch`'s tokens are known (overlap: the host
        prepares step N + 1 while the device runs step N). Every row continues with its next position,
        except rows that end by length with `batch`'s token and rows whose sequence has ended since `batch` was
        scheduled (a stop token of the step before: `batch` computes them, `update` drops them); a row that ends
        by a stop token is computed and then dropped. None when the step depends on `batch`'s outcome or
        would change the plan: not a pure decode batch, admissible waiting requests, running sequences outside
        the batch, a shared partial page (copy-on-write), too few free pages (preemption), or `ready(rows)`
        false (the runner cannot run the step right away)."""
        G = self.page_size
        if not batch.rows or batch.copies or (batch.ahead_of is None and any(
                r.length != 1 or r.num_samples != 1 for r in batch.rows)):  # a batch made here is one already
            return None
        if self._admissible(len(batch.rows)):
            return None  # schedule() would admit the queue's head: let it
        rows, src, grow, live = [], [], [], 0
        running, refcount = SeqStatus.RUNNING, self.pool.refcount
        context = self.max_context if self.max_context is not None else 1 << 62
        for i, row in enumerate(batch.rows):  # the loop of a step at 1024 rows: kept lean
            seq = row.seq
            start = row.start + 1
            if seq.status is not running:
                if seq.status in ENDED:
                    continue  # ended by the step before `batch` (at 1024 rows with EOS stops: most steps)
                return None
            live += 1
            if seq.fork != 1 or start != seq.num_computed + 1:
                return None
            n = len(seq.tokens) + 1
            if n - seq.num_prompt >= seq.group.params.max_new_tokens or n >= context:
                continue  # batch's token ends it by length
            if start % G:
                if refcount(seq.pages[start // G]) > 1:
                    return None
            elif len(seq.pages) <= start // G:
                grow.append(seq)  # its next position starts a page
            rows.append(Row(seq, start, 1, 1))
            src.append(i)
        if live != len(self.running):
            return None  # a running sequence outside the batch (admitted or forked since)
        if not rows or len(grow) > self._available() or (ready is not None and not ready(rows)):
            return None
        for seq in grow:
            seq.pages.append(self._new_page())
        return Batch(rows, ahead_of=src)

    def _admissible(self, decode_rows: int) -> bool:
        """schedule()'s admission test for the queue's head after `decode_rows` running decode rows (with today's
        free pages)."""
        if not self.waiting:
            return False
        seq, budget = self.waiting[0], self.max_batch_tokens - decode_rows
        if budget <= 0 or len(self.running) + seq.fork > self.max_running:
            return False
        return self._admission(seq, budget, max(1, self.pool.num_pages // 100)) is not None

    def _admission(self, seq: Sequence, budget: int, watermark: int) -> tuple[list, int] | None:
        """(the cached chain it would start from, tokens it would compute) when the pages of a waiting `seq`'s next
        chunk fit with `watermark` pages to spare (cached pages nobody uses count as free), else None."""
        G, chain = self.page_size, []
        if self.prefix is not None:  # a waiting sequence holds no pages: new, or preempted
            limit = (len(seq.tokens) - 1) // G
            if seq.group.compute_from is not None:  # prompt-token logprobs from there on: computed here
                limit = min(limit, seq.group.compute_from // G)
            chain = self.prefix.lookup(seq.tokens, limit)
        start = len(chain) * G if chain else seq.num_computed
        length = min(len(seq.tokens) - start, budget)
        taken = sum(self.pool.refcount(node.page) == 1 for node in chain)  # evictable now, in use once taken
        need = -(-(start + length) // G) - (len(chain) or len(seq.pages))
        return (chain, length) if need + watermark <= self._available() - taken else None

    def _available(self) -> int:
        """Pages an allocation can get: free ones, and cached ones nobody uses (evicted on demand)."""
        return self.pool.num_free + self.pool.num_evictable

    def _new_page(self) -> int | None:
        page = self.pool.alloc()
        if page is None and self.prefix is not None and self.prefix.evict(1):
            page = self.pool.alloc()
        return page

    def _add_row(self, batch: Batch, seq: Sequence, length: int, scheduled: set[int]) -> int:
        end = seq.num_computed + length
        samples = seq.fork if end == len(seq.tokens) and seq.params.max_new_tokens > 0 else 0
        batch.rows.append(Row(seq, seq.num_computed, length, samples))
        scheduled.add(seq.seq_id)
        return length

    def _reserve(self, seq: Sequence, length: int, batch: Batch, scheduled: set[int], preempt: bool = True) -> bool:
        """Pages for positions [num_computed, num_computed + length), copying a shared partial page first.
        False when `seq` itself had to be preempted."""
        G, start = self.page_size, seq.num_computed
        if start % G and self.pool.refcount(seq.pages[start // G]) > 1:
            page = self._alloc(seq, scheduled, preempt)
            if page is None:
                return False
            i = start // G
            old = seq.pages[i]
            batch.copies.append((old, page))
            self.pool.free(old)
            seq.pages = seq.pages[:i] + [page] + seq.pages[i + 1:]  # a new list: pages are only appended in place
        while len(seq.pages) < -(-(start + length) // G):
            page = self._alloc(seq, scheduled, preempt)
            if page is None:
                return False
            seq.pages.append(page)
        return True

    def _alloc(self, seq: Sequence, scheduled: set[int], preempt: bool) -> int | None:
        while True:
            page = self._new_page()
            if page is not None or not preempt:
                return page
            victims = [s for s in self.running if s.seq_id not in scheduled]
            victim = max(victims, key=_key) if victims else seq
            self._preempt(victim)
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed, seq.status = 0, SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=_key)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's pages (its full computed ones stay in the prefix cache) and take it off both
        queues."""
        if self.prefix is not None and seq.pages and seq.epoch == self._epoch:
            self.prefix.insert(seq.tokens, seq.pages, min(seq.num_computed // self.page_size, len(seq.pages)))
        for page in seq.pages:
            self.pool.free(page)
        seq.pages = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def update(self, batch: Batch, tokens: list[list[int]]) -> list[Sequence]:
        """Apply one step: tokens[i] are the ids sampled for batch.rows[i] (row.num_samples of them).
        Returns the sequences that finished (a group's siblings are forked here)."""
        finished = []
        for row, toks in zip(batch.rows, tokens, strict=True):
            seq = row.seq
            if seq.status in ENDED:
                continue
            seq.num_computed += row.length
            if row.num_samples == 0:
                if seq.params.max_new_tokens == 0 and seq.num_computed == len(seq.tokens):  # its prompt is scored
                    self._release(seq)
                    seq.status, seq.finish_reason = SeqStatus.FINISHED, {"type": "length", "length": 0}
                    finished.append(seq)
                continue
            if len(toks) != row.num_samples:
                raise ValueError(f"row of sequence {seq.seq_id} sampled {len(toks)} tokens, expected {row.num_samples}")
            if seq.fork > 1:
                finished += self._fork(seq, toks[1:])
            seq.tokens.append(toks[0])
            finished += self._check(seq, toks[0])
        return finished

    def _fork(self, leader: Sequence, tokens: list[int]) -> list[Sequence]:
        """Siblings of a leader whose prompt prefill just ended: its pages are shared (refcounts)."""
        group, done = leader.group, []
        for j, tok in enumerate(tokens, start=1):
            sib = Sequence(next(self._ids), group, j, leader.tokens + [tok], leader.num_prompt, SeqStatus.RUNNING,
                           leader.num_computed, list(leader.pages), num_cached=leader.num_cached, epoch=leader.epoch)
            for page in sib.pages:
                self.pool.ref(page)
            group.seqs.append(sib)
            bisect.insort(self.running, sib, key=_key)
            done += self._check(sib, tok)
        leader.fork = 1
        return done

    def _token_text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode([token])
        return text

    def _check(self, seq: Sequence, token: int) -> list[Sequence]:
        reason = stop_reason(seq, token, self.eos_ids, self.max_context, self.decode, self._token_text)
        if reason is None:
            return []
        self._release(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        return [seq]
