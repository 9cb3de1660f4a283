"""Reference-counted KV pages.

A page's reference count is the number of sequences using it. A page at zero goes back to the free list,
unless the prefix cache holds it: then it stays filled, evictable, until the allocator runs short and asks
the cache to give pages back (least recently used first). The cache is told whenever a page it holds goes
idle (count reaches zero) or back into use, so it always knows which of its pages it may evict.
"""
from __future__ import annotations

from collections import deque
from typing import Callable


class OutOfPages(Exception):
    pass


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.ref = [0] * num_pages
        self.cached = [False] * num_pages  # held by the prefix cache
        self.free: deque[int] = deque(range(num_pages))
        self.num_used = 0  # pages referenced by at least one sequence
        self.evict: Callable[[int], None] | None = None  # set by the prefix cache: frees up to n pages
        self.on_idle_change: Callable[[int], None] | None = None  # set by the prefix cache: its page went idle/busy

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def allocate(self, n: int) -> list[int]:
        if len(self.free) < n and self.evict is not None:
            self.evict(n - len(self.free))
        if len(self.free) < n:
            raise OutOfPages(f"need {n} pages, {len(self.free)} free")
        pages = [self.free.popleft() for _ in range(n)]
        for p in pages:
            self.ref[p] = 1
        self.num_used += n
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            self.ref[p] += 1
            if self.ref[p] == 1:
                self.num_used += 1
                if self.cached[p]:
                    self.on_idle_change(p)

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self.ref[p] -= 1
            assert self.ref[p] >= 0, f"page {p} released too often"
            if self.ref[p] == 0:
                self.num_used -= 1
                if self.cached[p]:
                    self.on_idle_change(p)
                else:
                    self.free.append(p)

    def set_cached(self, page: int, cached: bool) -> None:
        """The prefix cache takes (True) or gives back (False) its hold on a page."""
        self.cached[page] = cached
        if not cached and self.ref[page] == 0:
            self.free.append(page)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def all_free(self) -> bool:
        """No sequence holds a page: each is on the free list or idle in the cache. Tests check this."""
        return all(r == 0 for r in self.ref) and len(self.free) + sum(self.cached) == self.num_pages
