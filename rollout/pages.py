"""The KV-cache page allocator: a free list with reference counts (the n samples of a request
share their prompt's pages). Pure Python; a double free is a bug and raises."""
from __future__ import annotations


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first

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
        self._refs[page] += 1

    def free(self, page: int) -> None:
        if self._refs[page] <= 0:
            raise RuntimeError(f"page {page} freed twice")
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)
