"""The KV-cache page allocator: a free list with reference counts (the n samples of a request
share their prompt's pages; the prefix cache holds one reference on each page it keeps). Pure Python; a double
free is a bug and raises."""
from __future__ import annotations


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._cached = [False] * num_pages  # held by the prefix cache
        self.num_evictable = 0  # pages only the prefix cache references

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self) -> int | None:
        if not self._free:
            return None
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def ref(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} is free; it cannot be shared")
        if self._cached[page] and self._refs[page] == 1:
            self.num_evictable -= 1
        self._refs[page] += 1

    def free(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} freed twice")
        self._refs[page] -= 1
        if self._cached[page] and self._refs[page] == 1:
            self.num_evictable += 1
        if self._refs[page] == 0:
            self._free.append(page)

    def hold(self, page: int) -> None:
        """The prefix cache's reference on an allocated page."""
        if self._cached[page]:
            raise RuntimeError(f"page {page} is already in the prefix cache")
        self.ref(page)
        self._cached[page] = True
        if self._refs[page] == 1:
            self.num_evictable += 1

    def drop(self, page: int) -> None:
        """The prefix cache lets go of a page (freed when nobody else references it)."""
        if not self._cached[page]:
            raise RuntimeError(f"page {page} is not in the prefix cache")
        self._cached[page] = False
        if self._refs[page] == 1:
            self.num_evictable -= 1
        self.free(page)
