"""The prefix cache beside the page pool: lookups by leading tokens, references, LRU leaf-first eviction, flush."""
from __future__ import annotations

import pytest

from mxroll.rollout.pages import PagePool
from mxroll.rollout.prefix_cache import PrefixCache

G = 2


def sequence_pages(pool: PagePool, n: int) -> list[int]:
    return [pool.alloc() for _ in range(n)]


def test_lookup_follows_whole_pages_of_the_same_prefix():
    pool = PagePool(8)
    cache = PrefixCache(pool, G)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    pages = sequence_pages(pool, 4)
    cache.insert(tokens, pages, 3)  # 3 full pages computed; the 4th (partial) stays the sequence's
    for p in pages:
        pool.free(p)  # the sequence ends
    assert len(cache) == 3 and pool.num_free == 5 and pool.num_evictable == 3
    assert [n.page for n in cache.lookup([1, 2, 3, 4, 9, 9], 9)] == pages[:2]
    assert [n.page for n in cache.lookup([1, 2, 3, 4, 5, 6, 7, 8], 2)] == pages[:2]  # capped
    assert cache.lookup([2, 1, 3, 4], 9) == []  # same second page, other first page: no match
    assert cache.lookup([1], 9) == []  # a partial page never matches


def test_acquired_pages_are_not_evicted_and_leaves_go_first():
    pool = PagePool(6)
    cache = PrefixCache(pool, G)
    a = sequence_pages(pool, 3)
    cache.insert([1, 2, 3, 4, 5, 6], a, 3)
    b = sequence_pages(pool, 2)
    cache.insert([1, 2, 7, 8], [a[0], b[1]], 2)  # shares the first page; its own first page stays its own
    for p in a + b:
        pool.free(p)
    assert len(cache) == 4 and pool.num_free == 2 and pool.num_evictable == 4  # b[0] went back to the pool
    taken = cache.acquire(cache.lookup([1, 2, 3, 4, 0], 2), 5)  # a sequence uses a[0], a[1]
    assert taken == a[:2] and pool.num_evictable == 2 and cache.hit_tokens == 4 and cache.query_tokens == 5
    # least recently used first: a[2] (last used by the first insert), then b[1]; a[0], a[1] are in use
    assert cache.evict(1) == 1 and pool.refcount(a[2]) == 0 and pool.refcount(b[1]) == 1
    assert cache.evict(5) == 1 and pool.refcount(b[1]) == 0
    assert len(cache) == 2 and pool.num_evictable == 0
    for p in taken:
        pool.free(p)  # the sequence ends: its pages are evictable again, the leaf before its parent
    assert pool.num_evictable == 2 and cache.evict(1) == 1 and pool.refcount(a[1]) == 0 and pool.refcount(a[0]) == 1
    assert cache.evict(9) == 1 and len(cache) == 0 and pool.num_free == 6


def test_flush_keeps_the_pages_sequences_use():
    pool = PagePool(4)
    cache = PrefixCache(pool, G)
    a = sequence_pages(pool, 2)
    cache.insert([1, 2, 3, 4], a, 2)
    pool.free(a[1])  # a[0] still used by its sequence
    assert cache.flush() == 2 and len(cache) == 0
    assert pool.refcount(a[0]) == 1 and pool.refcount(a[1]) == 0 and pool.num_evictable == 0
    pool.free(a[0])
    assert pool.num_free == 4


def test_pool_refuses_cache_misuse():
    pool = PagePool(2)
    page = pool.alloc()
    pool.hold(page)
    with pytest.raises(RuntimeError, match="already in the prefix cache"):
        pool.hold(page)
    pool.drop(page)
    with pytest.raises(RuntimeError, match="not in the prefix cache"):
        pool.drop(page)
