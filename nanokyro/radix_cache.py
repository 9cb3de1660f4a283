"""Prefix cache: a radix tree over token ids whose nodes own KV pages, so shared prefixes are computed once.

Each edge is one full page of tokens (the tree is page-aligned: a partly filled page is never shared), and
each node owns the page holding that chunk's KV. A node's page is only valid after its ancestors' pages, so
a sequence that uses a node also holds every ancestor: it matched (or computed) the whole prefix.

Pages are reference counted by the BlockManager; the tree holds its own claim (`blocks.cached`). A page no
sequence references stays in the tree, evictable: when the allocator runs short it calls `evict`, which
frees least-recently-used leaves first. A referenced page is never evicted, so it is never overwritten.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from nanokyro.block_manager import BlockManager


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]  # the page's tokens
    page: int
    parent: Node | None
    depth: int = 0  # pages from the root, this one included
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    last_access: int = 0


class RadixCache:
    def __init__(self, blocks: BlockManager):
        self.blocks, self.page_size = blocks, blocks.page_size
        self.root = Node((), -1, None)
        self.num_nodes = 0
        self._clock = itertools.count(1)
        blocks.evict = self.evict

    def _chunks(self, token_ids: list[int], start: int, num_pages: int):
        ps = self.page_size
        for i in range(start, num_pages):
            yield i, tuple(token_ids[i * ps : (i + 1) * ps])

    def match(self, token_ids: list[int], num_tokens: int) -> tuple[list[int], Node]:
        """Pages of the longest cached prefix of the first num_tokens tokens, and the deepest node matched."""
        node, pages, now = self.root, [], next(self._clock)
        for _, key in self._chunks(token_ids, 0, num_tokens // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            node.last_access = now
            pages.append(node.page)
        return pages, node

    def insert(self, token_ids: list[int], num_tokens: int, pages: list[int], node: Node | None = None) -> Node:
        """Add the full pages among the first num_tokens of token_ids (KV in `pages`) below `node`, a node on
        this sequence's chain (its first node.depth pages are already in the tree).

        Where the tree already has a chunk under another page, the caller's duplicate is swapped for the
        tree's (pages is updated in place and the references moved), so every sequence uses one chain.
        Returns the deepest node, for the next call to continue from."""
        node, now = node or self.root, next(self._clock)
        for i, key in self._chunks(token_ids, node.depth, min(num_tokens // self.page_size, len(pages))):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Node(key, pages[i], node, node.depth + 1)
                self.blocks.set_cached(pages[i], True)
                self.num_nodes += 1
            elif child.page != pages[i]:
                self.blocks.incref([child.page])
                self.blocks.release([pages[i]])
                pages[i] = child.page
            node = child
            node.last_access = now
        return node

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages unreferenced pages, least recently used leaves first. Returns how many."""
        ref = self.blocks.ref
        leaves = [(n.last_access, id(n), n) for n in self._nodes() if not n.children and ref[n.page] == 0]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.key]
            self.num_nodes -= 1
            self.blocks.set_cached(node.page, False)
            freed += 1
            if parent is not self.root and not parent.children and ref[parent.page] == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def clear(self) -> None:
        """Drop every unreferenced page."""
        self.evict(self.num_nodes)
