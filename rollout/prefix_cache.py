"""Prefix cache: full KV-cache pages of ended and preempted sequences, kept by their leading tokens so that a
later request starting with the same tokens skips their prefill (multi-turn rollouts resend the conversation so
far). Pure Python, beside the page pool.

A node is one full page: its key is (its parent node, the page's token ids), so a chain of nodes from the root
spells a prefix, page by page. The cache holds one reference on each page it keeps (`PagePool.hold`). A sequence
that uses a cached page uses its whole chain, so a page that only the cache references has only such pages below
it: those are evicted least recently used first, leaves before their parents, when the pool runs out.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from .pages import PagePool


@dataclass(eq=False)
class _Node:
    uid: int
    page: int
    parent: "_Node | None"
    key: tuple
    children: int = 0
    last_used: int = 0


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int):
        self.pool, self.page_size = pool, page_size
        self._nodes: dict[tuple, _Node] = {}  # (parent uid or -1, the page's tokens) -> node
        self._uids = itertools.count()
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, _Node]] = []  # (last_used, uid, node): eviction candidates, lazily pruned
        self.hit_tokens = self.query_tokens = 0  # over admitted sequences: tokens found cached / looked up

    def __len__(self) -> int:
        return len(self._nodes)

    def pages(self) -> list[int]:
        return [node.page for node in self._nodes.values()]

    def lookup(self, tokens: list[int], max_pages: int) -> list[_Node]:
        """The chain of cached pages spelling the longest prefix of `tokens` (at most `max_pages` pages); takes no
        reference (see `acquire`)."""
        G, chain, parent = self.page_size, [], -1
        for i in range(max_pages):
            node = self._nodes.get((parent, tuple(tokens[i * G:(i + 1) * G])))
            if node is None:
                break
            chain.append(node)
            parent = node.uid
        return chain

    def acquire(self, chain: list[_Node], tokens_looked_up: int) -> list[int]:
        """A sequence takes the pages of a looked-up chain (a reference each); returns them in order."""
        now = next(self._clock)
        for node in chain:
            self.pool.ref(node.page)
            self._touch(node, now)
        self.hit_tokens += len(chain) * self.page_size
        self.query_tokens += tokens_looked_up
        return [node.page for node in chain]

    def insert(self, tokens: list[int], pages: list[int], num_full: int) -> None:
        """Keep the first `num_full` pages of a sequence (their KV computed for `tokens`), called while it still
        holds them; pages whose prefix is cached already stay the sequence's own (freed with it). Past such a page
        the chain goes on under the cached one, but only with pages nobody else holds: a page shared with the
        sequence's siblings there would be in use under a cached parent nobody uses (and never evictable)."""
        G, parent, now, diverged = self.page_size, None, next(self._clock), False
        for i in range(num_full):
            key = (parent.uid if parent is not None else -1, tuple(tokens[i * G:(i + 1) * G]))
            node = self._nodes.get(key)
            if node is not None and node.page != pages[i]:
                diverged = True
            if node is None:
                if diverged and self.pool.refcount(pages[i]) > 1:
                    return
                node = _Node(next(self._uids), pages[i], parent, key)
                self._nodes[key] = node
                self.pool.hold(node.page)
                if parent is not None:
                    parent.children += 1
            self._touch(node, now)
            parent = node

    def evict(self, n: int) -> int:
        """Drop up to `n` pages that only the cache references, least recently used leaves first; returns how many
        went back to the pool."""
        done, in_use = 0, []
        while done < n and self._heap:
            entry = heapq.heappop(self._heap)
            last_used, _, node = entry
            if self._nodes.get(node.key) is not node or node.last_used != last_used or node.children:
                continue  # stale; a parent comes back when its last child goes
            if self.pool.refcount(node.page) > 1:
                in_use.append(entry)  # a sequence uses it: a candidate again once it lets go
                continue
            self._remove(node)
            done += 1
        for entry in in_use:
            heapq.heappush(self._heap, entry)
        return done

    def flush(self) -> int:
        """Drop every cached page (pages that sequences still use stay theirs); returns how many were cached."""
        n = len(self._nodes)
        for node in self._nodes.values():
            self.pool.drop(node.page)
        self._nodes.clear()
        self._heap.clear()
        return n

    def _touch(self, node: _Node, now: int) -> None:
        node.last_used = now
        heapq.heappush(self._heap, (now, node.uid, node))
        if len(self._heap) > 4 * len(self._nodes) + 1024:  # mostly stale entries: rebuild from today's leaves
            self._heap = [(n.last_used, n.uid, n) for n in self._nodes.values() if not n.children]
            heapq.heapify(self._heap)

    def _remove(self, node: _Node) -> None:
        del self._nodes[node.key]
        self.pool.drop(node.page)
        parent = node.parent
        if parent is not None:
            parent.children -= 1
            if parent.children == 0:
                heapq.heappush(self._heap, (parent.last_used, parent.uid, parent))
